"""Qwen2.5-0.5B-architecture decoders built from torchtune blocks, with MoE or dense MLPs.

B batch, S sequence length, D model dim, V vocabulary, L layers, E experts.

`logits, router_loss, aux_loss = model(tokens)`, or `ce, router_loss, aux_loss = model(tokens,
labels)` (the output projection and cross-entropy fused chunk by chunk: training never holds the
[B, S, V] logits). router_loss and aux_loss are summed over layers (zeros for a dense model). Each block returns its own losses and expert load as outputs, and the
root (never recomputed) sums and stores them: activation checkpointing a block re-runs its forward
in backward but cannot count it twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ioe_train.blocks import (
    FeedForward,
    MultiHeadAttention,
    Qwen2RotaryPositionalEmbeddings,
    RMSNorm,
    TiedLinear,
    document_mask,
)
from ioe_train.loss import linear_cross_entropy
from ioe_train.moe import ROUTERS, MoE, MoEConfig, swiglu_mlp


@dataclass(frozen=True)
class Arch:
    """Dimensions of a decoder."""

    vocab_size: int
    num_layers: int
    dim: int  # D
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention)
    hidden_dim: int  # hidden size of the dense SwiGLU MLP
    max_seq_len: int  # RoPE cache length
    rope_base: float = 1_000_000.0
    norm_eps: float = 1e-6


# Qwen2.5-0.5B (tied embeddings, QKV bias); its 151,936 ids include padding past the tokenizer's.
QWEN2_5_0_5B = Arch(
    vocab_size=151_936, num_layers=24, dim=896, num_heads=14, num_kv_heads=2, hidden_dim=4864, max_seq_len=32_768
)
TINY = Arch(vocab_size=512, num_layers=2, dim=64, num_heads=4, num_kv_heads=2, hidden_dim=128, max_seq_len=512)

# ModelConfig fields that override the preset's Arch field of the same name.
_ARCH_OVERRIDES = ("vocab_size", "max_seq_len", "num_layers", "dim", "num_heads", "num_kv_heads", "hidden_dim")
ATTENTIONS = ("causal", "block_causal")
UPCYCLES = ("exact", "copies", "slices")
# Qwen2.5's <|endoftext|>: `pile-prep tokenize` ends every document with it (docs/FORMAT.md).
QWEN_EOS_ID = 151_643

# name -> (architecture, whether its MLPs are MoE layers)
PRESETS: dict[str, tuple[Arch, bool]] = {
    "qwen2_5_moe": (QWEN2_5_0_5B, True),
    "qwen2_5_dense": (QWEN2_5_0_5B, False),
    "tiny_moe": (TINY, True),
    "tiny_dense": (TINY, False),
}


@dataclass
class ModelConfig:
    """Which model to build."""

    name: str = "qwen2_5_moe"  # a key of PRESETS
    moe: MoEConfig = field(default_factory=MoEConfig)  # the MoE layers; unused by *_dense presets
    # Architecture overrides of the preset (None = the preset's value), e.g. the 0.5B widths at
    # 2 layers for sizing (`ioe-train plan`) or a narrower model for ablations.
    vocab_size: int | None = None  # 151,936 for Qwen2.5
    max_seq_len: int | None = None  # RoPE cache length; 32,768 for Qwen2.5
    num_layers: int | None = None  # 24 for Qwen2.5-0.5B
    dim: int | None = None  # D: 896
    num_heads: int | None = None  # query heads: 14 (head_dim = dim / num_heads = 64)
    num_kv_heads: int | None = None  # key/value heads (GQA): 2
    hidden_dim: int | None = None  # dense SwiGLU hidden size: 4864 (MoE experts derive from it)
    # Tokens per chunk of the fused output projection + cross-entropy: one chunk's fp32 logits and
    # their gradient (chunk x V x ~10 bytes: 1.5 GB at 1024 x 151,936) exist at a time.
    ce_chunk_tokens: int = 1024
    # "causal": attention crosses document boundaries inside a packed window (as Qwen/Llama
    # pretraining); "block_causal": a token attends to its own document only (docs/TRAINING.md).
    attention: str = "causal"
    eos_id: int = QWEN_EOS_ID  # the token that ends every document: the next token starts one
    # Warm start from a dense checkpoint (sparse upcycling, ioe_train/upcycle.py): a final/model.pt
    # of this project or a Hugging Face Qwen2.5 safetensors directory; None = random init.
    init_from: str | None = None
    # What upcycling makes of the dense MLP (a MoE model with init_from only; docs/MOE.md):
    # "exact": the MoE computes the dense function at the first step, or the run is refused
    #   before it starts, naming why (whole copies; top-k also one hidden slice per selected expert);
    # "copies": every expert a whole copy (expert_hidden_dim = the dense hidden size), router fresh;
    # "slices": expert e = hidden slice e mod n of the dense MLP (H = n * H_e), router fresh.
    upcycle: str = "exact"
    init_noise: float = 0.0  # upcycling: expert e = dense MLP + init_noise * std(W) * N(0, 1)

    def __post_init__(self) -> None:
        if self.name not in PRESETS:
            raise ValueError(f"name must be one of {sorted(PRESETS)}, got {self.name!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.eos_id < 0:
            raise ValueError(f"eos_id must be >= 0, got {self.eos_id}")
        if self.upcycle not in UPCYCLES:
            raise ValueError(f"upcycle must be one of {UPCYCLES}, got {self.upcycle!r}")
        if self.init_noise < 0:
            raise ValueError(f"init_noise must be >= 0, got {self.init_noise}")
        for key in _ARCH_OVERRIDES:
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 or None, got {value}")
        if self.ce_chunk_tokens < 1:
            raise ValueError(f"ce_chunk_tokens must be >= 1, got {self.ce_chunk_tokens}")
        arch = self.arch()
        if arch.dim % arch.num_heads:
            raise ValueError(f"num_heads must divide dim: {arch.num_heads} heads, dim {arch.dim}")
        if arch.num_heads % arch.num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads: {arch.num_kv_heads} kv heads, "
                             f"{arch.num_heads} heads")  # fmt: skip
        if (arch.dim // arch.num_heads) % 2:
            raise ValueError(f"num_heads: head_dim = dim / num_heads = {arch.dim // arch.num_heads} "
                             "must be even (RoPE rotates pairs)")  # fmt: skip

    def arch(self) -> Arch:
        """The preset's dimensions with this config's overrides applied."""
        overrides = {k: getattr(self, k) for k in _ARCH_OVERRIDES if getattr(self, k) is not None}
        return replace(PRESETS[self.name][0], **overrides)

    @property
    def is_moe(self) -> bool:
        return PRESETS[self.name][1]


class Block(nn.Module):
    """Pre-norm decoder block: h = x + attn(norm(x)); out = h + mlp(norm(h)).

    forward(x [B, S, D], doc_start=None, mask=None) -> (out [B, S, D], router_loss, aux_loss,
    tokens_per_expert [E], router_entropy): tensors (or None) only, so checkpoint_wrapper,
    fully_shard and torch.compile apply per block. A dense block returns zero losses,
    tokens_per_expert of shape [0] and zero entropy. doc_start [B, S] bool (True where a document
    begins) goes to the router; mask (`blocks.document_mask`) restricts attention, None = causal.
    """

    def __init__(self, attn: MultiHeadAttention, mlp: MoE | FeedForward, sa_norm: RMSNorm, mlp_norm: RMSNorm) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.sa_norm = sa_norm
        self.mlp_norm = mlp_norm

    def forward(self, x: Tensor, doc_start: Tensor | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        normed = self.sa_norm(x)
        h = x + self.attn(normed, normed, mask=mask)  # no KV cache
        if isinstance(self.mlp, MoE):
            routed = self.mlp.forward_with_stats(self.mlp_norm(h), doc_start)
            return h + routed.out, routed.router_loss, routed.aux_loss, routed.tokens_per_expert, routed.entropy
        zero = x.new_zeros((), dtype=torch.float32)
        return h + self.mlp(self.mlp_norm(h)), zero, zero, x.new_zeros(0, dtype=torch.float32), zero


class Decoder(nn.Module):
    """Token embeddings -> blocks -> RMSNorm -> tied output projection.

    After each forward of a MoE model, `tokens_per_expert` [L, E] and `router_entropy` [L] hold
    that forward's detached expert load (overwritten, never accumulated); see `expert_stats`.
    `attention` and `eos_id` as in ModelConfig.
    """

    def __init__(self, arch: Arch, moe: MoEConfig | None, ce_chunk_tokens: int = 1024, attention: str = "causal",
                 eos_id: int = QWEN_EOS_ID) -> None:  # fmt: skip
        super().__init__()
        if moe is not None and moe.expert_hidden_dim == 0:  # FLOP-matched to the dense MLP
            moe = replace(moe, expert_hidden_dim=arch.hidden_dim // ROUTERS[moe.router].active_experts(moe))
        self.arch = arch
        self.attention = attention
        self.eos_id = eos_id
        self.document_reset = moe is not None and moe.ioe_document_reset
        self.vocab_size = arch.vocab_size
        self.max_seq_len = arch.max_seq_len
        self.ce_chunk_tokens = ce_chunk_tokens
        head_dim = arch.dim // arch.num_heads
        rope = Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=arch.max_seq_len, base=arch.rope_base)
        self.tok_embeddings = nn.Embedding(arch.vocab_size, arch.dim)
        self.layers = nn.ModuleList([_block(arch, head_dim, rope, moe) for _ in range(arch.num_layers)])
        self.norm = RMSNorm(arch.dim, eps=arch.norm_eps)
        self.output = TiedLinear(self.tok_embeddings)  # not a module: the weight lives in tok_embeddings
        self.tokens_per_expert: Tensor | None = None
        self.router_entropy: Tensor | None = None

    def forward(self, tokens: Tensor, labels: Tensor | None = None, reduction: str = "sum",
                per_document: bool = False) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """tokens: [B, S] int64 -> (out, router_loss, aux_loss), the losses fp32 scalars.

        Without labels, out is the logits [B, S, V] (parameter dtype). With labels [B, S], out is
        the fp32 cross-entropy of the labels: summed (reduction "sum", differentiable) or per
        token [B, S] (reduction "none", evaluation only), `ce_chunk_tokens` rows of logits at a
        time (ioe_train.loss.linear_cross_entropy).

        `per_document` scores every document on its own, whatever the model was built with:
        block-causal attention, and the document reset for routers that take `doc_start` (IoE).
        """
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len {self.max_seq_len}")
        h = self.tok_embeddings(tokens)  # [B, S, D]
        block_causal = per_document or self.attention == "block_causal"
        document_reset = per_document or self.document_reset
        doc_start = mask = None
        if block_causal or document_reset:
            doc_start = document_starts(tokens, self.eos_id)  # [B, S]
        if block_causal:
            mask = document_mask(doc_start)  # built once, shared by every layer
        router_doc_start = doc_start if document_reset else None
        router_loss = aux_loss = h.new_zeros((), dtype=torch.float32)
        loads, entropies = [], []
        for layer in self.layers:
            h, layer_router_loss, layer_aux_loss, load, layer_entropy = layer(h, router_doc_start, mask)
            router_loss = router_loss + layer_router_loss
            aux_loss = aux_loss + layer_aux_loss
            loads.append(load)
            entropies.append(layer_entropy)
        if loads[0].numel():
            self.tokens_per_expert = torch.stack(loads)  # [L, E]
            self.router_entropy = torch.stack(entropies)  # [L]
        h = self.norm(h)  # [B, S, D]
        if labels is None:
            return self.output(h), router_loss, aux_loss
        ce = linear_cross_entropy(h.flatten(0, 1), self.tok_embeddings.weight, labels.flatten(),
                                  self.ce_chunk_tokens, reduction)  # fmt: skip
        return (ce.view(labels.shape) if reduction == "none" else ce), router_loss, aux_loss


def document_starts(tokens: Tensor, eos_id: int) -> Tensor:
    """tokens: [B, S] -> [B, S] bool, True at position 0 and right after every `eos_id`.

    The window's first token counts as a start: the model cannot see what came before it.
    """
    starts = torch.ones_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eos_id
    return starts


def _block(arch: Arch, head_dim: int, rope: nn.Module, moe: MoEConfig | None) -> Block:
    d = arch.dim
    attn = MultiHeadAttention(
        embed_dim=d,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        head_dim=head_dim,
        q_proj=nn.Linear(d, arch.num_heads * head_dim, bias=True),
        k_proj=nn.Linear(d, arch.num_kv_heads * head_dim, bias=True),
        v_proj=nn.Linear(d, arch.num_kv_heads * head_dim, bias=True),
        output_proj=nn.Linear(arch.num_heads * head_dim, d, bias=False),
        pos_embeddings=rope,
        max_seq_len=arch.max_seq_len,
    )
    mlp = MoE(d, moe) if moe is not None else swiglu_mlp(d, arch.hidden_dim)
    return Block(attn, mlp, RMSNorm(d, eps=arch.norm_eps), RMSNorm(d, eps=arch.norm_eps))


def qwen2_5_moe(moe: MoEConfig | None = None, **overrides) -> Decoder:
    """Qwen2.5-0.5B with every MLP a MoE layer (default: top-2 of 8, FLOP-matched experts)."""
    return Decoder(replace(QWEN2_5_0_5B, **overrides), moe or MoEConfig())


def qwen2_5_dense(**overrides) -> Decoder:
    """Qwen2.5-0.5B with its dense SwiGLU MLPs: the baseline."""
    return Decoder(replace(QWEN2_5_0_5B, **overrides), None)


def tiny_moe(moe: MoEConfig | None = None, **overrides) -> Decoder:
    """A 2-layer, dim-64 MoE model for tests and smoke runs."""
    return Decoder(replace(TINY, **overrides), moe or MoEConfig())


def tiny_dense(**overrides) -> Decoder:
    """The dense twin of `tiny_moe`."""
    return Decoder(replace(TINY, **overrides), None)


def build_model(cfg: ModelConfig) -> Decoder:
    """The model `cfg` names; safe under `torch.device("meta")` (then to_empty + init_weights)."""
    return Decoder(cfg.arch(), cfg.moe if cfg.is_moe else None, cfg.ce_chunk_tokens, cfg.attention, cfg.eos_id)


def init_weights(model: Decoder, std: float = 0.02) -> None:
    """Initialise every parameter and rebuild the RoPE cache, in place, on the model's device.

    Linear and embedding weights ~ N(0, std), biases 0, norms 1; other modules with parameters
    of their own (experts, a router's prior) define `init_params(std)`. Deterministic given
    torch.manual_seed. Raises if a parameter has no rule, so a new router cannot be left as
    to_empty's garbage.
    """
    device = model.tok_embeddings.weight.device
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.scale)
        elif hasattr(module, "init_params"):
            module.init_params(std)
        if hasattr(module, "rope_init"):  # non-persistent cos/sin cache: garbage after to_empty
            with torch.device(device):
                module.rope_init()
        done.update(id(p) for p in module.parameters(recurse=False))
    missing = [name for name, p in model.named_parameters() if id(p) not in done]
    if missing:
        raise RuntimeError(f"init_weights has no rule for {missing}: give their module an init_params(std)")


def count_params(model: Decoder) -> tuple[int, int]:
    """(total, active per token). Tied embeddings count once; a token uses all non-expert
    parameters and `router.active_experts` of each MoE layer's E experts."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoE):
            expert_params = sum(p.numel() for p in module.experts.parameters())
            active = module.router.active_experts(module.cfg)
            inactive += expert_params * (module.cfg.num_experts - active) // module.cfg.num_experts
    return total, total - inactive


def expert_stats(model: Decoder) -> dict[str, Tensor]:
    """The latest forward's expert load: tokens_per_expert [L, E] (top-k: routed slots, summing
    to B*S*K per layer; ioe: soft counts summing to B*S) and router_entropy [L] (nats).
    Empty for a dense model or before the first forward."""
    if model.tokens_per_expert is None:
        return {}
    return {"tokens_per_expert": model.tokens_per_expert, "router_entropy": model.router_entropy}
