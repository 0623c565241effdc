"""Training and evaluation batches read from pile-prep shards through memory maps.

Letters: S seq_len, B samples per micro-batch, W data-parallel ranks, N samples, M mixture samples.

A sample is the window [i*S, i*S + S + 1) of the dataset's token stream (documents packed, each
followed by EOS): N = (tokens - 1) // S windows that overlap by the one token that is both the
last label of window i and the first input of window i + 1. `ioe_train.order.SampleOrder` maps
global positions to samples; a micro-batch of rank r is B consecutive positions of its share.
Each window is copied once, from the mapped shard straight into the batch tensor.

The data position saved in a checkpoint is `consumed`, the samples of all ranks handed to the
trainer so far, with what the order depends on (data fingerprint, seq_len, seed, mixture).
"""

from __future__ import annotations

import itertools
import os
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ioe_train.config import ConfigError, DataConfig
from ioe_train.order import SampleOrder, derive_key, hash_uniform
from pile_prep.reader import ShardDataset

Batch = dict[str, torch.Tensor]  # input_ids [B, S] int64, labels [B, S] int64 (+ source_ids in eval)
_MIXTURE_CHUNK = 1 << 20  # samples per lookup when finding each sample's source


class DataStateError(ValueError):
    """A checkpoint's data position that does not fit the data or config of this run."""


def num_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


def read_windows(ds: ShardDataset, samples: np.ndarray, seq_len: int) -> torch.Tensor:
    """Windows `samples` of the stream as one int64 tensor [len(samples), S + 1]."""
    out = np.empty((len(samples), seq_len + 1), np.int64)
    for row, i in enumerate(samples.tolist()):
        out[row] = ds.tokens(i * seq_len, i * seq_len + seq_len + 1)  # uint32 view -> int64 batch
    return torch.from_numpy(out)


# --- mixture --------------------------------------------------------------------------------------


def sample_sources(ds: ShardDataset, seq_len: int) -> np.ndarray:
    """Index into ds.source_names of each sample's first token: [N] (from the index files only)."""
    n = num_windows(ds.num_tokens, seq_len)
    out = np.empty(n, np.int32)
    for a in range(0, n, _MIXTURE_CHUNK):
        b = min(n, a + _MIXTURE_CHUNK)
        out[a:b] = ds.sources_at(np.arange(a, b, dtype=np.int64) * seq_len)
    return out


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


def mixture_index(ds: ShardDataset, cfg: DataConfig, cache_dir: Path) -> np.ndarray:
    """Sample index of each of the M mixture samples, sorted: [M] (memory-mapped, cached).

    Built once per (data fingerprint, seq_len, seed, weights) and written atomically to
    `cache_dir`; 4 bytes per mixture sample while N < 2^32.
    """
    check_mixture(cfg, ds.source_names)
    key = derive_key("mixture", ds.fingerprint, cfg.seq_len, cfg.seed, sorted(cfg.mixture.items()))
    path = cache_dir / f"mixture-{key:016x}.npy"
    if not path.exists():
        weights = np.array([cfg.mixture.get(name, 1.0) for name in ds.source_names])
        copies = mixture_copies(sample_sources(ds, cfg.seq_len), weights, key)
        n = len(copies)
        index = np.repeat(np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64), copies)
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Host and pid: ranks of several nodes may write the same shared directory at once.
        tmp = path.with_name(f"{path.stem}.tmp-{socket.gethostname()}-{os.getpid()}.npy")
        np.save(tmp, index)
        os.replace(tmp, path)  # atomic: ranks building the same file concurrently all agree
    return np.load(path, mmap_mode="r")


def prepare_mixture(cfg: DataConfig, cache_dir: Path) -> None:
    """Build the mixture index into `cache_dir` (if `cfg` has one), for the loaders to load.

    The trainer calls this on local rank 0 only, then a barrier: one build per node, not per rank.
    """
    if cfg.source == "memmap" and cfg.mixture:
        mixture_index(ShardDataset(cfg.train_dirs), cfg, cache_dir)


# --- training -------------------------------------------------------------------------------------


class _TrainBatches(Dataset):
    """Item p: rank `rank`'s micro-batch that starts at global position p (a map-style dataset,
    so DataLoader workers return batches in sampler order whatever their number)."""

    def __init__(self, ds: ShardDataset, order: SampleOrder, mixture: np.ndarray | None,
                 seq_len: int, batch_size: int, rank: int):  # fmt: skip
        self.ds, self.order, self.mixture = ds, order, mixture
        self.seq_len, self.batch_size, self.rank = seq_len, batch_size, rank

    def samples(self, start: int) -> np.ndarray:
        picked = self.order.samples(self.order.rank_positions(start, self.batch_size, self.rank))
        return picked if self.mixture is None else self.mixture[picked].astype(np.int64)

    def __getitem__(self, start: int) -> Batch:
        windows = read_windows(self.ds, self.samples(start), self.seq_len)  # [B, S + 1]
        # Contiguous: a pinned copy of a strided view stays strided, and its copy to the GPU would
        # go through a pageable temporary (no overlap with compute).
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}


class MemmapLoader:
    """Endless micro-batches of one rank, resumable from `state_dict()["consumed"]`."""

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world_size: int, cache_dir: Path,
                 pin_memory: bool = False):  # fmt: skip
        self.cfg = cfg
        self.pin_memory = pin_memory  # page-locked batches: host-to-GPU copies overlap compute
        self.ds = ShardDataset(cfg.train_dirs)
        self.batch_size, self.world_size = batch_size, world_size
        mixture = mixture_index(self.ds, cfg, cache_dir) if cfg.mixture else None
        n = num_windows(self.ds.num_tokens, cfg.seq_len) if mixture is None else len(mixture)
        if n < world_size:
            raise ValueError(f"data.train_dirs: {n} samples of {cfg.seq_len + 1} tokens, fewer "
                             f"than the {world_size} ranks")  # fmt: skip
        key = derive_key("order", cfg.seed, self.ds.fingerprint, cfg.seq_len)
        self.order = SampleOrder(n, world_size, key)
        self.batches = _TrainBatches(self.ds, self.order, mixture, cfg.seq_len, batch_size, rank)
        self.consumed = 0

    @property
    def samples_per_epoch(self) -> int:
        return self.order.epoch_size

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "fingerprint": self.ds.fingerprint,
                "seq_len": self.cfg.seq_len, "seed": self.cfg.seed,
                "mixture": sorted(self.cfg.mixture.items())}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = self.state_dict()
        if state["fingerprint"] != now["fingerprint"]:
            raise DataStateError(
                f"data.train_dirs: the data changed since the checkpoint (fingerprint "
                f"{state['fingerprint']}, now {now['fingerprint']}: other shards, files or "
                "tokenizer); point data.train_dirs at the original data or start a new output_dir"
            )
        state = {**state, "mixture": [tuple(x) for x in state["mixture"]]}  # lists after a load
        for key in ("seq_len", "seed", "mixture"):
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
    """The held-out windows in stream order; rank r reads samples r, r + W, ... (equal counts)."""

    def __init__(self, dirs: list[str], seq_len: int, rank: int, world_size: int):
        self.ds = ShardDataset(dirs)
        self.seq_len, self.rank, self.world_size = seq_len, rank, world_size
        self.per_rank = num_windows(self.ds.num_tokens, seq_len) // world_size
        if self.per_rank == 0:
            raise ValueError(f"data.val_dirs: fewer than {world_size} samples of {seq_len + 1} tokens")

    @property
    def source_names(self) -> list[str]:
        return self.ds.source_names

    def batches(self, batch_size: int, max_batches: int) -> Iterator[Batch]:
        """input_ids, labels and source_ids (the label token's pile_set_name index) [B, S]."""
        count = self.per_rank if not max_batches else min(self.per_rank, max_batches * batch_size)
        mine = np.arange(count, dtype=np.int64) * self.world_size + self.rank
        s = self.seq_len
        for a in range(0, count, batch_size):
            samples = mine[a : a + batch_size]
            windows = read_windows(self.ds, samples, s)
            sources = np.stack([self.ds.token_source_ids(i * s + 1, i * s + s + 1) for i in samples.tolist()])
            yield {"input_ids": windows[:, :-1], "labels": windows[:, 1:],
                   "source_ids": torch.from_numpy(sources.astype(np.int64))}  # fmt: skip
