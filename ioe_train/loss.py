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
from torch.autograd.function import once_differentiable


def token_ce_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the token cross-entropies in fp32 from full logits [B, S, V]; labels: [B, S].

    The reference for `linear_cross_entropy`, which never materialises the logits.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int,
                         reduction: str = "sum") -> Tensor:  # fmt: skip
    """Cross-entropy of the logits h W^T in fp32, `chunk_tokens` rows at a time.

    h: [T, D] final hidden states, weight: [V, D] output projection, labels: [T].
    reduction "sum": a differentiable fp32 scalar; "none": per-token losses [T], for evaluation
    (no gradient). Equals `token_ce_sum` on the full logits to fp32 rounding, but at most one
    chunk of logits ([chunk_tokens, V] fp32, ~0.6 GB at 1024 x 151,936) exists at a time, where
    the full logits of a 4 x 2048 micro-batch and their fp32 copy and gradient take ~15 GB.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if wants_grad and reduction == "sum":
        return _LinearCrossEntropySum.apply(h, weight, labels, chunk_tokens)
    if wants_grad:
        raise RuntimeError("linear_cross_entropy(reduction='none') is for evaluation: run it under torch.no_grad()")
    losses = torch.cat([F.cross_entropy(F.linear(hc, weight).float(), yc, reduction="none")
                        for hc, yc in zip(h.split(chunk_tokens), labels.split(chunk_tokens))])  # [T], no gradients
    return losses if reduction == "none" else losses.sum()


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_t CE(h_t W^T, y_t) with its gradients computed chunk by chunk in forward.

    A chunk's logits are freed before the next one is made, so backward has no logits to reuse:
    instead forward also computes dL/dh and dL/dW (softmax - one_hot, two more matmuls, the same
    three matmuls as plain autograd; Liger-Kernel's fused linear cross-entropy does the same), and
    backward scales them by the incoming gradient, in fp32 (the trainer's 1 / (A * B * S) is rarely a
    power of two). dL/dW accumulates in fp32 across chunks.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int) -> Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None  # [T, D]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None  # [V, D]
        for a in range(0, h.shape[0], chunk_tokens):
            hc, yc = h[a : a + chunk_tokens], labels[a : a + chunk_tokens]  # [C, D], [C]
            logits = F.linear(hc, weight).float()  # [C, V]
            lse = logits.logsumexp(dim=-1)  # [C]
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                grad = logits.sub_(lse[:, None]).exp_()  # [C, V] softmax, in place
                grad[torch.arange(len(yc), device=grad.device), yc] -= 1.0  # d CE / d logits
                del logits  # the fp32 chunk goes when its h.dtype copy is made
                grad = grad.to(h.dtype)
                if want_h:
                    torch.mm(grad, weight, out=grad_h[a : a + chunk_tokens])  # [C, D]
                if want_w:
                    grad_w += (grad.t() @ hc).float()  # [V, D]
        ctx.grads = (grad_h, grad_w, weight.dtype)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        grad_h, grad_w, w_dtype = ctx.grads
        ctx.grads = None  # freed with this backward (ctx lives as long as the graph)
        if grad_h is not None and grad_h.dtype != torch.float32:
            # The scale in fp32, one rounding after: 1/24576 rounded to bf16 is 1.0019x too large.
            grad_h = (grad_h.float() * grad_total).to(grad_h.dtype)
        elif grad_h is not None:
            grad_h = grad_h.mul_(grad_total)
        grad_w = grad_w.mul_(grad_total).to(w_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None


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
