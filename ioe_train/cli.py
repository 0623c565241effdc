"""`ioe-train`: thin click commands over ioe_train.launch and ioe_train.train."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from ioe_train.config import PACKINGS, ConfigError, load_config
from ioe_train.devices import BY_KEY
from ioe_train.launch import LaunchOptions, launch, parse_seeds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Pretrain Qwen2.5-MoE models on pile-prep shards with FSDP2."""


def _seeds(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int]:
    try:
        return parse_seeds(value) if value is not None else []
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@main.command("launch")
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--nproc-per-node", type=click.IntRange(min=0), default=0, show_default=True,
              help="Ranks on this node; 0 = one per visible GPU (1 on CPU).")
@click.option("--nnodes", default="1", show_default=True, help="Nodes, or MIN:MAX.")
@click.option("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (multi-node).")
@click.option("--rdzv-id", default="ioe-train", show_default=True, help="Job id, equal on all nodes.")
@click.option("--seeds", default=None, callback=_seeds,
              help="Run once per seed, in turn, in OUTPUT_DIR/seed_N (seed=N data.seed=N): 0,1,2 or 0-2.")
@click.option("--dry-run", is_flag=True, help="Print the torchrun command and the resolved config "
              "(with --seeds: each seed's command).")  # fmt: skip
def launch_cmd(config, overrides, nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, seeds, dry_run) -> None:
    """Train CONFIG (YAML) with a.b=value OVERRIDES under torchrun."""
    opts = LaunchOptions(config, list(overrides), nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, dry_run, seeds)
    try:
        code = launch(opts)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    sys.exit(code)


@main.command("plan")
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=1, show_default=True, help="Ranks per node.")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True, help="Nodes.")
@click.option("--device", default="mi250x", show_default=True,
              help=f"What one rank drives: {', '.join(BY_KEY)}, or cpu (with --device-gib).")
@click.option("--device-gib", type=float, default=None, help="Memory per rank [default: the device's].")
@click.option("--mfu", type=float, default=0.4, show_default=True, help="MFU the step time assumes.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (stable keys).")
def plan_cmd(config, overrides, nproc_per_node, nnodes, device, device_gib, mfu, as_json) -> None:
    """Parameters, FLOPs per token and per-rank memory of CONFIG with a.b=value OVERRIDES."""
    from ioe_train.plan import format_plan, plan

    try:
        result = plan(load_config(config, list(overrides)), nproc_per_node, nnodes, device, device_gib, mfu)
    except (ConfigError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(asdict(result), indent=2) if as_json else format_plan(result))


@main.command("train", context_settings={"ignore_unknown_options": True})
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
def train_cmd(config, overrides) -> None:
    """One rank's training process (what torchrun runs; use `launch` to start a run)."""
    from ioe_train.train import main as train_main

    train_main([str(config), *overrides])


@main.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="New directory to write.")
@click.option("--step", type=click.IntRange(min=1), default=None,
              help="Export checkpoints/step_N instead of final/model.pt.")
@click.option("--format", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True,
              help="hf: a Hugging Face transformers model directory.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--modeling", type=click.Choice(["auto", "custom"]), default="auto", show_default=True,
              help="auto: Qwen2/Qwen2MoE where they compute the model, else the bundled code (trust_remote_code).")
def export_cmd(run_dir, output, step, fmt, dtype, modeling) -> None:
    """Export the trained model of RUN_DIR (a run's output_dir) for transformers / vLLM / lm-eval."""
    from ioe_train.export import ExportError, export_hf

    try:
        path = export_hf(run_dir, output, step=step, dtype=dtype, modeling=modeling, progress=True)
    except (ExportError, ConfigError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")


@main.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write compare.md, compare.json and val_loss.png here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of Markdown.")
@click.option("--allow-mismatch", is_flag=True, help="Compare runs whose data or tokenizer differ.")
@click.option("--baseline", default=None, help="The arm the others are compared to [default: the first].")
def compare_cmd(run_dirs, out, as_json, allow_mismatch, baseline) -> None:
    """Arms of seeds side by side at equal tokens: budgets, val loss mean ± sd (per source), paired
    differences to the baseline with 95% intervals, speed, expert balance.

    A RUN_DIR of `launch --seeds` runs stands for its seed_N runs."""
    from ioe_train.compare import write_comparison
    from ioe_train.runs import RunError

    try:
        click.echo(write_comparison(list(run_dirs), out, allow_mismatch, as_json, baseline, progress=True), nl=False)
    except RunError as e:
        raise click.ClickException(str(e)) from None


@main.command("sample")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--tokens", type=click.IntRange(min=1), default=64, show_default=True, help="New tokens at most.")
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def sample_cmd(run_dir, prompt, tokens, temperature, top_p, seed) -> None:
    """Print a continuation of PROMPT by the run's newest weights (CPU; stops at EOS)."""
    from ioe_train.generate import generate
    from ioe_train.runs import RunError, load_model, run_tokenizer

    try:
        model, cfg, step = load_model(run_dir)
        tok = run_tokenizer(cfg)
    except RunError as e:
        raise click.ClickException(str(e)) from None
    ids = tok.encode(prompt)
    if not ids:
        raise click.UsageError("--prompt: encodes to no tokens")
    out = generate(model, ids, tokens, temperature=temperature, top_p=top_p, seed=seed,
                   context=cfg.data.seq_len, allowed=tok.vocab_size, stop_id=tok.eos_id)  # fmt: skip
    click.echo(f"[{run_dir}, step {step}] ", nl=False, err=True)
    click.echo(prompt + tok.decode([i for i in out if i != tok.eos_id]))


@main.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", "dirs", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Shard directory (repeatable: read as one dataset).")
@click.option("--batches", type=click.IntRange(min=0), default=0, show_default=True,
              help="Micro-batches to evaluate; 0: every window.")
@click.option("--packing", type=click.Choice(PACKINGS), default=None,
              help="How the windows are packed [default: the run's eval.packing, else data.packing].")
@click.option("--per-document/--no-per-document", default=None,
              help="Score each document on its own (block-causal attention, IoE document reset) "
                   "[default: the run's eval.per_document].")
@click.option("--routing", is_flag=True,
              help="Also routing diagnostics: loss under routing interventions, I(source; experts), entropy, "
                   "load per layer, train-val gap (docs/MOE.md).")
@click.option("--partial", is_flag=True, help="Accept DIRS missing tasks of a --num-tasks job, on purpose.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_cmd(run_dir, dirs, batches, packing, per_document, routing, partial, as_json) -> None:
    """Validation loss of the run's newest weights on DIRS, overall and per pile_set_name (CPU);
    with --routing, whether the model uses its routing too."""
    from ioe_train.data import EvalSet
    from ioe_train.diagnostics import format_routing, routing_diagnostics, train_val_gap
    from ioe_train.evaluate import evaluate_dirs
    from ioe_train.runs import RunError, load_model, read_metrics, run_config, run_tokenizer_fingerprint
    from pile_prep.reader import ShardDataset, ShardError

    try:
        if routing and not run_config(run_dir).model.is_moe:
            click.echo(json.dumps({"run": str(run_dir), "routing": None}) if as_json
                       else f"{run_dir}: a dense model, no routing to diagnose")  # fmt: skip
            return
        model, cfg, step = load_model(run_dir)
        ShardDataset(list(dirs), expect_fingerprint=run_tokenizer_fingerprint(cfg), partial=partial)
        packing = packing or cfg.eval.packing or cfg.data.packing
        per_document = cfg.eval.per_document if per_document is None else per_document
        batch_size = cfg.eval.batch_size or cfg.micro_batch_size
        diag = gap = None
        if routing:
            eval_set = EvalSet([str(d) for d in dirs], cfg.data.seq_len, 0, 1, packing, Path(run_dir) / "data_index",
                               progress=True, partial=partial)  # fmt: skip
            diag = routing_diagnostics(model, eval_set, batch_size, batches, per_document=per_document)
            losses = diag.losses
            gap = train_val_gap(read_metrics(run_dir)) if (Path(run_dir) / "metrics.jsonl").is_file() else None
        else:
            losses = evaluate_dirs(model, list(dirs), cfg.data.seq_len, batch_size, batches, packing, per_document,
                                   Path(run_dir) / "data_index", progress=True, partial=partial)  # fmt: skip
    except (RunError, ShardError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        report = {"run": str(run_dir), "step": step, "packing": packing, "per_document": per_document, **losses}
        if diag is not None:
            report["routing"] = {k: v for k, v in asdict(diag).items() if k != "losses"}
            report["train_val_gap"] = asdict(gap) if gap is not None else None
        click.echo(json.dumps(report, indent=2))
        return
    protocol = f"{packing} packing{', per document' if per_document else ''}"
    click.echo(f"{run_dir} (step {step}, {protocol}): val loss {losses['val/loss']:.4f}")
    for key, value in losses.items():
        if key.count("/") == 2:
            click.echo(f"  {key.split('/', 2)[2]:<24} {value:.4f}")
    if diag is not None:
        click.echo(format_routing(diag, gap))
