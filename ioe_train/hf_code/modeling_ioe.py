"""An ioe-pretrain decoder for transformers: plain torch, the training code's math and tensor names.

B batch, S sequence length, D model dim, V vocabulary, E experts, K experts per token, H expert
hidden dim, L IoE segment length, N segments per sequence.

Written into the export by `ioe-train export --format hf`; load with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`. Every forward runs the whole
sequence (no KV cache: an IoE segment's expert depends on the previous segment). Attention is
causal; `attention_mask` is accepted for right padding only (padding after a sequence cannot
change its logits), as lm-eval-harness scores.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_ioe import IoeConfig
except ImportError:  # imported as a top-level module
    from configuration_ioe import IoeConfig

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale, self.eps).to(x.dtype)  # fp32 statistics

def rope(x: Tensor, theta: float) -> Tensor:
    """Rotary embedding (rotate-half, as Qwen2) of x [B, S, heads, d] at positions 0..S-1."""
    s, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device)[: d // 2].float() / d)  # [d/2]
    freqs = torch.outer(torch.arange(s, device=x.device, dtype=torch.float32), inv_freq)  # [S, d/2]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()  # [S, d]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2 :]
    return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).type_as(x)

class Attention(nn.Module):
    """Grouped-query attention with QKV bias (Qwen2)."""

    def __init__(self, cfg: IoeConfig) -> None:
        super().__init__()
        d, self.heads, self.kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = d // self.heads
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=True)
        self.output_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, s, _ = x.shape
        q = rope(self.q_proj(x).view(b, s, self.heads, self.head_dim), self.theta).transpose(1, 2)  # [B, h, S, d]
        k = rope(self.k_proj(x).view(b, s, self.kv_heads, self.head_dim), self.theta).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # mask [B, S, S]
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))

class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with the training code's names: w1 gate, w3 up, w2 down."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

class Experts(nn.Module):
    """E SwiGLU experts stacked: w_gate_up [E, D, 2H] ([gate | up] on the last dim), w_down [E, H, D]."""

    def __init__(self, e: int, d: int, h: int) -> None:
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(e, d, 2 * h))
        self.w_down = nn.Parameter(torch.empty(e, h, d))

    def expert(self, e: int, x: Tensor) -> Tensor:
        gate, up = (x @ self.w_gate_up[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_down[e]

class Router(nn.Module):
    """The router's parameters under the training code's names: gate [E, D]; ioe's prior [E];
    topk_bias's expert_bias [E] (selection only)."""

    def __init__(self, cfg: IoeConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        if cfg.router == "ioe":
            self.prior = nn.Parameter(torch.zeros(cfg.num_experts))
        if cfg.router == "topk_bias":
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

class MoE(nn.Module):
    def __init__(self, cfg: IoeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.expert_hidden_dim)
        shared = cfg.shared_expert_hidden_dim
        self.shared_expert = SwiGLU(cfg.hidden_size, shared) if shared else None

    def forward(self, x: Tensor, doc_start: Tensor | None) -> Tensor:
        out = self.ioe(x, doc_start) if self.cfg.router == "ioe" else self.topk(x)
        return out if self.shared_expert is None else out + self.shared_expert(x)

    def topk(self, x: Tensor) -> Tensor:
        """Each token through its K most probable experts, weighted by their probs (fp32 routing)."""
        b, s, d = x.shape
        x = x.reshape(b * s, d)  # [T, D]
        probs = F.linear(x.float(), self.router.gate.weight.float()).softmax(dim=-1)  # [T, E]
        if self.cfg.router == "topk_bias":  # the bias picks the experts, the unbiased probs weigh them
            indices = (probs + self.router.expert_bias).topk(self.cfg.num_experts_per_tok, dim=-1).indices  # [T, K]
            weights = probs.gather(-1, indices)
        else:
            weights, indices = probs.topk(self.cfg.num_experts_per_tok, dim=-1)  # [T, K]
        if self.cfg.renormalize and self.cfg.num_experts_per_tok > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.cfg.num_experts):
            token, slot = (indices == e).nonzero(as_tuple=True)
            if token.numel():
                y = self.experts.expert(e, x[token]) * weights[token, slot, None].to(x.dtype)
                out.index_add_(0, token, y)
        return out.view(b, s, d)

    def ioe(self, x: Tensor, doc_start: Tensor | None) -> Tensor:
        """Segment n of L tokens runs through sum_e g_ne W_e, g_n = softmax(gate(mean of segment
        n-1)), g_0 = softmax(prior): Interpolation of Experts, causal."""
        b, s, d = x.shape
        seg, e = self.cfg.ioe_segment_len, self.cfg.num_experts
        n = -(-s // seg)
        xs = F.pad(x, (0, 0, 0, n * seg - s)).view(b, n, seg, d)  # [B, N, L, D]
        summary = xs[:, :-1].float().mean(dim=2)  # [B, N-1, D]
        routed = F.linear(summary, self.router.gate.weight.float()).softmax(dim=-1)  # [B, N-1, E]
        prior = self.router.prior.float().softmax(dim=-1).expand(b, 1, e)  # [B, 1, E]
        if doc_start is not None and n > 1:
            starts = F.pad(doc_start, (0, n * seg - s)).view(b, n, seg)  # [B, N, L]
            reset = starts[:, :-1, 1:].any(dim=-1) | starts[:, 1:, 0]  # [B, N-1] another document began
            routed = torch.where(reset[..., None], prior, routed)
        g = torch.cat([prior, routed], dim=1).reshape(b * n, e)  # [B*N, E]
        xs = xs.reshape(b * n, seg, d)
        out = torch.empty_like(xs)
        w_gate_up, w_down = self.experts.w_gate_up, self.experts.w_down
        for a in range(0, b * n, self.cfg.ioe_merge_chunk):
            gc = g[a : a + self.cfg.ioe_merge_chunk].to(w_gate_up.dtype)  # [m, E]
            gate, up = torch.bmm(xs[a : a + len(gc)], torch.einsum("me,edh->mdh", gc, w_gate_up)).chunk(2, -1)
            out[a : a + len(gc)] = torch.bmm(F.silu(gate) * up, torch.einsum("me,ehd->mhd", gc, w_down))
        return out.view(b, n * seg, d)[:, :s]

class Block(nn.Module):
    def __init__(self, cfg: IoeConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size) if cfg.router == "dense" else MoE(cfg)
        self.sa_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None, doc_start: Tensor | None) -> Tensor:
        h = x + self.attn(self.sa_norm(x), mask)
        normed = self.mlp_norm(h)
        return h + (self.mlp(normed) if isinstance(self.mlp, SwiGLU) else self.mlp(normed, doc_start))

class Decoder(nn.Module):
    def __init__(self, cfg: IoeConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

class IoePreTrainedModel(PreTrainedModel):
    config_class = IoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:  # only for weights a checkpoint lacks
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Experts):
            nn.init.normal_(module.w_gate_up, std=std)
            nn.init.normal_(module.w_down, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.scale)
        elif isinstance(module, Router):
            if hasattr(module, "prior"):
                nn.init.zeros_(module.prior)

class IoeForCausalLM(IoePreTrainedModel, GenerationMixin):
    """Logits of the decoder; the output projection is the token embedding (tied)."""

    def __init__(self, config: IoeConfig) -> None:
        super().__init__(config)
        self.model = Decoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.tok_embeddings = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:  # fmt: skip
        """input_ids: [B, S] -> logits [B, S, V] (loss: mean next-token cross-entropy of labels)."""
        cfg = self.config
        doc_start = mask = None
        if cfg.attention == "block_causal" or cfg.ioe_document_reset:
            doc_start = torch.ones_like(input_ids, dtype=torch.bool)  # [B, S] True where a document begins
            doc_start[:, 1:] = input_ids[:, :-1] == cfg.eos_token_id
        if cfg.attention == "block_causal":
            doc = doc_start.cumsum(dim=1)  # [B, S] document index
            s = input_ids.shape[1]
            causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & (doc[:, :, None] == doc[:, None, :])  # [B, S, S]
        h = self.model.tok_embeddings(input_ids)  # [B, S, D]
        for layer in self.model.layers:
            h = layer(h, mask, doc_start if cfg.ioe_document_reset else None)
        logits = F.linear(self.model.norm(h), self.model.tok_embeddings.weight)  # [B, S, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # the whole sequence each step

__all__ = ["IoeConfig", "IoeForCausalLM", "IoePreTrainedModel"]
