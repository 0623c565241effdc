"""Validation loss per label token, overall and per pile_set_name: the trainer's evaluation (all
ranks, summed with an all-reduce) and `ioe-train eval` (one process) share `loss_sums`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ioe_train.data import EvalSet
from ioe_train.loss import per_source_sums


@torch.no_grad()
def loss_sums(model: nn.Module, eval_set: EvalSet, batch_size: int, max_batches: int,
              device: torch.device, per_document: bool = False) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(loss sum, label tokens) per source of this rank's eval samples: two [num_sources] fp64.

    `per_document`: every document scored on its own (Decoder.forward's per_document)."""
    was_training = model.training
    model.eval()
    n = len(eval_set.source_names)
    sums = torch.zeros(n, dtype=torch.float64, device=device)
    counts = torch.zeros(n, dtype=torch.float64, device=device)
    for batch in eval_set.batches(batch_size, max_batches):
        losses, _, _ = model(batch["input_ids"].to(device), batch["labels"].to(device), reduction="none",
                             per_document=per_document)  # [B, S]
        s, c = per_source_sums(losses, batch["source_ids"].to(device), n)
        sums += s
        counts += c
    model.train(was_training)
    return sums, counts


def losses_from_sums(sums: Tensor, counts: Tensor, source_names: list[str]) -> dict[str, float]:
    """{"val/loss": overall, "val/loss/<source>": per source with tokens} (the metrics.jsonl keys)."""
    out = {"val/loss": (sums.sum() / counts.sum().clamp(min=1)).item()}
    for i, name in enumerate(source_names):
        if counts[i] > 0:
            out[f"val/loss/{name}"] = (sums[i] / counts[i]).item()
    return out


def evaluate_dirs(model: nn.Module, dirs: list[Path], seq_len: int, batch_size: int, max_batches: int,
                  packing: str = "stream", per_document: bool = False, cache_dir: Path | None = None,
                  progress: bool = False, partial: bool = False) -> dict[str, float]:  # fmt: skip
    """Validation losses of `model` (on CPU, one process) on the shard directories `dirs`, packed
    by `packing` (a grouped packing's order is cached in `cache_dir`); `partial`: accept a set
    missing tasks of a --num-tasks job."""
    eval_set = EvalSet([str(d) for d in dirs], seq_len, 0, 1, packing, cache_dir, progress, partial)
    sums, counts = loss_sums(model, eval_set, batch_size, max_batches, torch.device("cpu"), per_document)
    return losses_from_sums(sums, counts, eval_set.source_names)
