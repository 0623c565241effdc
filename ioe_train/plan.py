"""`ioe-train plan`: parameters, FLOPs and per-rank memory of a run, before it is submitted.

B micro-batch, S seq_len, T = B * S tokens per micro-batch, D model dim, H (expert) hidden dim,
V vocabulary, L layers, E experts, K experts per token, a bytes per activation (2 for bf16,
4 for fp32), W ranks that shard the parameters.

FLOPs per token (the MFU numerator, model FLOPs: recomputation is not counted):
  6 x active parameters (forward + backward of every weight a token uses; the tied output
  projection once) + causal attention 6 * L * D * S (QK^T and AV over the S / 2 keys a causal
  kernel visits on average: half of PaLM's 12 * L * D * S, which counts the masked half too)
  + what a router adds (IoE's merges: Router.extra_flops_per_token). block_causal attention
  visits only its own document's keys, sum n^2 / 2 over documents of n tokens (`visible_keys`):
  the budget keeps causal's count as its upper bound, and the trainer's MFU uses each step's own.

Memory per rank, in bytes (each term is a row of the printed table):
  sharded state   16 P / W: fp32 parameters, fp32 gradients, AdamW's two fp32 moments; P / W
                  per parameter as parallelize.py shards it, with FSDP2's padding where the
                  sharded dim does not divide by W (8 experts on 24 ranks: 1 expert per rank)
  unsharded       FSDP2 all-gathers in the parameter dtype: the root (embedding / output, kept
                  for the whole step) and two blocks (the one running and the one prefetched),
                  or all L blocks with `parallel.reshard_after_forward: false`;
                  in backward also their unsharded gradients and, with bf16 parameters, the
                  fp32 copies that are reduce-scattered
  activations     what autograd keeps per block per token (below), x L blocks x T
  output + loss   the fused chunked cross-entropy (ioe_train.loss): dL/dW fp32 [V, D] and dL/dh
                  kept from forward to backward, one chunk of [ce_chunk_tokens, V] logits
  layer backward  one block's backward: its recomputed activations (with activation
                  checkpointing), gradient temporaries, IoE's merged experts
The per-block activation bytes were read off autograd's saved tensors (torch 2.13, torchtune
0.6.1; tests/ioe_train/test_plan.py checks them against a real block in fp32 and bf16).
The peak is the larger of the end of forward and the backward of the last block. Beyond it:
  fragmentation   FRAGMENTATION x the peak: blocks the caching allocator holds but cannot reuse
                  (its size rounding and split blocks)
  runtime reserve RUNTIME_RESERVE_GIB per GPU rank, 0 on CPU: the CUDA/HIP context (kernels,
                  cuBLAS/hipBLASLt workspaces) and NCCL/RCCL's channel buffers
A device "fits" a plan whose peak + fragmentation + runtime reserve ("required") is at most its
memory. Both allowances are estimates, not yet measured on a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ioe_train.config import TrainConfig
from ioe_train.devices import BY_KEY
from ioe_train.model import Arch, Decoder, build_model, count_params
from ioe_train.moe import ROUTERS, IoERouter, MoE, MoEConfig, TopKRouter
from ioe_train.parallelize import shard_numel

GIB = 2**30
# Of the tensors' peak: the caching allocator's reserved-but-unusable blocks (an estimate).
FRAGMENTATION = 0.10
# Per GPU rank, GiB: a CUDA/HIP context with its BLAS workspaces (~0.5) and the collective
# library's channel buffers (~0.5: NCCL_BUFFSIZE 4 MiB x send/recv x up to 64 channels/peers).
RUNTIME_RESERVE_GIB = 1.0


@dataclass(frozen=True)
class Budget:
    """Parameters and training FLOPs of a model."""

    params_total: int
    params_active: int  # per token
    params_embedding: int  # the tied embedding / output projection, V * D
    flops_per_token: float
    attention_flops_per_token: float  # causal, included in flops_per_token


def flops_per_token(model: Decoder, seq_len: int) -> float:
    """Training FLOPs per token of `model` at `seq_len` (see the module docstring)."""
    return model_budget(model, seq_len).flops_per_token


def attention_flops_per_token(arch: Arch, keys_per_token: float) -> float:
    """Training FLOPs per token of attention over `keys_per_token` keys on average: QK^T and AV
    (2 x 2 x heads x head_dim per key) forward, x 3 with backward, in each of the L blocks."""
    return 12.0 * arch.num_layers * arch.num_heads * (arch.dim // arch.num_heads) * keys_per_token


def visible_keys(doc_start: Tensor) -> Tensor:
    """The (query, key) pairs block-causal attention computes: sum over documents of n^2 / 2
    (a whole window is causal's S^2 / 2, the budget's S / 2 keys per token).

    doc_start: [B, S] bool, True where a document begins (position 0 always). Returns a float64
    scalar tensor (summed over micro-batches and ranks by the trainer, no host sync here).
    """
    b, s = doc_start.shape
    offset = torch.arange(b, device=doc_start.device)[:, None] * s  # [B, 1]: documents of row i
    doc = doc_start.long().cumsum(dim=1) - 1 + offset  # [B, S] a distinct id per document
    n = torch.bincount(doc.flatten(), minlength=b * s).double()  # [B * S] tokens per document
    return (n * n).sum() / 2


def model_budget(model: Decoder, seq_len: int) -> Budget:
    arch = model.arch
    total, active = count_params(model)
    # causal: S / 2 keys per token; block_causal visits fewer (`visible_keys`, counted per step by
    # the trainer), so this is its upper bound
    attention = attention_flops_per_token(arch, seq_len / 2)
    extra = 0.0
    for module in model.modules():
        if isinstance(module, MoE):
            hidden = module.experts.w_down.shape[1]
            extra += ROUTERS[module.cfg.router].extra_flops_per_token(module.cfg, arch.dim, hidden)
    return Budget(total, active, arch.vocab_size * arch.dim, 6.0 * active + attention + extra, attention)


def _is_topk(moe: MoEConfig) -> bool:
    """Whether `moe` dispatches tokens (TopKRouter and its subclasses) or merges experts (IoE);
    the memory model knows these two kinds of router only."""
    router = ROUTERS[moe.router]
    if not issubclass(router, (TopKRouter, IoERouter)):
        raise ValueError(f"model.moe.router: {moe.router!r} is neither a top-k nor an IoE router: "
                         "ioe-train plan has no memory model for it")  # fmt: skip
    return issubclass(router, TopKRouter)


def activation_bytes_per_token(arch: Arch, moe: MoEConfig | None, a: int, checkpointing: str) -> float:
    """Bytes autograd keeps per token for one block until its backward (a: activation bytes)."""
    d, heads = arch.dim, arch.num_heads
    topk = moe is not None and _is_topk(moe)
    if checkpointing == "full":  # the block input + the router's kept top-k (values and indices)
        return a * d + (12 * moe.top_k if topk else 0)
    if checkpointing == "selective":  # + attention's output and logsumexp
        return a * d + a * d + 4 * heads + (12 * moe.top_k if topk else 0)
    norms = 2 * (8 * d + 4)  # per RMSNorm: fp32 input, fp32 normed, rstd
    attention = a * d + 4 * a * d + 4 * heads  # normed input; q, k, v (GQA-expanded), out; lse
    if moe is None:
        return norms + attention + a * d + 4 * a * arch.hidden_dim  # normed input; gate, up, silu, h
    hidden = moe.expert_hidden_dim
    if topk:  # fp32 router input; per slot: gathered x, gate+up, silu, h, output, scattered output
        mlp = 4 * d + moe.top_k * (3 * a * d + 4 * a * hidden + 28 + a) + 8 * moe.num_experts + 8
    else:  # IoE: the padded input; per segment its summary and weights
        mlp = a * d + (4 * d + 12 * moe.num_experts) / moe.ioe_segment_len
    if moe.shared_expert_hidden_dim:  # its normed input is the router's fp32 one, unless bf16
        mlp += (a * d if a != 4 else 0) + 4 * a * moe.shared_expert_hidden_dim
    return norms + attention + mlp


def _backward_work_bytes(arch: Arch, moe: MoEConfig | None, a: int, tokens: int) -> float:
    """Transient bytes of one block's backward beyond its saved activations."""
    d = arch.dim
    if moe is None:
        return tokens * a * (3 * arch.hidden_dim + 3 * d)
    h = moe.expert_hidden_dim
    if _is_topk(moe):
        return tokens * a * (3 * moe.top_k * h + 3 * moe.top_k * d)
    # IoE: a chunk's merged experts and their gradients, its activations, and the E experts'
    # gradients summed in fp32 (Experts.merged_swiglu).
    chunk_acts = moe.ioe_merge_chunk * moe.ioe_segment_len * 6 * h * a
    return ioe_merged_bytes(moe, d, a) + chunk_acts + moe.num_experts * 3 * d * h * (4 + a) + tokens * a * 3 * d


def ioe_merged_bytes(moe: MoEConfig | None, dim: int, a: int) -> float:
    """IoE's transient merged experts and their gradients in one block's backward (0 for top-k)."""
    if moe is None or _is_topk(moe):
        return 0.0
    return 2 * moe.ioe_merge_chunk * 3 * dim * moe.expert_hidden_dim * a


@dataclass
class Plan:
    """What `ioe-train plan` prints; `asdict` gives its stable JSON keys."""

    model: str
    router: str  # "dense" for a dense model
    params_total: int
    params_active: int
    params_embedding: int
    flops_per_token: float
    attention_flops_per_token: float
    seq_len: int
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    tokens_per_step: int
    param_dtype: str
    activation_checkpointing: str
    replicate_degree: int  # HSDP replicas (parallel.replicate_degree); parameters shard over W / it
    memory_gib: dict[str, float]  # per rank, by component (module docstring)
    peak_gib_per_rank: float  # of the tensors
    fragmentation_gib: float  # FRAGMENTATION x the peak
    runtime_reserve_gib: float  # context and collective buffers (0 on CPU)
    required_gib_per_rank: float  # peak + fragmentation + runtime reserve: what must fit
    device: str
    device_gib: float
    fits: bool
    max_micro_batch_size: int  # the largest whose requirement fits device_gib (0: none)
    mfu: float
    step_time_s: float | None  # at `mfu` of the device's peak bf16 FLOP/s (None on CPU: no peak)
    tokens_per_s: float | None


def memory_per_rank(cfg: TrainConfig, model: Decoder, shard: int, a: int, micro_batch: int) -> dict[str, float]:
    """Bytes per rank by component (module docstring) for `micro_batch` samples per forward."""
    arch = model.arch
    moe = model.layers[0].mlp.cfg if isinstance(model.layers[0].mlp, MoE) else None
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.layers[0].parameters())
    root = total - arch.num_layers * layer
    tokens = micro_batch * cfg.data.seq_len
    reduce_copy = 4 if a != 4 else 0  # bf16 gradients are reduce-scattered in fp32
    ac = cfg.parallel.activation_checkpointing
    v, d, chunk = arch.vocab_size, arch.dim, min(model.ce_chunk_tokens, tokens)
    # Every block's saved tensors, and the final RMSNorm's (fp32 input and normed, rstd).
    acts = arch.num_layers * tokens * activation_bytes_per_token(arch, moe, a, ac) + tokens * (8 * d + 4)
    recompute = 0.0 if ac == "none" else tokens * activation_bytes_per_token(arch, moe, a, "none")
    ce_kept = v * d * 4 + tokens * d * a  # dL/dW fp32 and dL/dh, forward to backward
    ce_chunk = chunk * v * (8 + (2 * a if a != 4 else 0)) + v * d * (a + reduce_copy)
    # Gathered blocks: the running one and the prefetched one, or with reshard_after_forward
    # false every block, each kept from its forward to its backward.
    gathered = 2 if cfg.parallel.reshard_after_forward else arch.num_layers
    unsharded = root * a + min(gathered, arch.num_layers) * layer * a
    backward = root * a + layer * (a + reduce_copy) + recompute + _backward_work_bytes(arch, moe, a, tokens)
    sharded = shard_numel(model, shard)  # total / shard, plus FSDP2's padding of uneven shards
    state = 16 * sharded  # fp32 parameters, gradients, AdamW's two moments
    rows = {
        "sharded parameters (fp32)": 4 * sharded,
        "gradients (fp32, sharded)": 4 * sharded,
        "optimizer states (AdamW, fp32)": 8 * sharded,
        "unsharded parameters (FSDP)": unsharded,
        "activations": acts,
        "output + loss": ce_kept + ce_chunk,
        "layer backward": backward,
    }
    ioe = ioe_merged_bytes(moe, d, a)
    if ioe:
        rows["  of which IoE merged experts"] = ioe
    forward_end = state + unsharded + acts + ce_kept + ce_chunk
    backward_peak = state + unsharded + acts + backward  # the loss's buffers are spent by then
    rows["peak"] = max(forward_end, backward_peak)
    return rows


def plan(cfg: TrainConfig, nproc_per_node: int = 1, nnodes: int = 1, device: str = "mi250x",
         device_gib: float | None = None, mfu: float = 0.4) -> Plan:  # fmt: skip
    """The plan of `cfg` on nnodes x nproc_per_node ranks of `device` (a key of devices.BY_KEY,
    or "cpu": fp32 by default; then give `device_gib`)."""
    if device != "cpu" and device not in BY_KEY:
        raise ValueError(f"--device: {device!r} is not one of cpu, {', '.join(BY_KEY)}")
    if device == "cpu" and device_gib is None:
        raise ValueError("--device cpu needs --device-gib (the host memory per rank)")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu: {mfu} is not in (0, 1]")
    world = nproc_per_node * nnodes
    replicas = cfg.parallel.replicate_degree
    if world % replicas:
        raise ValueError(f"parallel.replicate_degree: {replicas} does not divide the {world} ranks")
    shard = world // replicas  # HSDP shards within a replica: its memory is that of `shard` ranks
    with torch.device("meta"):
        model = build_model(cfg.model)
    budget = model_budget(model, cfg.data.seq_len)
    mp = cfg.parallel.mixed_precision
    a = 2 if mp == "bf16" or (mp == "auto" and device != "cpu") else 4
    gib = device_gib if device_gib is not None else BY_KEY[device].memory_gib
    reserve = RUNTIME_RESERVE_GIB * GIB if device != "cpu" else 0.0

    def required(micro_batch: int) -> dict[str, float]:
        rows = memory_per_rank(cfg, model, shard, a, micro_batch)
        rows["fragmentation allowance"] = FRAGMENTATION * rows["peak"]
        rows["runtime reserve (context, NCCL/RCCL)"] = reserve
        rows["required"] = rows["peak"] + rows["fragmentation allowance"] + reserve
        return rows

    mem = required(cfg.micro_batch_size)
    fitting = _largest(lambda b: required(b)["required"] <= gib * GIB)
    tokens = world * cfg.grad_accum_steps * cfg.micro_batch_size * cfg.data.seq_len
    peak_flops = BY_KEY[device].bf16_flops if device != "cpu" else None
    step = budget.flops_per_token * tokens / (world * peak_flops * mfu) if peak_flops else None
    router = cfg.model.moe.router if cfg.model.is_moe else "dense"
    return Plan(
        model=cfg.model.name, router=router, **asdict(budget), seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.micro_batch_size, grad_accum_steps=cfg.grad_accum_steps, world_size=world,
        tokens_per_step=tokens, param_dtype="bf16" if a == 2 else "fp32",
        activation_checkpointing=cfg.parallel.activation_checkpointing, replicate_degree=replicas,
        memory_gib={k: v / GIB for k, v in mem.items()}, peak_gib_per_rank=mem["peak"] / GIB,
        fragmentation_gib=mem["fragmentation allowance"] / GIB, runtime_reserve_gib=reserve / GIB,
        required_gib_per_rank=mem["required"] / GIB, device=device, device_gib=gib,
        fits=mem["required"] <= gib * GIB,
        max_micro_batch_size=fitting, mfu=mfu, step_time_s=step, tokens_per_s=tokens / step if step else None,
    )  # fmt: skip


def _largest(fits, cap: int = 1 << 14) -> int:
    """The largest b in [0, cap] with fits(b), for a `fits` true up to some b and false after."""
    lo, hi = 0, 1
    while hi <= cap and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def format_plan(p: Plan) -> str:
    """The human-readable table."""
    fit = "fits" if p.fits else "does NOT fit"
    hsdp = f", HSDP {p.replicate_degree} x {p.world_size // p.replicate_degree}" if p.replicate_degree > 1 else ""
    lines = [
        f"{p.model} ({p.router}) on {p.world_size} x {p.device} ({p.device_gib:g} GiB each{hsdp}), "
        f"{p.param_dtype} parameters, activation checkpointing {p.activation_checkpointing}",
        f"parameters        {p.params_total / 1e6:,.1f}M total, {p.params_active / 1e6:,.1f}M active per token, "
        f"{p.params_embedding / 1e6:,.1f}M embedding (tied)",
        f"FLOPs per token   {p.flops_per_token / 1e9:,.2f} G (6 x active + causal attention "
        f"{p.attention_flops_per_token / 1e9:,.2f} G{' + IoE merges' if p.router == 'ioe' else ''})",
        f"tokens per step   {p.tokens_per_step:,} = {p.world_size} ranks x {p.grad_accum_steps} accumulation x "
        f"{p.micro_batch_size} x {p.seq_len}",
        f"memory per rank at micro-batch {p.micro_batch_size} (GiB):",
    ]  # fmt: skip
    for key, value in p.memory_gib.items():
        lines.append(f"  {key:<36} {value:8.2f}")
    lines.append(f"  -> {fit} in {p.device_gib:g} GiB; largest micro-batch that fits: {p.max_micro_batch_size}")
    if p.step_time_s is not None:
        lines.append(f"step time at {p.mfu:.0%} MFU: {p.step_time_s:.2f} s ({p.tokens_per_s / 1e3:,.0f}k tokens/s "
                     f"over {p.world_size} ranks)")  # fmt: skip
    return "\n".join(lines)

