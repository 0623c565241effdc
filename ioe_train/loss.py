"""The training loss: total = ce + load_balancing_loss_weight * aux_loss + router_loss.

B micro-batch samples, S seq_len, V vocabulary, A gradient-accumulation steps, W ranks.

ce is the mean over every label token of the optimizer step: all micro-batches of all ranks.
Every window is full (no padding, no ignored label), so the step has exactly W * A * B * S label
tokens and each rank can scale its own sum: a micro-batch contributes ce_sum / (A * B * S), its A
micro-batches sum to the rank's token mean, and FSDP's gradient reduction (a mean over W ranks)
makes that the global token mean. aux_loss and router_loss (already summed over layers by the
model) are averaged over the A micro-batches the same way, then over ranks by FSDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_ce_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the token cross-entropies in fp32. logits: [B, S, V], labels: [B, S]."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def microbatch_loss(ce_sum: Tensor, router_loss: Tensor, aux_loss: Tensor, *, tokens_per_rank_step: int,
                    grad_accum: int, load_balancing_loss_weight: float) -> Tensor:  # fmt: skip
    """This micro-batch's share of the step's total loss (backward it; the shares sum to total)."""
    ce = ce_sum / tokens_per_rank_step
    return ce + (load_balancing_loss_weight * aux_loss + router_loss) / grad_accum


def total_loss(ce: Tensor, router_loss: Tensor, aux_loss: Tensor, load_balancing_loss_weight: float) -> Tensor:
    """The step's loss from its parts (for logging; equals the sum of the micro-batch shares)."""
    return ce + load_balancing_loss_weight * aux_loss + router_loss


def per_source_sums(token_losses: Tensor, source_ids: Tensor, num_sources: int) -> tuple[Tensor, Tensor]:
    """(loss sum [num_sources], token count [num_sources]) of label tokens grouped by source."""
    ids = source_ids.flatten()
    sums = torch.zeros(num_sources, dtype=torch.float64, device=token_losses.device)
    sums.index_add_(0, ids, token_losses.flatten().double())
    counts = torch.bincount(ids, minlength=num_sources).double()
    return sums, counts
