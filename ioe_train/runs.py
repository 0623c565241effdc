"""A run directory read back on one process, no process group: its config, metrics and weights.

`ioe-train compare`, `sample` and `eval` read runs only through these functions. A run directory
holds config.yaml (the resolved TrainConfig), metrics.jsonl, checkpoints/step_*/ (DCP) and
final/model.pt.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from ioe_train.checkpoint import checkpoint_steps, read_model_state
from ioe_train.config import ConfigError, TrainConfig, load_config
from ioe_train.model import Decoder, build_model
from ioe_train.moe import use_local_counts


class RunError(ValueError):
    """A run directory that cannot be read as asked; the message names the path."""


def run_config(run_dir: Path) -> TrainConfig:
    """The run's resolved config (config.yaml, written by rank 0 at start)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.yaml)")
    try:
        return load_config(path)
    except ConfigError as e:
        raise RunError(f"{path}: {e}") from None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, in order (one per logged step, evaluation or expert summary)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{run_dir}: no metrics.jsonl")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise RunError(f"{path}, line {i}: not JSON") from None
    return records


def load_model(run_dir: Path) -> tuple[Decoder, TrainConfig, int]:
    """The run's model on CPU (fp32, eval mode) with its newest weights, its config, and the step.

    Weights: final/model.pt when it is at least as new as the newest checkpoint, else that DCP
    checkpoint. final/model.pt is read with `weights_only=True` (a file from elsewhere cannot run
    code): {"model": state_dict, "model_config": plain dict, "step": int}. This project's older
    export (a ModelConfig dataclass inside) fails that load; then the checkpoint, which the
    trainer always writes at the same last step, is read instead. The model comes from
    config.yaml either way; with `aux_loss_scope: global` its load-balancing counts are this
    process's (no other ranks to sum over).
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    model = build_model(cfg.model)
    use_local_counts(model)
    steps = checkpoint_steps(run_dir / "checkpoints")
    final = run_dir / "final" / "model.pt"
    if final.is_file():
        try:
            blob = torch.load(final, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            blob = None
        if blob is not None and (not steps or blob["step"] >= steps[-1]):
            _load_state(model, blob["model"], final)
            return model.eval(), cfg, int(blob["step"])
    if not steps:
        raise RunError(f"{run_dir}: no checkpoint and no final/model.pt readable with weights_only=True")
    try:  # in place, into the model's own tensors
        read_model_state(run_dir / "checkpoints" / f"step_{steps[-1]:06d}", model.state_dict())
    except ConfigError as e:
        raise RunError(str(e)) from None
    return model.eval(), cfg, steps[-1]


def _load_state(model: Decoder, state: dict[str, torch.Tensor], source: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RunError(f"{source}: does not fit the run's model config (missing {result.missing_keys[:3]}, "
                       f"unexpected {result.unexpected_keys[:3]})")  # fmt: skip


def run_tokenizer(cfg: TrainConfig) -> Any:
    """The tokenizer the run's training data was made with (checked by fingerprint)."""
    from pile_prep.reader import ShardDataset, ShardError
    from pile_prep.tokenizer import TokenizerError, load_tokenizer

    try:
        if cfg.data.source == "streaming":
            return load_tokenizer(cfg.data.streaming.tokenizer)
        ds = ShardDataset(cfg.data.train_dirs, partial=cfg.data.partial)
        name = ds.tokenizer["name"]
        return ds.load_tokenizer(name[3:] if name.startswith("hf:") else None)  # "hf:PATH": its files
    except (ShardError, TokenizerError) as e:
        raise RunError(f"data.train_dirs: {e}") from None


def run_tokenizer_fingerprint(cfg: TrainConfig) -> str | None:
    """The fingerprint of the tokenizer of the run's training shards (None for streaming data)."""
    return data_fingerprints(cfg)["tokenizer"] or None


def data_fingerprints(cfg: TrainConfig) -> dict[str, str]:
    """{"train", "val", "tokenizer"} fingerprints of the run's shard directories (from their
    manifests; "" where the run has none); raises RunError naming a directory that is gone."""
    from pile_prep.reader import ShardDataset, ShardError

    out = {"train": "", "val": "", "tokenizer": ""}
    if cfg.data.source == "streaming":
        out["train"] = "streaming:" + ",".join(cfg.data.streaming.data_files or [cfg.data.streaming.hub_dataset or ""])
        return out
    for key, dirs in (("train", cfg.data.train_dirs), ("val", cfg.data.val_dirs)):
        if dirs:
            try:
                ds = ShardDataset(dirs, partial=cfg.data.partial)
            except ShardError as e:
                raise RunError(f"data.{key}_dirs: {e}") from None
            out[key] = ds.fingerprint
            out["tokenizer"] = ds.tokenizer["fingerprint"]
    return out
