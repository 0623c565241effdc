"""`ioe-train compare`: arms of seeds side by side at equal tokens, with their parameter and FLOP
budgets, and each arm's paired difference to a baseline with a 95% interval.

Each run is summarised from its directory (config.yaml, metrics.jsonl; ioe_train.runs) at T, the
smallest number of training tokens any of the runs has seen: its last validation at or before T,
its best validation up to T, its mean throughput and its last expert balance up to T. Runs whose
resolved configs (and data) are equal but for `seed`, `data.seed` and `output_dir` form one arm;
per arm: n, mean ± sample sd over its seeds. Against the baseline arm, the differences (arm -
baseline) of the seeds both have are paired by seed, with a Student-t interval of their mean.

Runs whose training data, validation data or tokenizer differ (manifest fingerprints) are refused
unless `allow_mismatch`: their losses would not measure the same thing. Arms that differ in how
the loss is measured (attention mask, packing, per-document eval, seq_len, eval batches, val data)
are compared, with the differences flagged.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ioe_train.config import TrainConfig
from ioe_train.model import build_model
from ioe_train.plan import Budget, model_budget
from ioe_train.runs import RunError, data_fingerprints, read_metrics, run_config
from ioe_train.stats import ci95, mean_sd

SEED_DIR = re.compile(r"seed_(\d+)")  # `ioe-train launch --seeds` writes OUTPUT_DIR/seed_N


def run_budget(cfg: TrainConfig) -> Budget:
    """Parameters and training FLOPs per token of the run's model (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(cfg.model)
    return model_budget(model, cfg.data.seq_len)


@dataclass
class RunSummary:
    name: str  # the run directory's name; "ARM/seed_N" for a run of `launch --seeds`
    path: str
    router: str  # "dense", "topk (2 of 8)", "ioe (8)", ...
    seed: str  # "N" when seed = data.seed = N, else "SEED/DATA_SEED": what arms pair by
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


@dataclass
class Arm:
    """Runs of one config that differ only in their seeds; statistics over its runs at T."""

    name: str  # the parent directory of its seed_N runs, else its first run's name
    router: str
    budget: Budget
    protocol: dict[str, str]  # how its loss is measured (`protocol`)
    runs: list[str]  # the runs' paths, by seed
    seeds: list[str]
    losses: dict[str, float]  # seed -> val loss at T (runs with an evaluation up to T)
    n: int  # len(losses)
    mean: float | None
    sd: float | None  # sample sd (ddof 1); None below 2 runs
    best_mean: float | None
    best_sd: float | None
    val_by_source: dict[str, float] = field(default_factory=dict)  # mean over its runs
    best_val_by_source: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float | None = None  # the mean over its runs of each per-run figure
    max_load_share: float | None = None
    router_entropy: float | None = None


@dataclass
class Difference:
    """arm - baseline, val loss at T, paired by seed."""

    arm: str
    baseline: str
    seeds: list[str]  # paired
    unpaired: list[str]  # "SEED (ARM only)": left out
    diffs: list[float]  # by seed
    diff_mean: float | None
    diff_sd: float | None
    ci95: tuple[float, float] | None  # Student t, n - 1 dof; None below 2 pairs
    verdict: str  # "better", "worse", "not distinguishable at n = K", "one seed: no interval"
    protocol_differences: dict[str, list[str]]  # setting -> [baseline's, arm's]


@dataclass
class Report:
    equal_tokens: int
    baseline: str
    arms: list[Arm]
    comparisons: list[Difference]  # every arm but the baseline, against it
    protocol_differences: dict[str, dict[str, str]]  # setting -> {arm: value}, where arms differ
    runs: list[RunSummary]


def router_label(cfg: TrainConfig) -> str:
    """"ioe (16, L 16)", with the packing and the attention mask where not the defaults:
    "ioe (16, L 16) · by_source · block_causal"."""
    moe = cfg.model.moe
    if not cfg.model.is_moe:
        label = "dense"
    elif moe.router.startswith("topk"):
        label = f"{moe.router} ({moe.top_k} of {moe.num_experts})"
    elif moe.router == "ioe":
        extras = [f"L {moe.ioe_segment_len}"] + ["doc reset"] * moe.ioe_document_reset
        extras += [f"init {moe.ioe_expert_init}"] * (moe.ioe_expert_init != "sqrt_e")
        label = f"ioe ({moe.num_experts}, {', '.join(extras)})"
    else:
        label = f"{moe.router} ({moe.num_experts})"
    if cfg.data.packing != "stream":
        label += f" · {cfg.data.packing}"
    if cfg.model.attention != "causal":
        label += f" · {cfg.model.attention}"
    return label


def protocol(cfg: TrainConfig, fingerprints: dict[str, str]) -> dict[str, str]:
    """What decides how a run's val loss is measured, by setting (val data: its fingerprint, or its
    directories when the fingerprint is unknown)."""
    return {
        "model.attention": cfg.model.attention,
        "data.packing": cfg.data.packing,
        "val packing": cfg.eval.packing or cfg.data.packing,
        "eval.per_document": str(cfg.eval.per_document).lower(),
        "data.seq_len": str(cfg.data.seq_len),
        "eval.max_batches": str(cfg.eval.max_batches),
        "val data": fingerprints.get("val", "")[:19] or ",".join(cfg.data.val_dirs) or "none",  # sha256:+12 hex
    }


def run_name(run_dir: Path) -> str:
    """"proxy_ioe" for runs/proxy_ioe; "proxy_ioe/seed_0" for a run of `launch --seeds`."""
    path = Path(run_dir).resolve()
    return f"{path.parent.name}/{path.name}" if SEED_DIR.fullmatch(path.name) else path.name


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Each path, or, for a directory of `launch --seeds` runs (seed_N/config.yaml, no config.yaml
    of its own), its seed_N runs by N."""
    out = []
    for path in map(Path, paths):
        seeds = [] if (path / "config.yaml").is_file() else [
            d for d in path.glob("seed_*") if SEED_DIR.fullmatch(d.name) and (d / "config.yaml").is_file()]  # fmt: skip
        out += sorted(seeds, key=lambda d: int(d.name[len("seed_") :])) or [path]
    return out


def summarise(run_dir: Path, equal_tokens: int, records: list[dict[str, Any]], cfg: TrainConfig,
              fingerprints: dict[str, str]) -> RunSummary:  # fmt: skip
    """One run's row at `equal_tokens` training tokens."""
    upto = [r for r in records if r["tokens"] <= equal_tokens]
    evals = [r for r in records if "val/loss" in r]
    evals_upto = [r for r in upto if "val/loss" in r]
    speeds = [r["tokens_per_s"] for r in upto if "tokens_per_s" in r]
    balance = [r for r in upto if "experts/max_share" in r]
    summary = RunSummary(
        name=run_name(run_dir), path=str(run_dir), router=router_label(cfg),
        seed=str(cfg.seed) if cfg.seed == cfg.data.seed else f"{cfg.seed}/{cfg.data.seed}",
        budget=run_budget(cfg), tokens_seen=max(r["tokens"] for r in records), val_loss=None,
        val_tokens=None, best_val_loss=None, tokens_per_s=sum(speeds) / len(speeds) if speeds else None,
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


def _mean(values: list[float | None]) -> float | None:
    return mean_sd([v for v in values if v is not None])[0]


def _source_means(per_run: list[dict[str, float]]) -> dict[str, float]:
    """source -> mean over the runs that have it."""
    sources = sorted({s for losses in per_run for s in losses})
    return {s: _mean([losses.get(s) for losses in per_run]) for s in sources}


def make_arm(name: str, runs: list[RunSummary], protocol_: dict[str, str]) -> Arm:
    """The arm of `runs` (one config, distinct seeds): n, mean and sd of the last and best val loss."""
    runs = sorted(runs, key=lambda r: tuple(map(int, r.seed.split("/"))))
    if len({r.seed for r in runs}) < len(runs):
        twice = next(r for r in runs if sum(o.seed == r.seed for o in runs) > 1)
        raise RunError(f"{name}: two runs with seed {twice.seed} ("
                       + ", ".join(r.path for r in runs if r.seed == twice.seed) + "): give one")  # fmt: skip
    losses = {r.seed: r.val_loss for r in runs if r.val_loss is not None}
    mean, sd = mean_sd(list(losses.values()))
    best_mean, best_sd = mean_sd([r.best_val_loss for r in runs if r.best_val_loss is not None])
    return Arm(
        name=name, router=runs[0].router, budget=runs[0].budget, protocol=protocol_, runs=[r.path for r in runs],
        seeds=[r.seed for r in runs], losses=losses, n=len(losses), mean=mean, sd=sd, best_mean=best_mean,
        best_sd=best_sd, val_by_source=_source_means([r.val_by_source for r in runs]),
        best_val_by_source=_source_means([r.best_val_by_source for r in runs]),
        tokens_per_s=_mean([r.tokens_per_s for r in runs]), max_load_share=_mean([r.max_load_share for r in runs]),
        router_entropy=_mean([r.router_entropy for r in runs]),
    )  # fmt: skip


def verdict(n: int, interval: tuple[float, float] | None) -> str:
    """Lower loss is better: "better" when the whole interval of arm - baseline is below 0."""
    if n == 0:
        return "no shared seeds"
    if interval is None:
        return "one seed: no interval"
    if interval[1] < 0:
        return "better"
    if interval[0] > 0:
        return "worse"
    return f"not distinguishable at n = {n}"


def difference(arm: Arm, baseline: Arm) -> Difference:
    """arm - baseline over the seeds both have a val loss for (paired by seed value)."""
    seeds = [s for s in arm.losses if s in baseline.losses]
    diffs = [arm.losses[s] - baseline.losses[s] for s in seeds]
    unpaired = [f"{s} ({a.name} only)" for a, b in ((baseline, arm), (arm, baseline)) for s in a.losses
                if s not in b.losses]  # fmt: skip
    diff_mean, diff_sd = mean_sd(diffs)
    interval = ci95(diffs)
    changed = {k: [baseline.protocol[k], v] for k, v in arm.protocol.items() if v != baseline.protocol[k]}
    return Difference(arm.name, baseline.name, seeds, unpaired, diffs, diff_mean, diff_sd, interval,
                      verdict(len(diffs), interval), changed)  # fmt: skip


def protocol_differences(arms: list[Arm]) -> dict[str, dict[str, str]]:
    """setting -> {arm: value} for every setting on which the arms are not all equal."""
    return {key: {a.name: a.protocol[key] for a in arms} for key in arms[0].protocol
            if len({a.protocol[key] for a in arms}) > 1}  # fmt: skip


def _arm_key(cfg: TrainConfig, fingerprints: dict[str, str]) -> tuple[TrainConfig, list[tuple[str, str]]]:
    """What runs of one arm share: the config but for its seeds and output_dir, and the data."""
    return replace(cfg, seed=0, output_dir="", data=replace(cfg.data, seed=0)), sorted(fingerprints.items())


def _arm_name(runs: list[RunSummary], taken: set[str]) -> str:
    """The parent directory of its seed_N runs, else its first run's name; "#2", "#3"... if taken."""
    paths = [Path(r.path).resolve() for r in runs]
    seeded = all(SEED_DIR.fullmatch(p.name) for p in paths) and len({p.parent for p in paths}) == 1
    name = paths[0].parent.name if seeded else paths[0].name
    k = 1
    while (f"{name}#{k}" if k > 1 else name) in taken:
        k += 1
    return f"{name}#{k}" if k > 1 else name


def compare_runs(run_dirs: list[Path], allow_mismatch: bool = False, baseline: str | None = None,
                 progress: bool = False) -> Report:  # fmt: skip
    """The report on `run_dirs` (directories of `launch --seeds` runs expand to their seeds) at T, the
    smallest tokens-seen among the runs; `baseline`: an arm's name (default: the first arm);
    `progress`: a bar on stderr (on a terminal) as the runs are read.

    Raises RunError for an unreadable run, a run without records, two runs of one arm with the
    same seed, an unknown baseline or (unless `allow_mismatch`) runs whose data or tokenizer
    fingerprints differ.
    """
    loaded = []
    for run_dir in tqdm(expand_run_dirs(run_dirs), desc="compare", unit="run", disable=None if progress else True,
                        leave=False):  # fmt: skip
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
    runs = [summarise(d, equal, records, cfg, prints) for d, cfg, records, prints in loaded]

    groups: list[tuple[Any, dict[str, str], list[RunSummary]]] = []  # (key, protocol, runs), first seen first
    for (_, cfg, _, prints), run in zip(loaded, runs):
        key = _arm_key(cfg, prints)
        group = next((g for g in groups if g[0] == key), None)
        if group is None:
            groups.append((key, protocol(cfg, prints), [run]))
        else:
            group[2].append(run)
    arms: list[Arm] = []
    for _, protocol_, members in groups:
        arms.append(make_arm(_arm_name(members, {a.name for a in arms}), members, protocol_))
    base = next((a for a in arms if a.name == (baseline or arms[0].name)), None)
    if base is None:
        raise RunError(f"--baseline {baseline}: not an arm here ({', '.join(a.name for a in arms)})")
    comparisons = [difference(a, base) for a in arms if a is not base]
    return Report(equal, base.name, arms, comparisons, protocol_differences(arms), runs)


def _si(value: float) -> str:
    """1234567 -> "1.23M": parameter and FLOP counts from tiny CPU models to the 0.5B run."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _mean_sd(mean: float | None, sd: float | None) -> str:
    return _fmt(mean, ".4f") + ("" if sd is None else f" ± {sd:.4f}")


BEST_NOTE = ("† best val: the minimum over evaluations up to those tokens, selected on the very validation set it "
             "reports, so optimistic; the last val loss involves no such selection.")


def markdown(report: Report) -> str:
    """The comparison as Markdown: protocol differences, one row per arm, the paired differences
    to the baseline, one row per run, then validation loss per source (arm means)."""
    arms, runs = report.arms, report.runs
    lines = [
        f"At {report.equal_tokens:,} training tokens (the shortest run). An arm = the runs whose configs "
        "differ only in `seed`, `data.seed` and `output_dir`: n runs, mean ± sd (sample sd) over its "
        "seeds; val loss = the last evaluation at or before that point; load share and entropy: "
        "mean over layers of the last expert summary (balanced share = 1/E).",
        "",
    ]
    if report.protocol_differences:
        lines += ["**Protocol differences**: these arms measure their loss differently; read their "
                  "differences with that in mind.", "",
                  "| setting | " + " | ".join(a.name for a in arms) + " |", "|---|" + "---|" * len(arms)]  # fmt: skip
        lines += [f"| {key} | " + " | ".join(values[a.name] for a in arms) + " |"
                  for key, values in report.protocol_differences.items()]  # fmt: skip
    else:
        lines.append("Protocol differences: none (" + ", ".join(arms[0].protocol) + " are equal).")
    lines += ["", "| arm | router | n | seeds | params (total / active) | FLOPs/token | val loss | best val† "
              "| tokens/s | max load share | router entropy |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for a in arms:
        b = a.budget
        lines.append(
            f"| {a.name} | {a.router} | {a.n} | {', '.join(a.seeds)} | {_si(b.params_total)} / {_si(b.params_active)} "
            f"| {_si(b.flops_per_token)} | {_mean_sd(a.mean, a.sd)} | {_mean_sd(a.best_mean, a.best_sd)} "
            f"| {_fmt(a.tokens_per_s, ',.0f')} | {_fmt(a.max_load_share, '.3f')} | {_fmt(a.router_entropy, '.3f')} |"
        )
    lines += ["", BEST_NOTE]
    if report.comparisons:
        lines += ["", f"Against the baseline {report.baseline}: arm − baseline val loss, paired by seed; "
                  "95% interval of the mean difference by Student's t (n − 1 degrees of freedom).", "",
                  "| arm | paired seeds | mean diff | sd | 95% interval | verdict | left out | protocol differences |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in report.comparisons:
            interval = "–" if c.ci95 is None else f"[{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}]"
            changed = ", ".join(f"{k}: {base} → {arm}" for k, (base, arm) in c.protocol_differences.items())
            lines.append(f"| {c.arm} | {', '.join(c.seeds) or '–'} | {_fmt(c.diff_mean, '+.4f')} "
                         f"| {_fmt(c.diff_sd, '.4f')} | {interval} | {c.verdict} | {', '.join(c.unpaired) or '–'} "
                         f"| {changed or '–'} |")  # fmt: skip
    arm_of = {path: a.name for a in arms for path in a.runs}
    lines += ["", "| run | arm | seed | tokens: val loss at / run trained | val loss | best val† | tokens/s "
              "| max load share | router entropy |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        at = "–" if r.val_tokens is None else f"{r.val_tokens:,}"
        lines.append(f"| {r.name} | {arm_of[r.path]} | {r.seed} | {at} / {r.tokens_seen:,} | {_fmt(r.val_loss, '.4f')} "
                     f"| {_fmt(r.best_val_loss, '.4f')} | {_fmt(r.tokens_per_s, ',.0f')} "
                     f"| {_fmt(r.max_load_share, '.3f')} | {_fmt(r.router_entropy, '.3f')} |")  # fmt: skip
    sources = sorted({s for a in arms for s in a.val_by_source})
    if sources:
        lines += ["", "Val loss per `pile_set_name` (mean over each arm's seeds; last / best†):", "",
                  "| source | " + " | ".join(a.name for a in arms) + " |",
                  "|---|" + "---|" * len(arms)]  # fmt: skip
        for s in sources:
            cells = [f"{_fmt(a.val_by_source.get(s), '.4f')} / {_fmt(a.best_val_by_source.get(s), '.4f')}"
                     for a in arms]  # fmt: skip
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2) + "\n"


def plot(report: Report, path: Path) -> Path:
    """PNG of validation loss vs training tokens (whole runs): one colour per arm, a thin line per
    seed and a thick one for the arm's mean (at the evaluations all its seeds have)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    by_path = {r.path: r for r in report.runs}
    fig = Figure(figsize=(7, 4.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for i, arm in enumerate(report.arms):
        curves = [dict(by_path[p].curve) for p in arm.runs if by_path[p].curve]
        if not curves:
            continue
        if len(curves) > 1:
            for curve in curves:
                ax.plot(list(curve), list(curve.values()), color=f"C{i}", linewidth=0.7, alpha=0.4)
        tokens = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(tokens, [sum(c[t] for c in curves) / len(curves) for t in tokens], color=f"C{i}", linewidth=2,
                marker="o", markersize=3, label=f"{arm.name}: {arm.router} (n = {len(curves)})")  # fmt: skip
    ax.axvline(report.equal_tokens, color="grey", linestyle=":", linewidth=1, label="equal tokens")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def write_comparison(run_dirs: list[Path], out: Path | None, allow_mismatch: bool = False,
                     as_json: bool = False, baseline: str | None = None, progress: bool = False) -> str:  # fmt: skip
    """The report (Markdown, or JSON if `as_json`); with `out`, also writes compare.md,
    compare.json and val_loss.png there."""
    report = compare_runs(run_dirs, allow_mismatch, baseline, progress)
    md, js = markdown(report), to_json(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(md)
        (out / "compare.json").write_text(js)
        plot(report, out / "val_loss.png")
    return js if as_json else md
