"""`ioe-train`: thin click commands over ioe_train.launch and ioe_train.train."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from ioe_train.config import ConfigError, load_config
from ioe_train.devices import BY_KEY
from ioe_train.launch import LaunchOptions, launch


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Pretrain Qwen2.5-MoE models on pile-prep shards with FSDP2."""


@main.command("launch")
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--nproc-per-node", type=click.IntRange(min=0), default=0, show_default=True,
              help="Ranks on this node; 0 = one per visible GPU (1 on CPU).")
@click.option("--nnodes", default="1", show_default=True, help="Nodes, or MIN:MAX.")
@click.option("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (multi-node).")
@click.option("--rdzv-id", default="ioe-train", show_default=True, help="Job id, equal on all nodes.")
@click.option("--dry-run", is_flag=True, help="Print the torchrun command and the resolved config.")
def launch_cmd(config, overrides, nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, dry_run) -> None:
    """Train CONFIG (YAML) with a.b=value OVERRIDES under torchrun."""
    opts = LaunchOptions(config, list(overrides), nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, dry_run)
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
def export_cmd(run_dir, output, step, fmt, dtype) -> None:
    """Export the trained model of RUN_DIR (a run's output_dir) for transformers / vLLM / lm-eval."""
    from ioe_train.export import ExportError, export_hf

    try:
        path = export_hf(run_dir, output, step=step, dtype=dtype)
    except (ExportError, ConfigError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")
