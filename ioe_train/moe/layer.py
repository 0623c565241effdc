"""The MoE layer: `out, router_loss, aux_loss = moe(x)`, a drop-in for a transformer's MLP.

B batch, S sequence length, D model dim, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ioe_train.blocks import FeedForward
from ioe_train.moe.config import MoEConfig
from ioe_train.moe.experts import Experts
from ioe_train.moe.losses import ReduceFn
from ioe_train.moe.router import ROUTERS, Routed, TopKBiasRouter


def swiglu_mlp(dim: int, hidden_dim: int) -> FeedForward:
    """Qwen's MLP: down(silu(gate(x)) * up(x)), no biases."""
    return FeedForward(
        gate_proj=nn.Linear(dim, hidden_dim, bias=False),
        down_proj=nn.Linear(hidden_dim, dim, bias=False),
        up_proj=nn.Linear(dim, hidden_dim, bias=False),
    )


class MoE(nn.Module):
    """Routed experts (+ an optional always-on shared expert) behind a swappable router.

    Returns (out [B, S, D], router_loss, aux_loss); `forward_with_stats` adds the expert load.
    router_loss = z_loss_coef * mean_tokens(logsumexp(logits)^2) (ST-MoE z-loss).
    aux_loss = E * sum_e f_e * P_e (Switch load balancing), unweighted: the trainer multiplies it
    by its load_balancing_loss_weight. Which tokens f covers: `MoEConfig.aux_loss_scope`.
    """

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        if cfg.expert_hidden_dim <= 0:
            raise ValueError("expert_hidden_dim must be > 0 here; 0 (FLOP-matched) is resolved by the model builder")
        self.cfg = cfg
        router = ROUTERS[cfg.router]
        self.experts = Experts(cfg.num_experts, dim, cfg.expert_hidden_dim, path=cfg.grouped_mm,
                               init_scale=router.expert_init_scale(cfg),
                               identical=cfg.ioe_expert_init == "identical")  # fmt: skip
        self.router = router(dim, cfg)
        self.shared_expert = swiglu_mlp(dim, cfg.shared_expert_hidden_dim) if cfg.shared_expert_hidden_dim else None
        # Sums per-expert counts [E] over data-parallel ranks; set by parallelize.py (an all-reduce)
        # when aux_loss_scope == "global". Model code never imports torch.distributed.
        self.reduce_counts: ReduceFn | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        routed = self.forward_with_stats(x)
        return routed.out, routed.router_loss, routed.aux_loss

    def forward_with_stats(self, x: Tensor, doc_start: Tensor | None = None) -> Routed:
        """x: [B, S, D] -> Routed(out, router_loss, aux_loss, tokens_per_expert [E], entropy, routing).

        doc_start: [B, S] bool, True where a document begins (the decoder passes it when
        `ioe_document_reset` is set), or None; the router decides what to do with it.

        The statistics are returned, never accumulated in module state: a forward recomputed by
        activation checkpointing cannot count twice, and torch.compile sees no side effects.
        """
        reduce_counts = None
        if self.cfg.aux_loss_scope == "global":
            if self.reduce_counts is None:
                raise RuntimeError(
                    "aux_loss_scope='global' needs MoE.reduce_counts (an all-reduce over data-parallel "
                    "ranks, set by parallelize.py; an identity on a single process)"
                )
            reduce_counts = self.reduce_counts
        routed = self.router(x, self.experts, reduce_counts, doc_start)
        if self.shared_expert is not None:
            routed = routed._replace(out=routed.out + self.shared_expert(x))
        return routed


def use_local_counts(model: nn.Module) -> None:
    """Let every global-scope MoE layer of `model` without an all-reduce count this process's
    tokens only: a model run without a process group (eval, sample) then works for any scope.
    The trainer never calls this: there a missing all-reduce stays an error."""
    for module in model.modules():
        if isinstance(module, MoE) and module.reduce_counts is None:
            module.reduce_counts = _local_counts


def _local_counts(counts: Tensor) -> Tensor:
    return counts


def balances_from_load(model: nn.Module) -> bool:
    """Whether a router of `model` needs each step's expert load (`update_router_biases`)."""
    return any(isinstance(m, MoE) and isinstance(m.router, TopKBiasRouter) for m in model.modules())


@torch.no_grad()
def update_router_biases(model: nn.Module, load: Tensor) -> None:
    """Update every `topk_bias` router from its layer's load, after an optimizer step.

    load: [L, E], row l the tokens_per_expert of the l-th MoE layer (in `model.modules()` order,
    as `expert_stats`) summed over the step's micro-batches and all data-parallel ranks: every
    rank passes the same load, so the replicated biases stay equal.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if load.shape[0] != len(layers):
        raise ValueError(f"load has {load.shape[0]} rows for {len(layers)} MoE layers")
    for moe, row in zip(layers, load):
        if isinstance(moe.router, TopKBiasRouter):
            moe.router.update_bias(row)
