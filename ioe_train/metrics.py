"""What a run reports: TensorBoard scalars, images and the resolved config, a metrics.jsonl, one
console line per log step, and optionally Weights & Biases.

Only rank 0 writes; callers reduce values across ranks first. L layers, E experts.
"""

from __future__ import annotations

import json
import resource
import secrets
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


def load_shares(load: np.ndarray) -> np.ndarray:
    """Each layer's share of its routed load per expert: [L, E], rows summing to 1."""
    return load / np.maximum(load.sum(axis=1, keepdims=True), 1e-12)


def expert_summary(load: np.ndarray, entropy: np.ndarray) -> dict[str, float]:
    """metrics.jsonl's expert balance: each layer's max load share (1/E = balanced, 1 = one
    expert takes everything; top-K counts routed slots, so K > 1 caps it at 1/K) and router
    entropy (nats; ln E = uniform), and their means over layers."""
    shares = load_shares(load)  # [L, E]
    out = {"experts/max_share": float(shares.max(axis=1).mean()), "experts/entropy": float(entropy.mean())}
    for layer in range(load.shape[0]):
        out[f"experts/max_share/layer_{layer:02d}"] = float(shares[layer].max())
        out[f"experts/entropy/layer_{layer:02d}"] = float(entropy[layer])
    return out


def heatmap_figure(load: np.ndarray) -> Any:
    """A matplotlib Figure of each layer's share of tokens per expert [L, E], with layer and
    expert labels and a colour scale (0 to at least 2/E: balanced is the middle of the scale)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    shares = load_shares(load)  # [L, E]
    layers, experts = shares.shape
    # At least 3 inches tall: a colour bar of 2 layers' height cuts its own label off.
    fig = Figure(figsize=(1.6 + 0.35 * experts, max(3.0, 1.0 + 0.25 * layers)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(f"share of tokens per expert (balanced: {1 / experts:.3f})", fontsize=10)
    image = ax.imshow(shares, cmap="viridis", vmin=0, vmax=max(2 / experts, float(shares.max())),
                      aspect="auto", interpolation="nearest")  # fmt: skip
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(0, layers, max(1, layers // 12)))
    fig.colorbar(image, ax=ax, label="share of tokens")
    return fig


# Above this many layer-experts (L x E) the per-expert load charts are off by default: 24 layers x 8
# experts would be 192 charts; the heatmap and the per-layer summaries show the same load.
MAX_AUTO_EXPERT_SCALARS = 64


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 3e-4}} -> {"optim.lr": 3e-4}; lists and None as strings (hparams take
    int, float, str and bool only)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class MetricsLogger:
    """Rank 0's sink: TensorBoard under output_dir/tb and output_dir/metrics.jsonl, and a Weights &
    Biases run when `wandb` = {"project": ..., "mode": "online" | "offline"} (wandb imported only then).

    `start_step`: the step a resumed run continues after; records past it from the run that was
    interrupted are dropped (jsonl rewritten, TensorBoard purged) so curves show one history.
    Every jsonl record also holds "tokens", the training tokens seen by its step (all ranks), so
    runs of other batch sizes or rank counts line up (`ioe-train compare`). `per_expert_scalars`:
    one TensorBoard chart per layer and expert; None = only up to MAX_AUTO_EXPERT_SCALARS of them.
    """

    def __init__(self, output_dir: Path, rank: int, tensorboard: bool, start_step: int, tokens_per_step: int,
                 per_expert_scalars: bool | None = None, wandb: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.rank = rank
        self.tokens_per_step = tokens_per_step
        self.per_expert_scalars = per_expert_scalars
        self.writer = None
        self.wandb = None
        self.path = output_dir / "metrics.jsonl"
        if rank != 0:
            return
        if wandb:
            import wandb as wandb_lib  # optional: `pip install wandb`

            output_dir.mkdir(parents=True, exist_ok=True)
            id_file = output_dir / "wandb_run_id"  # a resumed run continues its W&B run
            if not id_file.exists():
                id_file.write_text(secrets.token_hex(4))
            self.wandb = wandb_lib.init(project=wandb["project"], mode=wandb.get("mode", "online"),
                                        dir=str(output_dir), name=output_dir.name, id=id_file.read_text(),
                                        resume="allow")  # fmt: skip
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= start_step]  # fmt: skip
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=start_step + 1)

    def config(self, resolved_yaml: str, config: dict[str, Any]) -> None:
        """The run's resolved config: TensorBoard text (the YAML) and hparams (flattened keys), and
        the W&B run's config."""
        if self.rank != 0:
            return
        flat = flatten(config)
        if self.wandb is not None:
            self.wandb.config.update(flat, allow_val_change=True)
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", "```yaml\n" + resolved_yaml + "```")
        # in this run's own event file (add_hparams would start a second run directory)
        for summary in hparams(flat, {"loss/ce": 0.0, "val/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        self._append(step, values)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def experts(self, step: int, load: np.ndarray, entropy: np.ndarray) -> None:
        """load: [L, E] tokens per expert summed over the step and ranks; entropy: [L] nats.

        metrics.jsonl gets `expert_summary`; TensorBoard (and W&B) also a heatmap, and each expert's
        share where `per_expert_scalars` says so.
        """
        if self.rank != 0:
            return
        summary = expert_summary(load, entropy)
        self._append(step, summary)
        per_expert = self.per_expert_scalars
        if per_expert is None:
            per_expert = load.size <= MAX_AUTO_EXPERT_SCALARS
        shares = load_shares(load)
        if per_expert:
            summary = {**summary, **{f"experts/load/layer_{layer:02d}/expert_{e:02d}": float(shares[layer, e])
                                     for layer in range(load.shape[0]) for e in range(load.shape[1])}}  # fmt: skip
        if self.wandb is not None:
            import wandb as wandb_lib

            from matplotlib.backends.backend_agg import FigureCanvasAgg

            canvas = FigureCanvasAgg(heatmap_figure(load))  # pixels: wandb.Image(Figure) would need pyplot
            canvas.draw()
            image = wandb_lib.Image(np.asarray(canvas.buffer_rgba())[..., :3])
            self.wandb.log({**summary, "experts/load_heatmap": image}, step=step)
        if self.writer is None:
            return
        for key, value in summary.items():
            self.writer.add_scalar(key, value, step)
        self.writer.add_figure("experts/load_heatmap", heatmap_figure(load), step, close=False)

    def _append(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "tokens": step * self.tokens_per_step, **values}) + "\n")

    def line(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def duration(seconds: float) -> str:
    """3725.2 -> "1:02:05", 65 -> "1:05" (h:mm:ss, or m:ss under an hour)."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def format_line(step: int, steps: int, m: dict[str, Any], elapsed: float | None = None,
                eta: float | None = None) -> str:  # fmt: skip
    """One concise log line from a step's metrics; `elapsed` and `eta` in seconds."""
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
    if elapsed is not None:
        parts.append(f"elapsed {duration(elapsed)}" + (f" eta {duration(eta)}" if eta is not None else ""))
    return " | ".join(parts)
