"""Sharded, atomic, resumable checkpoints (torch.distributed.checkpoint) and the final export.

output_dir/checkpoints/step_000123/ holds:
  .metadata, __*_*.distcp   model + optimizer, sharded (DCP: each rank writes its own shards)
  train_state.pt            step, scheduler, skipped steps (rank 0)
  rank_00000.pt ...         per rank: data position, torch / numpy / python RNG states

Everything is tensors and plain values, read back with `torch.load(weights_only=True)` and DCP's
`.metadata` with an unpickler that knows only DCP's own types: a checkpoint directory copied from
elsewhere cannot run code on resume (a pickle that tries is refused, naming the file).

Each checkpoint is written to `step_000123.tmp` and renamed by rank 0 after every rank finished
(and fsynced its own files): a directory with a final name is complete. `checkpoint.async_save`
writes it while training goes on (DCP async_save); a kill meanwhile leaves only the `.tmp`.
Interrupted `.tmp` directories are deleted at startup.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ioe_train.config import ConfigError
from pile_prep.shards import fsync_dir

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in `directory`, oldest first (`step_*.tmp` are not)."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)))


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (numpy's key array as a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # keys: uint32 [624]
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's `.metadata` (its dataclasses, torch.Size, dtypes, layouts) and nothing else."""

    _ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("collections", "OrderedDict"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}  # fmt: skip

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module == "torch.distributed.checkpoint.metadata" and
                                               isinstance(getattr(dcp.metadata, name, None), type)) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):  # fmt: skip
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported GLOBAL {module}.{name}")


def _read_metadata(path: Path) -> Metadata:
    with open(path / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = _read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """Reads DCP's non-tensor items (the optimizer's hyperparameters) only if weights_only allows."""

    refused: pickle.UnpicklingError | None = None

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            self.refused = e  # raised after dcp.load: raised here, DCP would wrap it per rank
            return
        value.seek(0)
        super().load_bytes(read_item, value)  # (which loads with weights_only=False)


def _refused(path: Path, error: pickle.UnpicklingError) -> ConfigError:
    lines = str(error).splitlines()
    why = next((line.strip() for line in lines if "GLOBAL" in line), lines[0] if lines else "")
    return ConfigError(f"checkpoint.resume: {path} holds objects other than tensors and plain values "
                       f"({why}); refused, as loading it could run code. Delete that checkpoint or "
                       "use another output_dir")  # fmt: skip


def _load_plain(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused(path, e) from None


class Checkpointer:
    """Saves and restores one run's checkpoints under `directory` (collective: call on all ranks).

    With `async_save`, `save` returns once the state is copied to host memory and DCP writes it
    from a background thread while training goes on; the next `save` and `close` wait for it.
    The background work talks over its own gloo group: its collectives must not interleave with
    the training's on the default group.
    """

    def __init__(self, directory: Path, keep_last: int, rank: int, world_size: int, async_save: bool = False):
        self.directory, self.keep_last, self.rank, self.world_size = directory, keep_last, rank, world_size
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("step_*.tmp"):  # a save that a crash interrupted
                shutil.rmtree(stale)
        self._group = dist.new_group(backend="gloo") if async_save else None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint") if async_save else None
        self._pending: Future[None] | None = None
        dist.barrier()

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return checkpoint_steps(self.directory)

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:06d}"

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             train_state: dict[str, Any], data_state: dict[str, Any]) -> Path:  # fmt: skip
        """Write checkpoint `step` atomically (in the background with async_save), then delete all
        but the `keep_last` newest. Returns the path it has (or will have) when complete."""
        self.wait()  # one save in flight: also bounds the host copies to one
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            tmp.mkdir(parents=True)
        dist.barrier()
        mine = [tmp / f"rank_{self.rank:05d}.pt"]
        torch.save({"data": data_state, "rng": rng_state()}, mine[0])
        if self.rank == 0:
            mine.append(tmp / "train_state.pt")
            torch.save({**train_state, "step": step, "world_size": self.world_size}, mine[1])
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self._writer is None:
            dcp.save(state, checkpoint_id=str(tmp))
            self._commit(tmp, mine, None)
        else:
            written = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
            self._pending = self._writer.submit(self._finish, written, tmp, mine)
        return final

    def _finish(self, written: Future[Any], tmp: Path, mine: list[Path]) -> None:
        written.result()  # raises what the DCP writer thread raised
        self._commit(tmp, mine, self._group)

    def _commit(self, tmp: Path, mine: list[Path], group: dist.ProcessGroup | None) -> None:
        """Each rank makes its own files durable (DCP fsyncs its .distcp files and .metadata); once
        all have, rank 0 renames `tmp` to its final name and drops old checkpoints."""
        for f in mine:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        dist.barrier(group=group)
        if self.rank == 0:
            fsync_dir(tmp)
            os.replace(tmp, tmp.with_name(tmp.name.removesuffix(".tmp")))
            fsync_dir(self.directory)
            for old in self.steps()[: -self.keep_last]:
                shutil.rmtree(self.path(old))
        dist.barrier(group=group)

    def wait(self) -> None:
        """Block until the checkpoint being written in the background (if any) is complete."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """Finish the background save, if any, and stop the writer thread (collective)."""
        self.wait()
        if self._writer is not None:
            self._writer.shutdown()
            dist.destroy_process_group(self._group)
            self._writer = self._group = None

    def load(self, step: int, model: nn.Module,
             optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
        """Restore model, optimizer and this rank's RNG from checkpoint `step`.

        Returns (train_state, this rank's data state). On another world size the RNG streams
        start afresh and every rank takes rank 0's data position (the memmap order is global).
        """
        path = self.path(step)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        train_state = _load_plain(path / "train_state.pt")
        same_world = train_state["world_size"] == self.world_size
        mine = _load_plain(path / f"rank_{self.rank if same_world else 0:05d}.pt")
        _safe_dcp_load(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if same_world:
            set_rng_state(mine["rng"])
        return train_state, mine["data"]


def _safe_dcp_load(state: dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """`dcp.load` of `state` from checkpoint `path`, refusing (ConfigError) what could run code."""
    try:
        _read_metadata(path)  # here, where a refusal is not wrapped into DCP's per-rank report
    except pickle.UnpicklingError as e:
        raise _refused(path / ".metadata", e) from None
    planner = _SafePlanner()
    dcp.load(state, storage_reader=_SafeReader(path), planner=planner, no_dist=no_dist)
    if planner.refused is not None:
        raise _refused(path, planner.refused)


def read_model_state(path: Path, model_sd: dict[str, torch.Tensor]) -> None:
    """Fill `model_sd` (a model's whole state_dict, e.g. on CPU) in place from checkpoint `path`,
    in this process, no process group needed: `ioe-train export --step`, `sample`, `eval`.

    Raises ConfigError, naming the checkpoint: a pickle that could run code, or weights that do
    not fit `model_sd`'s keys and shapes.
    """
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            _safe_dcp_load({"model": model_sd}, path, no_dist=True)
        except (dcp.CheckpointException, ValueError, RuntimeError, OSError) as e:
            if isinstance(e, ConfigError):
                raise
            # a key/shape mismatch arrives as a CheckpointException (a BaseException) holding the
            # rank's traceback, whose last line is the reason
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{path}: cannot read the model of the run's config.yaml from it: {why}") from None


def export_model(model: nn.Module, path: Path, rank: int, extra: dict[str, Any]) -> None:
    """Consolidated fp32 weights at `path` for `torch.load` (collective; rank 0 writes).

    The file holds {"model": state_dict (plain tensors, on CPU), **extra}; `extra` must hold plain
    types only, so that `torch.load(path)` (weights_only=True since torch 2.6) opens it.
    """
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"model": sd, **extra}, tmp)
        os.replace(tmp, path)
    dist.barrier()
