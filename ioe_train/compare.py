"""`ioe-train compare`: runs side by side at equal tokens, with their parameter and FLOP budgets.

Each run is summarised from its directory (config.yaml, metrics.jsonl; ioe_train.runs) at T, the
smallest number of training tokens any of the runs has seen: its last validation at or before T,
its best validation up to T, its mean throughput and its last expert balance up to T. Runs whose
training data, validation data or tokenizer differ (manifest fingerprints) are refused unless
`allow_mismatch`: their losses would not measure the same thing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ioe_train.config import TrainConfig
from ioe_train.model import build_model
from ioe_train.plan import Budget, model_budget
from ioe_train.runs import RunError, data_fingerprints, read_metrics, run_config


def run_budget(cfg: TrainConfig) -> Budget:
    """Parameters and training FLOPs per token of the run's model (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(cfg.model)
    return model_budget(model, cfg.data.seq_len)


@dataclass
class RunSummary:
    name: str  # the run directory's name
    path: str
    router: str  # "dense", "topk (2 of 8)", "ioe (8)", ...
    budget: Budget
    tokens_seen: int  # by the run's last record
    val_loss: float | None  # the last evaluation at or before the comparison's tokens
    val_tokens: int | None  # the tokens of that evaluation
    best_val_loss: float | None  # up to the comparison's tokens
    val_by_source: dict[str, float] = field(default_factory=dict)  # at val_tokens
    best_val_by_source: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float | None = None  # mean of the logged training throughput up to T
    max_load_share: float | None = None  # mean over layers; 1/E is balanced
    router_entropy: float | None = None  # nats, mean over layers
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, val loss), whole run
    fingerprints: dict[str, str] = field(default_factory=dict)


def router_label(cfg: TrainConfig) -> str:
    if not cfg.model.is_moe:
        return "dense"
    moe = cfg.model.moe
    if moe.router.startswith("topk"):
        return f"{moe.router} ({moe.top_k} of {moe.num_experts})"
    if moe.router == "ioe":
        return f"ioe ({moe.num_experts}, L {moe.ioe_segment_len}{', doc reset' if moe.ioe_document_reset else ''})"
    return f"{moe.router} ({moe.num_experts})"


def summarise(run_dir: Path, equal_tokens: int, records: list[dict[str, Any]], cfg: TrainConfig,
              fingerprints: dict[str, str]) -> RunSummary:  # fmt: skip
    """One run's row at `equal_tokens` training tokens."""
    upto = [r for r in records if r["tokens"] <= equal_tokens]
    evals = [r for r in records if "val/loss" in r]
    evals_upto = [r for r in upto if "val/loss" in r]
    speeds = [r["tokens_per_s"] for r in upto if "tokens_per_s" in r]
    balance = [r for r in upto if "experts/max_share" in r]
    summary = RunSummary(
        name=Path(run_dir).name, path=str(run_dir), router=router_label(cfg), budget=run_budget(cfg),
        tokens_seen=max(r["tokens"] for r in records), val_loss=None, val_tokens=None, best_val_loss=None,
        tokens_per_s=sum(speeds) / len(speeds) if speeds else None,
        max_load_share=balance[-1]["experts/max_share"] if balance else None,
        router_entropy=balance[-1]["experts/entropy"] if balance else None,
        curve=[(r["tokens"], r["val/loss"]) for r in evals], fingerprints=fingerprints,
    )  # fmt: skip
    if evals_upto:
        last = evals_upto[-1]
        summary.val_loss, summary.val_tokens = last["val/loss"], last["tokens"]
        summary.best_val_loss = min(r["val/loss"] for r in evals_upto)
        for key in sorted(k for r in evals_upto for k in r if k.startswith("val/loss/")):
            source = key[len("val/loss/") :]
            if key in last:
                summary.val_by_source[source] = last[key]
            summary.best_val_by_source[source] = min(r[key] for r in evals_upto if key in r)
    return summary


def compare_runs(run_dirs: list[Path], allow_mismatch: bool = False) -> tuple[int, list[RunSummary]]:
    """(T, one summary per run at T): T is the smallest tokens-seen among the runs.

    Raises RunError for an unreadable run, a run without records, or (unless `allow_mismatch`)
    runs whose data or tokenizer fingerprints differ.
    """
    loaded = []
    for run_dir in run_dirs:
        cfg = run_config(run_dir)
        records = [r for r in read_metrics(run_dir) if "tokens" in r]
        if not records:
            raise RunError(f"{run_dir}: metrics.jsonl has no record with 'tokens' (a run from an older "
                           "ioe-train, or one that has not logged yet)")  # fmt: skip
        try:
            fingerprints = data_fingerprints(cfg)
        except RunError as e:
            if not allow_mismatch:
                raise RunError(f"{run_dir}: cannot check its data ({e}); --allow-mismatch compares anyway") from None
            fingerprints = {}
        loaded.append((run_dir, cfg, records, fingerprints))
    if not allow_mismatch:
        first_dir, _, _, first = loaded[0]
        for run_dir, _, _, prints in loaded[1:]:
            for key in ("tokenizer", "train", "val"):
                if prints[key] != first[key]:
                    raise RunError(f"{run_dir}: its {key} data differs from {first_dir}'s ({prints[key] or 'none'} "
                                   f"vs {first[key] or 'none'}); --allow-mismatch compares anyway")  # fmt: skip
    equal = min(max(r["tokens"] for r in records) for _, _, records, _ in loaded)
    return equal, [summarise(d, equal, records, cfg, prints) for d, cfg, records, prints in loaded]


def _si(value: float) -> str:
    """1234567 -> "1.23M": parameter and FLOP counts from tiny CPU models to the 0.5B run."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(equal_tokens: int, runs: list[RunSummary]) -> str:
    """The comparison as Markdown: one row per run, then validation loss per source."""
    lines = [
        f"At {equal_tokens:,} training tokens (the shortest run); val loss = the last evaluation at or "
        "before that, best = the lowest up to it; load share and entropy: mean over layers of the "
        "last expert summary (balanced share = 1/E).",
        "",
        "| run | router | params (total / active) | FLOPs/token | tokens seen | val loss | best val "
        "| tokens/s | max load share | router entropy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        b = r.budget
        lines.append(
            f"| {r.name} | {r.router} | {_si(b.params_total)} / {_si(b.params_active)} "
            f"| {_si(b.flops_per_token)} | {r.tokens_seen:,} | {_fmt(r.val_loss, '.4f')} "
            f"| {_fmt(r.best_val_loss, '.4f')} | {_fmt(r.tokens_per_s, ',.0f')} "
            f"| {_fmt(r.max_load_share, '.3f')} | {_fmt(r.router_entropy, '.3f')} |"
        )
    sources = sorted({s for r in runs for s in r.val_by_source})
    if sources:
        lines += ["", "Val loss per `pile_set_name` (last / best):", "",
                  "| source | " + " | ".join(r.name for r in runs) + " |",
                  "|---|" + "---|" * len(runs)]  # fmt: skip
        for s in sources:
            cells = [f"{_fmt(r.val_by_source.get(s), '.4f')} / {_fmt(r.best_val_by_source.get(s), '.4f')}"
                     for r in runs]  # fmt: skip
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(equal_tokens: int, runs: list[RunSummary]) -> str:
    return json.dumps({"equal_tokens": equal_tokens, "runs": [asdict(r) for r in runs]}, indent=2) + "\n"


def plot(runs: list[RunSummary], path: Path, equal_tokens: int) -> Path:
    """PNG of validation loss vs training tokens, one line per run (the whole run)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    fig = Figure(figsize=(7, 4.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for r in runs:
        if r.curve:
            tokens, losses = zip(*r.curve)
            ax.plot(tokens, losses, marker="o", markersize=3, label=f"{r.name}: {r.router}")
    ax.axvline(equal_tokens, color="grey", linestyle=":", linewidth=1, label="equal tokens")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def write_comparison(run_dirs: list[Path], out: Path | None, allow_mismatch: bool = False,
                     as_json: bool = False) -> str:  # fmt: skip
    """The report (Markdown, or JSON if `as_json`); with `out`, also writes compare.md,
    compare.json and val_loss.png there."""
    equal, runs = compare_runs(run_dirs, allow_mismatch)
    md, js = markdown(equal, runs), to_json(equal, runs)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(md)
        (out / "compare.json").write_text(js)
        plot(runs, out / "val_loss.png", equal)
    return js if as_json else md
