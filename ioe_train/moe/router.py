"""Routers: how the tokens of a sequence use the E experts. The one place to try a new idea.

B batch, S sequence length, T = B * S tokens, D model dim, E experts, K experts per token,
L IoE segment length, N = ceil(S / L) segments per sequence.

A router gets the layer input and the stacked experts and returns a `Routed`: the output and its
losses and statistics. It may dispatch tokens to experts (`TopKRouter`) or merge expert
parameters (`IoERouter`). To add one: subclass `Router`, add it to `ROUTERS`, select it with
`MoEConfig.router`. Its rules: stay causal (position t's output may depend on tokens <= t only),
route identically when re-run on the same input and RNG state (activation checkpointing recomputes
the forward), return zeros for a loss that does not apply, honour `routing_override` and report
the routing it applied (`Routing`; the diagnostics of ioe_train/diagnostics.py read both).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ioe_train.moe.experts import Experts
from ioe_train.moe.losses import ReduceFn, entropy, load_balancing_loss, z_loss

if TYPE_CHECKING:
    from ioe_train.moe.config import MoEConfig


# Values of `Router.routing_override` other than None (route as trained); see `Router`.
ROUTING_OVERRIDES = ("uniform", "shuffle")


class Routing(NamedTuple):
    """Which experts each routed item used. Items: tokens (top-k) or segments of L tokens (IoE).

    M items per sequence, J experts per item (top-k: its K; IoE: all E). Detached views of the
    forward's own tensors: returning them costs nothing.
    """

    probs: Tensor  # [B, M, E] the router's own distribution (top-k: softmax; IoE: g), before any override
    indices: Tensor  # [B, M, J] the experts the item used
    weights: Tensor  # [B, M, J] their weights on outputs (top-k) or on parameters (IoE), as applied
    share: Tensor  # [B, M, J] their shares of the item's load, summing to 1: top-k 1/K each, IoE g
    routed: Tensor  # [B, M] bool: decided from the input (False: IoE segments that take the prior)
    span: int  # tokens per item: 1 (top-k) or L (IoE; a sequence's last segment may be shorter)


class Routed(NamedTuple):
    """What a router returns. Losses are fp32 scalars; statistics are detached."""

    out: Tensor  # [B, S, D]
    router_loss: Tensor  # z_loss_coef * router z-loss
    aux_loss: Tensor  # load-balancing loss, unweighted (the trainer applies its weight)
    tokens_per_expert: Tensor  # [E] fp32: how much of this micro-batch's tokens each expert took
    entropy: Tensor  # mean entropy of the routing distributions, nats
    routing: Routing  # the routing this forward applied


class Router(nn.Module, ABC):
    """Interface of a router: `routed = router(x, experts, reduce_counts, doc_start)`.

    Routing interventions, for diagnostics only: `routing_override` is None (route as trained)
    unless `ioe_train.diagnostics.routing_override` sets it for the length of a `with` block. forward
    then computes its routing and losses as usual but applies instead, item by item:
    - "uniform": a routing that ignores the input and favours no expert (top-k: K experts drawn
      uniformly for each token, weights 1/K; IoE: g = 1/E for every segment, segment 0 included);
    - "shuffle": the routed items' own decisions permuted across the batch's routed items: routing
      keeps its distribution and loses its link to the input.
    Draws come from `override_generator`. `Routed.routing` reports what was applied.
    """

    def __init__(self) -> None:
        super().__init__()
        self.routing_override: str | None = None  # None or one of ROUTING_OVERRIDES

    @classmethod
    @abstractmethod
    def active_experts(cls, cfg: MoEConfig) -> int:
        """Experts' worth of FLOPs (and parameters) that one token uses."""

    @classmethod
    def expert_init_scale(cls, cfg: MoEConfig) -> float:
        """Factor on the experts' init std, so that what a token uses starts at a dense MLP's scale."""
        return 1.0

    @classmethod
    def extra_flops_per_token(cls, cfg: MoEConfig, dim: int, hidden_dim: int) -> float:
        """Training FLOPs (forward + backward) per token beyond 6 x the active parameters."""
        return 0.0

    @abstractmethod
    def forward(self, x: Tensor, experts: Experts, reduce_counts: ReduceFn | None,
                doc_start: Tensor | None = None) -> Routed:  # fmt: skip
        """x: [B, S, D]. reduce_counts sums per-expert counts over data-parallel ranks, or is None.
        doc_start: [B, S] bool, True where a document begins, or None (routers may ignore it)."""


def _jitter(x: Tensor, amount: float, training: bool) -> Tensor:
    """Switch-Transformer router noise: x * U(1 - amount, 1 + amount), in training only."""
    if not training or amount == 0.0:
        return x
    return x * torch.empty_like(x).uniform_(1.0 - amount, 1.0 + amount)


def override_generator(device: torch.device) -> torch.Generator:
    """The RNG of routing overrides, seeded 0 at every forward: an intervention repeats exactly (the
    same draws in every layer and in every batch of equal size) and torch's own RNG is untouched."""
    return torch.Generator(device=device).manual_seed(0)


def _unknown_override(value: str) -> ValueError:
    return ValueError(f"routing_override must be None or one of {ROUTING_OVERRIDES}, got {value!r}")


def _count(indices: Tensor, num_experts: int) -> Tensor:
    """Occurrences of each expert id in `indices`: [E] int64 (static shape, unlike bincount)."""
    flat = indices.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class TopKRouter(Router):
    """Token choice top-K softmax gating (Mixtral, Qwen-MoE); dropless.

    probs = softmax(x W_r); each token runs through its K most probable experts and its output is
    sum_k w_k expert_k(x), with w the top-K probs (renormalised to sum to 1 if `renormalize`).
    No token is dropped for capacity, so a token's output never depends on other tokens.
    Load-balancing statistics count the T * K routed slots of this micro-batch (all B sequences
    together), or of all data-parallel ranks when `reduce_counts` is given.
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.top_k = cfg.top_k
        self.renormalize = cfg.renormalize
        self.z_loss_coef = cfg.z_loss_coef
        self.jitter = cfg.jitter

    @classmethod
    def active_experts(cls, cfg: MoEConfig) -> int:
        return cfg.top_k

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: [T, D] -> logits [T, E], probs [T, E], weights [T, K] (fp32), indices [T, K]."""
        x = _jitter(x, self.jitter, self.training)
        # fp32 routing: bf16 logits flip near-tied top-k choices between forward and recompute.
        logits = F.linear(x.float(), self.gate.weight.float())  # [T, E]
        probs = logits.softmax(dim=-1)  # [T, E]
        weights, indices = self.select(probs)  # [T, K], [T, K]
        if self.renormalize and self.top_k > 1:  # K = 1: w would be 1, and the gate get no gradient
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, indices

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """probs: [T, E] -> the K largest probs [T, K] and their experts [T, K]."""
        return probs.topk(self.top_k, dim=-1)

    def override(self, weights: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The routing `routing_override` asks for (see Router) in place of weights, indices [T, K]."""
        t, k = indices.shape
        gen = override_generator(indices.device)
        if self.routing_override == "uniform":
            draws = torch.rand(t, self.gate.out_features, generator=gen, device=indices.device)  # [T, E]
            return torch.full_like(weights, 1.0 / k), draws.topk(k, dim=-1).indices  # K distinct experts each
        if self.routing_override == "shuffle":
            perm = torch.randperm(t, generator=gen, device=indices.device)  # [T]
            return weights[perm], indices[perm]
        raise _unknown_override(self.routing_override)

    def forward(self, x: Tensor, experts: Experts, reduce_counts: ReduceFn | None,
                doc_start: Tensor | None = None) -> Routed:  # fmt: skip
        b, s, d = x.shape
        k = self.top_k
        x = x.reshape(b * s, d)  # [T, D]
        logits, probs, weights, indices = self.route(x)
        if self.routing_override is not None:
            weights, indices = self.override(weights, indices)
        flat = indices.reshape(-1)  # [T*K] expert of each (token, slot)
        order = torch.argsort(flat, stable=True)  # [T*K] slots grouped by expert, token order kept
        counts = _count(flat, experts.num_experts)  # [E]
        y = experts(x[order // self.top_k], counts)  # [T*K, D] in expert order
        y = torch.zeros_like(y).index_copy(0, order, y)  # [T*K, D] back in (token, slot) order
        out = (y.view(b * s, self.top_k, d) * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)  # [T, D]
        return Routed(
            out=out.view(b, s, d),
            router_loss=self.z_loss_coef * z_loss(logits),
            aux_loss=load_balancing_loss(probs, counts, reduce_counts),
            tokens_per_expert=counts.float(),
            entropy=entropy(probs).detach(),
            routing=Routing(
                probs=probs.detach().view(b, s, -1),
                indices=indices.view(b, s, k),
                weights=weights.detach().view(b, s, k),
                share=weights.new_full((), 1.0 / k).expand(b, s, k),
                routed=torch.ones((), dtype=torch.bool, device=x.device).expand(b, s),
                span=1,
            ),
        )


class IoERouter(Router):
    """Interpolation of Experts: mix expert parameters, not expert outputs (SMEAR, Lory).

    Each sequence is cut into segments of L tokens. Segment s runs through one merged SwiGLU
    W_s = sum_e g_{s,e} W_e whose weights come from the previous segment only, which keeps it
    causal: g_s = softmax(W_r mean(h over segment s-1)) for s >= 1 (Lory), and g_0 = softmax of
    a learned prior (zeros at init = uniform). Cost: a segment's merge is E * 3DH multiply-adds
    against its L * 3DH of matmul. Memory: `ioe_merge_chunk` merged experts at a time, none kept
    for backward (Experts.merged_swiglu).

    Init (`ioe_expert_init`): a uniform merge of E independent N(0, s^2) experts has std
    s / sqrt(E), and a SwiGLU's output scales with the cube of its weights' scale (E^-1.5 = 1/22.6
    at E = 8). "sqrt_e" (default) initialises the experts with std s * sqrt(E): the merged expert
    at init is N(0, s^2), the scale of the dense MLP of the same width. (Exact for the uniform
    merge of init; as routing sharpens towards one expert the merged weights approach that
    expert's std s * sqrt(E).) "unit": std s, the merge starts E^-1.5 smaller in output.
    "identical": every expert is one N(0, s^2) draw, so any merge is that expert at init; the
    experts separate because each receives sum over segments of g_{s,e} dW_s, and g differs per
    segment and expert.

    With `ioe_document_reset` the model passes doc_start [B, S] (True where a document starts) and
    a segment whose predecessor holds (part of) another document is routed by the prior too: the
    first whole segment of every packed document starts from the prior, as segment 0 does.

    Losses are over the B * (N - 1) routed segments (zero if N = 1; the prior is not routed):
    z-loss of their logits, and the Switch loss with f_e the fraction of routed segments whose
    largest weight is e (over this micro-batch, or all ranks with `reduce_counts`). Statistics:
    tokens_per_expert_e = sum over tokens of g_e (soft counts summing to T); entropy of g over
    all B * N segments. Routing overrides replace g after the losses (Router).
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        self.prior = nn.Parameter(torch.empty(cfg.num_experts))  # [E] logits of segment 0
        self.segment_len = cfg.ioe_segment_len
        self.merge_chunk = cfg.ioe_merge_chunk
        self.z_loss_coef = cfg.z_loss_coef
        self.jitter = cfg.jitter

    @classmethod
    def expert_init_scale(cls, cfg: MoEConfig) -> float:
        return cfg.num_experts**0.5 if cfg.ioe_expert_init == "sqrt_e" else 1.0  # see the class docstring

    @classmethod
    def extra_flops_per_token(cls, cfg: MoEConfig, dim: int, hidden_dim: int) -> float:
        # A segment's merge: 2 * E * 3DH forward; backward sums the merged experts' gradients onto
        # the E experts and the merge weights (2 * E * 3DH each). Re-merging in backward is
        # recomputation (like activation checkpointing) and is not counted.
        return 3 * 2 * cfg.num_experts * 3 * dim * hidden_dim / cfg.ioe_segment_len

    def init_params(self, std: float) -> None:
        nn.init.zeros_(self.prior)

    @classmethod
    def active_experts(cls, cfg: MoEConfig) -> int:
        return 1

    def override(self, g: Tensor, routed: Tensor) -> Tensor:
        """The merge weights `routing_override` asks for (see Router) in place of g [B, N, E];
        routed [B, N] bool marks the segments routed from their predecessor."""
        if self.routing_override == "uniform":
            return torch.full_like(g, 1.0 / g.shape[-1])
        if self.routing_override == "shuffle":
            flat = g.reshape(-1, g.shape[-1])  # [B*N, E]
            items = routed.reshape(-1).nonzero().squeeze(1)  # [R] the routed segments
            perm = torch.randperm(len(items), generator=override_generator(g.device), device=g.device)  # [R]
            return flat.index_copy(0, items, flat[items[perm]]).view_as(g)
        raise _unknown_override(self.routing_override)

    def forward(self, x: Tensor, experts: Experts, reduce_counts: ReduceFn | None,
                doc_start: Tensor | None = None) -> Routed:  # fmt: skip
        b, s, d = x.shape
        seg = self.segment_len
        n = -(-s // seg)
        e = experts.num_experts
        xs = F.pad(x, (0, 0, 0, n * seg - s)).view(b, n, seg, d)  # [B, N, L, D], zero-padded tail
        summary = xs[:, :-1].float().mean(dim=2)  # [B, N-1, D] segments 0..N-2, all full
        summary = _jitter(summary, self.jitter, self.training)
        logits = F.linear(summary, self.gate.weight.float()).reshape(-1, e)  # [B*(N-1), E]
        probs = logits.softmax(dim=-1)  # [B*(N-1), E]
        prior = self.prior.float().softmax(dim=-1).expand(b, 1, e)  # [B, 1, E]
        routed = probs.view(b, n - 1, e)  # [B, N-1, E] weights of segments 1..N-1
        keep = None  # [B*(N-1)] 1.0 where a segment is routed by its predecessor
        from_input = torch.ones(b, n, dtype=torch.bool, device=x.device)  # [B, N] not routed by the prior
        from_input[:, 0] = False
        if doc_start is not None and n > 1:
            reset = _document_resets(doc_start, seg, n)  # [B, N-1]
            routed = torch.where(reset[..., None], prior, routed)
            keep = (~reset).reshape(-1).float()
            from_input[:, 1:] = ~reset
        g = torch.cat([prior, routed], dim=1)  # [B, N, E] weights of segment s
        decided = g
        if self.routing_override is not None:
            g = self.override(g, from_input)

        out = experts.merged_swiglu(xs.reshape(b * n, seg, d), g.reshape(b * n, e), self.merge_chunk)  # [B*N, L, D]
        out = out.view(b, n * seg, d)[:, :s]  # [B, S, D]

        zero = x.new_zeros((), dtype=torch.float32)
        if n > 1:
            router_loss = self.z_loss_coef * z_loss(logits, keep)
            top = probs.argmax(dim=-1)  # [B*(N-1)]
            if keep is None:
                counts = _count(top, e)
            else:  # reset segments are routed by the prior: they count as segment 0 does, not at all
                counts = torch.zeros(e, dtype=torch.float32, device=x.device).scatter_add_(0, top, keep)
            aux_loss = load_balancing_loss(probs, counts, reduce_counts, keep)
        else:
            router_loss, aux_loss = zero, zero
        seg_tokens = torch.full((n,), seg, dtype=torch.float32, device=x.device)  # [N]
        seg_tokens[-1] = s - (n - 1) * seg
        tokens_per_expert = (g.detach() * seg_tokens[:, None]).sum(dim=(0, 1))  # [E]
        routing = Routing(probs=decided.detach(), indices=torch.arange(e, device=x.device).expand(b, n, e),
                          weights=g.detach(), share=g.detach(), routed=from_input, span=seg)  # fmt: skip
        return Routed(out, router_loss, aux_loss, tokens_per_expert, entropy(g.reshape(-1, e)).detach(), routing)


def _document_resets(doc_start: Tensor, seg: int, n: int) -> Tensor:
    """Which of segments 1..N-1 must not be routed by their predecessor: [B, N-1] bool.

    doc_start: [B, S]. Segment s (tokens [sL, sL + L)) is routed by the mean of segment s - 1 only
    if segment s - 1 and token sL belong to one document: no document starts in (sL - L, sL].
    Depends on doc_start up to sL, itself set by token sL - 1: still causal.
    """
    b, s = doc_start.shape
    starts = F.pad(doc_start, (0, n * seg - s)).view(b, n, seg)  # [B, N, L], the padded tail False
    return starts[:, :-1, 1:].any(dim=-1) | starts[:, 1:, 0]  # [B, N-1]


class TopKBiasRouter(TopKRouter):
    """Top-K gating with auxiliary-loss-free load balancing (DeepSeek-V3; torchtitan's
    load_balance_coeff).

    A per-expert bias b [E] is added to the probs for the top-K selection only: the gate weights
    are the unbiased probs of the chosen experts, so b decides which experts run but never scales
    an output, and no balancing gradient competes with the LM loss. b is no parameter: after each
    optimizer step the trainer calls `update_bias` with the step's global load (all micro-batches,
    all ranks), b_e += rate * sign(mean load - load_e), so an overloaded expert gets chosen less.
    b is a persistent buffer: checkpoints save it and a resumed run continues with it. The Switch
    aux_loss is still returned (as a balance statistic); `load_balancing_loss_weight: 0` makes the
    run aux-loss-free.
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__(dim, cfg)
        self.rate = cfg.bias_update_rate
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))  # [E] fp32

    def init_params(self, std: float) -> None:
        nn.init.zeros_(self.expert_bias)  # after to_empty the buffer is garbage, like a parameter

    def select(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        indices = (probs + self.expert_bias).topk(self.top_k, dim=-1).indices  # [T, K] biased choice
        return probs.gather(-1, indices), indices  # unbiased weights [T, K]

    @torch.no_grad()
    def update_bias(self, load: Tensor) -> None:
        """load: [E] routed slots per expert over one optimizer step, summed over all ranks."""
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.rate * torch.sign(load.mean() - load)


# The one place to register a router: MoEConfig.router selects a key.
ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "ioe": IoERouter,
    "topk_bias": TopKBiasRouter,
}
