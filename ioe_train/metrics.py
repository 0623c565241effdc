"""What a run reports: TensorBoard scalars and images, a metrics.jsonl, one console line per log step.

Only rank 0 writes; callers reduce values across ranks first. L layers, E experts.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


def memory_gib(device: torch.device) -> float:
    """Peak device memory (GPU) or peak resident set size of this process (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def heatmap(load: np.ndarray, cell: int = 24) -> np.ndarray:
    """RGB image [3, L*cell, E*cell] of each layer's share of tokens per expert (rows sum to 1).

    Colour runs dark blue (no tokens) -> green (1/E, balanced) -> yellow (>= 2/E, overloaded):
    a collapsed layer shows as one yellow cell in a dark row.
    """
    shares = load / np.maximum(load.sum(axis=1, keepdims=True), 1e-12)  # [L, E]
    x = np.clip(shares * load.shape[1] / 2, 0, 1)  # 0.5 = balanced
    stops = np.array([[0.05, 0.05, 0.35], [0.1, 0.7, 0.4], [1.0, 0.9, 0.1]])  # at 0, 0.5, 1
    t = x[..., None] * 2  # [L, E, 1] in [0, 2]
    rgb = np.where(t < 1, stops[0] + (stops[1] - stops[0]) * t, stops[1] + (stops[2] - stops[1]) * (t - 1))
    img = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)  # [L*cell, E*cell, 3]
    return img.transpose(2, 0, 1).astype(np.float32)


class MetricsLogger:
    """Rank 0's sink: TensorBoard under output_dir/tb and output_dir/metrics.jsonl.

    `start_step`: the step a resumed run continues after; records past it from the run that was
    interrupted are dropped (jsonl rewritten, TensorBoard purged) so curves show one history.
    """

    def __init__(self, output_dir: Path, rank: int, tensorboard: bool, start_step: int):
        self.rank = rank
        self.writer = None
        self.path = output_dir / "metrics.jsonl"
        if rank != 0:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start_step]  # fmt: skip
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=start_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def experts(self, step: int, load: np.ndarray, entropy: np.ndarray) -> None:
        """load: [L, E] tokens per expert summed over the step and ranks; entropy: [L] nats."""
        if self.rank != 0 or self.writer is None:
            return
        shares = load / np.maximum(load.sum(axis=1, keepdims=True), 1e-12)
        for layer in range(load.shape[0]):
            self.writer.add_scalar(f"experts/entropy/layer_{layer:02d}", entropy[layer], step)
            self.writer.add_scalar(f"experts/max_share/layer_{layer:02d}", shares[layer].max(), step)
            for e in range(load.shape[1]):
                self.writer.add_scalar(f"experts/load/layer_{layer:02d}/expert_{e:02d}", shares[layer, e], step)
        self.writer.add_image("experts/load_heatmap", heatmap(load), step)

    def line(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_line(step: int, steps: int, m: dict[str, Any]) -> str:
    """One concise log line from a step's metrics."""
    parts = [f"step {step}/{steps}",
             f"loss {m['loss/total']:.4f} (ce {m['loss/ce']:.4f} aux {m['loss/aux']:.3f} "
             f"router {m['loss/router']:.4f})",
             f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}",
             f"{m['tokens_per_s'] / 1e3:.1f}k tok/s"]  # fmt: skip
    if "mfu" in m:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    parts.append(f"mem {m['memory_gib']:.2f} GiB")
    if m.get("skipped_steps"):
        parts.append(f"skipped {int(m['skipped_steps'])}")
    return " | ".join(parts)
