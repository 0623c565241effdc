"""Training and evaluation batches read from pile-prep shards through memory maps.

Letters: S seq_len, B samples per micro-batch, W data-parallel ranks, N samples, M mixture samples.

A sample is a window of S + 1 tokens of the packed stream (`data.packing`, ioe_train.packing):
with "stream" packing window i is [i*S, i*S + S + 1) of the dataset's token stream (documents,
each followed by EOS), so consecutive windows overlap by the one token that is both the last
label of window i and the first input of window i + 1. `ioe_train.order.SampleOrder` maps global
positions to samples; a micro-batch of rank r is B consecutive positions of its share. In epoch
e >= 1 every window is shifted by a keyed offset in [0, S), so its content moves between epochs.
Each window is copied once, from the mapped shard straight into the batch tensor.

The data position saved in a checkpoint is `consumed`, the samples of all ranks handed to the
trainer so far, with what the order depends on (data fingerprint, seq_len, seed, mixture, packing).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ioe_train.config import ConfigError, DataConfig
from ioe_train.order import FeistelPermutation, SampleOrder, derive_key, hash_uniform
from ioe_train.packing import PackedStream, pack, save_atomic
from pile_prep.reader import ShardDataset

Batch = dict[str, torch.Tensor]  # input_ids [B, S] int64, labels [B, S] int64 (+ source_ids in eval)
VAL_PACKING_SEED = 0  # validation windows do not depend on data.seed: every seed scores the same set


class DataStateError(ValueError):
    """A checkpoint's data position that does not fit the data or config of this run."""


def read_windows(packed: PackedStream, samples: np.ndarray, shifts: np.ndarray | None = None) -> torch.Tensor:
    """Windows `samples` (shifted by `shifts`, default 0) as one int64 tensor [len(samples), S + 1]."""
    out = np.empty((len(samples), packed.seq_len + 1), np.int64)
    shifts = np.zeros(len(samples), np.int64) if shifts is None else shifts
    for row, (i, shift) in enumerate(zip(samples.tolist(), shifts.tolist())):
        out[row] = packed.tokens(i, shift)  # uint32 view -> int64 batch
    return torch.from_numpy(out)


def epoch_shifts(epochs: np.ndarray, seq_len: int, key: int) -> np.ndarray:
    """Window shift in [0, S) of each epoch: 0 in epoch 0, keyed after: [len(epochs)] int64."""
    shifts = (hash_uniform(key, epochs) * seq_len).astype(np.int64)
    return np.where(epochs == 0, 0, shifts)


# --- mixture --------------------------------------------------------------------------------------


def mixture_copies(sources: np.ndarray, weights: np.ndarray, key: int) -> np.ndarray:
    """Copies of each sample: floor(w) + 1 with probability frac(w), by a keyed hash. [N] int64.

    w is the weight of the sample's source. Expected copies are exactly w; the draw depends only on
    (key, sample index), so the mixture does not change when other sources are reweighted.
    """
    w = weights[sources]  # [N]
    whole = np.floor(w)
    extra = hash_uniform(key, np.arange(len(sources))) < (w - whole)
    return whole.astype(np.int64) + extra


def check_mixture(cfg: DataConfig, source_names: list[str]) -> None:
    """Every `data.mixture` name must be a pile_set_name of the training data (ConfigError)."""
    unknown = sorted(set(cfg.mixture) - set(source_names))
    if unknown:
        raise ConfigError(f"data.mixture.{unknown[0]}: not a pile_set_name of data.train_dirs "
                          f"(they hold {', '.join(source_names)})")  # fmt: skip


def mixture_index(packed: PackedStream, cfg: DataConfig, cache_dir: Path) -> np.ndarray:
    """Sample index of each of the M mixture samples, sorted: [M] (memory-mapped, cached).

    A window counts as the source of its first token (with by_source packing, its only source).
    Built once per (data fingerprint, seq_len, seed, weights, packing) and written atomically to
    `cache_dir`; 4 bytes per mixture sample while N < 2^32.
    """
    ds = packed.ds
    check_mixture(cfg, ds.source_names)
    key = derive_key("mixture", ds.fingerprint, cfg.seq_len, cfg.seed, sorted(cfg.mixture.items()), cfg.packing)
    path = cache_dir / f"mixture-{key:016x}.npy"
    if not path.exists():
        weights = np.array([cfg.mixture.get(name, 1.0) for name in ds.source_names])
        copies = mixture_copies(packed.window_sources(), weights, key)
        n = len(copies)
        save_atomic(path, np.repeat(np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64), copies))
    return np.load(path, mmap_mode="r")


def prepare_data(cfg: DataConfig, val_packing: str | None, cache_dir: Path) -> None:
    """Build the packing orders (training, and validation when `val_packing` is given) and the
    mixture index into `cache_dir`, for the loaders to load.

    The trainer calls this on local rank 0 only, then a barrier: one build per node, not per rank.
    """
    if cfg.source != "memmap":
        return
    packed = pack(ShardDataset(cfg.train_dirs, partial=cfg.partial), cfg.packing, cfg.seq_len, cfg.seed, cache_dir)
    if cfg.mixture:
        mixture_index(packed, cfg, cache_dir)
    if val_packing is not None and cfg.val_dirs:
        pack(ShardDataset(cfg.val_dirs, partial=cfg.partial), val_packing, cfg.seq_len, VAL_PACKING_SEED, cache_dir)


# --- training -------------------------------------------------------------------------------------


class _TrainBatches(Dataset):
    """Item p: rank `rank`'s micro-batch that starts at global position p (a map-style dataset,
    so DataLoader workers return batches in sampler order whatever their number)."""

    def __init__(self, packed: PackedStream, order: SampleOrder, mixture: np.ndarray | None,
                 batch_size: int, rank: int, shift_key: int):  # fmt: skip
        self.packed, self.order, self.mixture = packed, order, mixture
        self.batch_size, self.rank, self.shift_key = batch_size, rank, shift_key

    def samples(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """(windows [B], their shifts [B]) of the micro-batch at global position `start`."""
        positions = self.order.rank_positions(start, self.batch_size, self.rank)
        picked = self.order.samples(positions)
        shifts = epoch_shifts(positions // self.order.epoch_size, self.packed.seq_len, self.shift_key)
        return (picked if self.mixture is None else self.mixture[picked].astype(np.int64)), shifts

    def __getitem__(self, start: int) -> Batch:
        windows = read_windows(self.packed, *self.samples(start))  # [B, S + 1]
        # Contiguous: a pinned copy of a strided view stays strided, and its copy to the GPU would
        # go through a pageable temporary (no overlap with compute).
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}


class MemmapLoader:
    """Endless micro-batches of one rank, resumable from `state_dict()["consumed"]`."""

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world_size: int, cache_dir: Path,
                 pin_memory: bool = False):  # fmt: skip
        self.cfg = cfg
        self.pin_memory = pin_memory  # page-locked batches: host-to-GPU copies overlap compute
        self.ds = ShardDataset(cfg.train_dirs, partial=cfg.partial)
        self.batch_size, self.world_size = batch_size, world_size
        packed = pack(self.ds, cfg.packing, cfg.seq_len, cfg.seed, cache_dir)
        mixture = mixture_index(packed, cfg, cache_dir) if cfg.mixture else None
        n = packed.num_windows if mixture is None else len(mixture)
        if n < world_size:
            raise ValueError(f"data.train_dirs: {n} samples of {cfg.seq_len + 1} tokens, fewer "
                             f"than the {world_size} ranks")  # fmt: skip
        key = derive_key("order", cfg.seed, self.ds.fingerprint, cfg.seq_len)
        self.order = SampleOrder(n, world_size, key)
        self.batches = _TrainBatches(packed, self.order, mixture, batch_size, rank, derive_key("shift", key))
        self.consumed = 0

    @property
    def samples_per_epoch(self) -> int:
        return self.order.epoch_size

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "fingerprint": self.ds.fingerprint,
                "seq_len": self.cfg.seq_len, "seed": self.cfg.seed,
                "mixture": sorted(self.cfg.mixture.items()), "packing": self.cfg.packing}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = self.state_dict()
        if state["fingerprint"] != now["fingerprint"]:
            raise DataStateError(
                f"data.train_dirs: the data changed since the checkpoint (fingerprint "
                f"{state['fingerprint']}, now {now['fingerprint']}: other shards, files or "
                "tokenizer); point data.train_dirs at the original data or start a new output_dir"
            )
        # Lists after a load; checkpoints from before packing existed packed as "stream".
        state = {**state, "mixture": [tuple(x) for x in state["mixture"]], "packing": state.get("packing", "stream")}
        for key in ("seq_len", "seed", "mixture", "packing"):
            if state[key] != now[key]:
                raise DataStateError(f"data.{key}: {now[key]!r}, but the checkpoint was written "
                                     f"with {state[key]!r}; it fixes the sample order")  # fmt: skip
        self.consumed = int(state["consumed"])

    def __iter__(self) -> Iterator[Batch]:
        step = self.batch_size * self.world_size
        starts = itertools.count(self.consumed, step)
        w = self.cfg.num_workers
        loader = DataLoader(self.batches, batch_size=None, sampler=starts, num_workers=w, pin_memory=self.pin_memory,
                            persistent_workers=False, prefetch_factor=4 if w else None)  # fmt: skip
        for batch in loader:
            self.consumed += step
            yield batch


class StreamingLoader:
    """The streaming fallback (`data.source: streaming`) behind MemmapLoader's interface.

    Full batches only (every label counts, as in memmap batches); passes repeat with the next epoch.
    """

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world_size: int, pin_memory: bool = False):
        from pile_prep.streaming import StreamingConfig, make_streaming_loader  # needs `datasets`

        scfg = StreamingConfig(**asdict(cfg.streaming), seed=cfg.seed)
        self._loader = make_streaming_loader(scfg, cfg.seq_len, batch_size, rank, world_size,
                                             cfg.num_workers, drop_last=True, pin_memory=pin_memory)  # fmt: skip
        self.epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loader": self._loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self._loader.dataset.set_epoch(self.epoch)
        self._loader.load_state_dict(state["loader"])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            for batch in self._loader:
                yield {"input_ids": batch["input_ids"], "labels": batch["labels"]}
            self.epoch += 1
            self._loader.dataset.set_epoch(self.epoch)


def build_train_loader(cfg: DataConfig, batch_size: int, rank: int, world_size: int, cache_dir: Path,
                       pin_memory: bool = False) -> MemmapLoader | StreamingLoader:  # fmt: skip
    """This rank's training loader; `pin_memory` where batches go to a GPU."""
    if cfg.source == "streaming":
        return StreamingLoader(cfg, batch_size, rank, world_size, pin_memory)
    return MemmapLoader(cfg, batch_size, rank, world_size, cache_dir, pin_memory)


# --- evaluation -----------------------------------------------------------------------------------


class EvalSet:
    """The held-out windows, packed by `packing`; rank r reads samples r, r + W, ... (equal counts).

    "stream" reads the windows in stream order; the grouped packings read them in a fixed keyed
    order, so that an evaluation of `max_batches` covers every source. The packing's document
    order uses VAL_PACKING_SEED: the same windows for every run.
    """

    def __init__(self, dirs: list[str], seq_len: int, rank: int, world_size: int, packing: str = "stream",
                 cache_dir: Path | None = None, progress: bool = False, partial: bool = False):  # fmt: skip
        self.progress = progress  # a progress bar on stderr per pass over the batches (on a terminal)
        self.ds = ShardDataset(dirs, partial=partial)
        self.packed = pack(self.ds, packing, seq_len, VAL_PACKING_SEED, cache_dir)
        self.rank, self.world_size = rank, world_size
        n = self.packed.num_windows
        self.per_rank = n // world_size
        if self.per_rank == 0:
            raise ValueError(f"data.val_dirs: fewer than {world_size} samples of {seq_len + 1} tokens")
        self._order = None if packing == "stream" else FeistelPermutation(n, derive_key("val", self.ds.fingerprint))

    @property
    def source_names(self) -> list[str]:
        return self.ds.source_names

    def batches(self, batch_size: int, max_batches: int) -> Iterator[Batch]:
        """input_ids, labels and source_ids (the label token's pile_set_name index) [B, S]."""
        count = self.per_rank if not max_batches else min(self.per_rank, max_batches * batch_size)
        mine = np.arange(count, dtype=np.int64) * self.world_size + self.rank
        if self._order is not None:
            mine = self._order(mine)
        starts = range(0, count, batch_size)
        # disable=None: a bar on a terminal only, never in a log or a pipe.
        for a in tqdm(starts, desc="eval", unit="batch", disable=None if self.progress else True, leave=False):
            samples = mine[a : a + batch_size]
            windows = read_windows(self.packed, samples)
            sources = np.stack([self.packed.source_ids(i)[1:] for i in samples.tolist()])
            yield {"input_ids": windows[:, :-1], "labels": windows[:, 1:],
                   "source_ids": torch.from_numpy(sources.astype(np.int64))}  # fmt: skip
