"""Typed training configuration: one root `TrainConfig`, loaded from YAML with `a.b=value` overrides.

OmegaConf structured configs check keys and types against these dataclasses: an unknown key or a
value of the wrong type fails naming the key (e.g. `optim.lr`). `TrainConfig.validate` then checks
values and combinations, also naming the key, so every error surfaces before a process starts.

A YAML file may start from another with `base: other.yaml` (relative to the file): the base is
loaded first, then the file's keys override it.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ioe_train.model import ModelConfig
from ioe_train.moe import MoEConfig


PACKINGS = ("stream", "by_source", "similarity")


class ConfigError(ValueError):
    """A configuration that cannot run; the message starts with the offending key."""


@dataclass
class StreamingDataConfig:
    """The streaming fallback (`data.source: streaming`): documents tokenized on the fly."""

    data_files: list[str] = field(default_factory=list)  # local .jsonl(.zst)/.parquet files
    hub_dataset: str | None = None  # or a Hugging Face dataset name
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = "qwen2.5"  # as `pile-prep tokenize --tokenizer`
    shuffle_buffer: int = 0  # documents; 0 keeps file order


@dataclass
class DataConfig:
    source: str = "memmap"  # "memmap": pile-prep shard dirs; "streaming": see `streaming`
    train_dirs: list[str] = field(default_factory=list)  # `pile-prep tokenize` output dirs
    val_dirs: list[str] = field(default_factory=list)  # held-out shard dirs; empty: no eval
    seq_len: int = 2048  # tokens per sample (a window reads seq_len + 1 for the shifted labels)
    seed: int = 0  # with the data fingerprint and seq_len, fixes the global sample order
    # How documents become samples (docs/TRAINING.md#packing): "stream" (windows of the documents
    # in data order), "by_source" (each window holds documents of one pile_set_name), "similarity"
    # (documents chained by a content signature). Validation windows are packed the same way.
    packing: str = "stream"
    # pile_set_name -> sampling weight (unlisted sources: 1.0); see docs/TRAINING.md#mixture.
    mixture: dict[str, float] = field(default_factory=dict)
    num_workers: int = 1  # DataLoader worker processes per rank; the order does not depend on it
    # Accept train/val dirs that miss tasks of a `pile-prep tokenize --num-tasks` job (on purpose:
    # otherwise such a set is refused, naming the missing tasks).
    partial: bool = False
    streaming: StreamingDataConfig = field(default_factory=StreamingDataConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate, reached after `warmup_steps`
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio on the last step
    warmup_steps: int = 100  # linear warmup from 0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms, biases (any parameter with ndim < 2)
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables clipping
    fused: bool = True  # fused AdamW kernel where the device has one (CUDA/ROCm)


@dataclass
class ParallelConfig:
    """How `parallelize` wraps the model (FSDP2 is always applied, also at world size 1)."""

    mixed_precision: str = "auto"  # "auto": bf16 params/fp32 reduce on GPU, fp32 on CPU; "bf16"; "fp32"
    activation_checkpointing: str = "none"  # "none" | "selective" (router kept) | "full"
    compile: bool = False  # torch.compile each transformer layer
    # Blocks: True = FULL_SHARD; False keeps their params gathered (SHARD_GRAD_OP). The root (tied
    # embedding, final norm) is always kept gathered after forward (parallelize.py).
    reshard_after_forward: bool = True
    # HSDP: R replicas of the model, each sharded over world/R consecutive ranks. Set R = nodes so
    # that the per-layer all-gathers stay within a node; 1: FSDP over all ranks.
    replicate_degree: int = 1


@dataclass
class CheckpointConfig:
    interval: int = 1000  # steps between checkpoints; 0: only at the end
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    resume: bool = True  # resume from the latest complete checkpoint in output_dir
    # Write in the background (DCP async_save): training stops only to copy the state to host
    # memory (~1 GiB per rank for the 0.5B MoE on 16 ranks); the next save waits for this one.
    async_save: bool = False
    export_final: bool = True  # write output_dir/final/model.pt (consolidated, `torch.load`able)


@dataclass
class EvalConfig:
    interval: int = 1000  # steps between evaluations; 0: never
    max_batches: int = 50  # micro-batches per rank per evaluation; 0: the whole val set
    batch_size: int = 0  # samples per micro-batch; 0: training's micro_batch_size
    packing: str | None = None  # how validation windows are packed; None: data.packing
    # Score each document on its own: block-causal attention and the IoE document reset in
    # evaluation, whatever the training used (one protocol for every router).
    per_document: bool = False


@dataclass
class WandbConfig:
    """Optional Weights & Biases logging (`pip install wandb`) next to TensorBoard."""

    project: str | None = None  # W&B project; None: no W&B
    mode: str = "online"  # "online" | "offline" (synced later with `wandb sync`)


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between log lines / TensorBoard scalars
    expert_interval: int = 100  # steps between expert-load histograms and heatmaps; 0: never
    tensorboard: bool = True  # write output_dir/tb (with the resolved config as text and hparams)
    # One chart per layer and expert; None: only up to 64 layer-experts (the heatmap and per-layer
    # summaries are always written).
    per_expert_scalars: bool | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output_dir: str = "runs/default"  # checkpoints/, tb/, metrics.jsonl, final/
    steps: int = 1000  # optimizer steps
    micro_batch_size: int = 8  # samples per rank per forward
    grad_accum_steps: int = 1  # forwards per optimizer step
    load_balancing_loss_weight: float = 0.01  # total = ce + w * aux_loss + router_loss
    on_nonfinite: str = "stop"  # a NaN/inf loss: "stop" the run, or "skip" the step
    device: str = "auto"  # "auto" (cuda/rocm if present, else cpu) | "cuda" | "cpu"
    seed: int = 0  # model init and any randomness outside the data order

    def validate(self) -> None:
        """Check values and combinations; raise ConfigError naming the key."""
        _choice("data.source", self.data.source, ("memmap", "streaming"))
        _choice("data.packing", self.data.packing, PACKINGS)
        if self.eval.packing is not None:
            _choice("eval.packing", self.eval.packing, PACKINGS)
        if self.data.source == "streaming" and self.data.packing != "stream":
            _fail("data.packing", f"{self.data.packing!r} needs data.source=memmap (streaming reads documents in file order)")
        if self.data.source == "memmap" and not self.data.train_dirs:
            _fail("data.train_dirs", "empty: give the `pile-prep tokenize` output directories")
        if self.data.source == "streaming":
            s = self.data.streaming
            if not s.data_files and not s.hub_dataset:
                _fail("data.streaming.data_files", "empty and no data.streaming.hub_dataset")
            if self.data.mixture:
                _fail("data.mixture", "only supported with data.source=memmap")
        for name, weight in self.data.mixture.items():
            if weight < 0:
                _fail(f"data.mixture.{name}", f"{weight} is negative")
        _choice("parallel.mixed_precision", self.parallel.mixed_precision, ("auto", "bf16", "fp32"))
        _choice("parallel.activation_checkpointing", self.parallel.activation_checkpointing,
                ("none", "selective", "full"))  # fmt: skip
        _choice("on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _choice("device", self.device, ("auto", "cuda", "cpu"))
        _choice("logging.wandb.mode", self.logging.wandb.mode, ("online", "offline"))
        if self.logging.wandb.project is not None and importlib.util.find_spec("wandb") is None:
            _fail("logging.wandb.project", "needs the wandb package: pip install wandb (or ioe-pretrain[wandb])")
        for key, value, low in (
            ("data.seq_len", self.data.seq_len, 1),
            ("data.num_workers", self.data.num_workers, 0),
            ("steps", self.steps, 1),
            ("micro_batch_size", self.micro_batch_size, 1),
            ("grad_accum_steps", self.grad_accum_steps, 1),
            ("optim.warmup_steps", self.optim.warmup_steps, 0),
            ("checkpoint.interval", self.checkpoint.interval, 0),
            ("checkpoint.keep_last", self.checkpoint.keep_last, 1),
            ("eval.interval", self.eval.interval, 0),
            ("eval.max_batches", self.eval.max_batches, 0),
            ("eval.batch_size", self.eval.batch_size, 0),
            ("logging.interval", self.logging.interval, 1),
            ("logging.expert_interval", self.logging.expert_interval, 0),
            ("parallel.replicate_degree", self.parallel.replicate_degree, 1),
        ):
            if value < low:
                _fail(key, f"{value} is below {low}")
        for key, value in (("optim.lr", self.optim.lr), ("optim.eps", self.optim.eps),
                           ("optim.weight_decay", self.optim.weight_decay),
                           ("optim.max_grad_norm", self.optim.max_grad_norm),
                           ("load_balancing_loss_weight", self.load_balancing_loss_weight)):  # fmt: skip
            if value < 0:
                _fail(key, f"{value} is negative")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            _fail("optim.min_lr_ratio", f"{self.optim.min_lr_ratio} is not in [0, 1]")
        if any(not 0 <= b < 1 for b in self.optim.betas):
            _fail("optim.betas", f"{list(self.optim.betas)} must lie in [0, 1)")
        if self.eval.interval and not self.data.val_dirs:
            _fail("eval.interval", f"{self.eval.interval} but data.val_dirs is empty (set 0 to disable)")
        max_seq_len = self.model.arch().max_seq_len
        if self.data.seq_len > max_seq_len:
            _fail("data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len={max_seq_len}")
        if self.model.init_from is not None and not Path(self.model.init_from).exists():
            _fail("model.init_from", f"{self.model.init_from}: no such file or directory")
        if self.model.init_from is not None and self.model.is_moe:
            from ioe_train.upcycle import upcycle_check  # upcycle imports ConfigError from this module

            upcycle_check(self.model)  # a mode that cannot do what it says is refused here

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def _fail(key: str, why: str) -> None:
    raise ConfigError(f"{key}: {why}")


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        _fail(key, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def _field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass: `optim.lr`, `model.moe.router`, ..."""
    paths = []
    for name, f in cls.__dataclass_fields__.items():
        inner = f.default_factory  # a nested config's class, or MISSING / a plain factory
        nested = hasattr(inner, "__dataclass_fields__")
        paths += _field_paths(inner, f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return paths


def _hint(key: str) -> str:
    """A did-you-mean over every level of TrainConfig for an unknown `key`, or how to write a
    mapping entry when `key` looks like YAML flow syntax without the space (`{Books3:1.5}`)."""
    if ":" in key:
        head, _, value = key.partition(":")
        mapping, _, name = head.rpartition(".")
        return f" (a mapping entry is `{mapping}.{name}={value}`, or `{mapping}={{{name}: {value}}}` with a space)"
    paths = _field_paths(TrainConfig)
    if key in paths:
        return ""
    last = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(last, [p.rsplit(".", 1)[-1] for p in paths], n=3, cutoff=0.75)
    matches = [p for p in paths if p.rsplit(".", 1)[-1] in close and p != key]
    return f"; did you mean {' or '.join(matches[:3])}?" if matches else ""


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    if path in seen:
        raise ConfigError(f"base: {path} includes itself")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    node = OmegaConf.load(path)
    base = node.pop("base", None)
    if base is None:
        return node
    return OmegaConf.merge(_load_yaml((path.parent / base).resolve(), seen + (path,)), node)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config in YAML file `path` (None: the defaults) with `a.b=value` overrides applied."""
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"{o}: an override is key=value")
    try:
        layers = [OmegaConf.structured(TrainConfig)]
        if path is not None:
            layers.append(_load_yaml(Path(path).resolve()))
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        why, hint = getattr(e, "msg", str(e)).splitlines()[0], _hint(key)
        raise ConfigError(f"{key}: {why.split(' Did you mean')[0].rstrip('.') if hint else why}{hint}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, ValueError) as e:  # the model's own __post_init__ checks
        why = str(e.__cause__ if isinstance(e, OmegaConfBaseException) and e.__cause__ else e).splitlines()[0]
        word = why.split(" ")[0].rstrip(":")
        if word in MoEConfig.__dataclass_fields__:
            raise ConfigError(f"model.moe.{word}: {why.removeprefix(word).lstrip(': ')}") from None
        if word in ModelConfig.__dataclass_fields__:
            raise ConfigError(f"model.{word}: {why.removeprefix(word).lstrip(': ')}") from None
        raise ConfigError(f"model: {why}") from None
    assert isinstance(cfg, TrainConfig)
    cfg.validate()
    return cfg
