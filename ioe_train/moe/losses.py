"""Router losses and routing statistics, shared by every router.

N routed items (tokens for top-k, segments for IoE), E experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# Sums per-expert counts [E] over data-parallel ranks (an all-reduce set by parallelize.py).
ReduceFn = Callable[[Tensor], Tensor]


def z_loss(logits: Tensor, keep: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over items of logsumexp(logits)^2.

    Keeps router logits small so the softmax stays out of its saturated, bf16-unstable range.
    logits: [N, E] (fp32); keep: [N] 0/1, the items that count (None: all). Returns a scalar.
    """
    z = torch.logsumexp(logits, dim=-1).square()  # [N]
    return z.mean() if keep is None else (z * keep).sum() / keep.sum().clamp(min=1.0)


def load_balancing_loss(probs: Tensor, counts: Tensor, reduce_counts: ReduceFn | None = None,
                        keep: Tensor | None = None) -> Tensor:  # fmt: skip
    """Switch-Transformer load-balancing loss E * sum_e f_e * P_e, unweighted.

    f_e = counts_e / sum(counts): the fraction of routed slots that went to expert e (no gradient).
    P_e = mean over items of probs[:, e]: the router's mean probability for e (carries the gradient).
    It is 1.0 at perfect balance (f = P = 1/E) and E when every item goes to one expert with
    probability 1. `counts` cover this micro-batch; with `reduce_counts` they are first summed over
    data-parallel ranks (global f, Megatron's global_aux_loss) while P stays local.

    probs: [N, E], counts: [E] (of the kept items), keep: [N] 0/1, the items P covers (None: all).
    Returns a scalar.
    """
    num_experts = probs.shape[-1]
    counts = counts.detach().float()
    if reduce_counts is not None:
        counts = reduce_counts(counts)
    f = counts / counts.sum().clamp(min=1.0)  # [E]
    if keep is None:
        p = probs.float().mean(dim=0)  # [E]
    else:
        p = (probs.float() * keep[:, None]).sum(dim=0) / keep.sum().clamp(min=1.0)  # [E]
    return num_experts * (f * p).sum()


def entropy(probs: Tensor) -> Tensor:
    """Mean over items of the router distribution's entropy in nats (log E = uniform). probs: [N, E]."""
    return torch.special.entr(probs.float()).sum(dim=-1).mean()
