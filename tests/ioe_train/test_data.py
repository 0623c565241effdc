from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ioe_train.config import DataConfig, StreamingDataConfig
from ioe_train.data import (
    DataStateError,
    EvalSet,
    MemmapLoader,
    StreamingLoader,
    mixture_copies,
)
from ioe_train.order import FeistelPermutation, SampleOrder, derive_key
from pile_prep.reader import ShardDataset
from tests.distributed import run_distributed

S = 32


def loader(train, tmp_path, rank=0, world=2, batch=4, **kw) -> MemmapLoader:
    cfg = DataConfig(train_dirs=[str(train)], seq_len=S, **kw)
    return MemmapLoader(cfg, batch, rank, world, tmp_path / "cache")


def take(ld, n):
    return list(itertools.islice(iter(ld), n))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_is_a_permutation(n):
    perm = FeistelPermutation(n, key=123)(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    if n >= 64:  # a shuffle, not the identity, and another key gives another order
        assert (perm != np.arange(n)).mean() > 0.9
        assert (FeistelPermutation(n, key=124)(np.arange(n)) != perm).mean() > 0.9


def test_rank_shares_are_disjoint_and_cover_each_epoch():
    n, w = 1003, 3
    order = SampleOrder(n, w, key=derive_key("t"))
    assert order.epoch_size == 1002  # the tail of n % w samples is dropped
    for epoch in range(2):
        per_rank = order.epoch_size // w
        shares = [order.samples(order.rank_positions(epoch * order.epoch_size, per_rank, r))
                  for r in range(w)]  # fmt: skip
        union = np.concatenate(shares)
        assert len(set(union.tolist())) == order.epoch_size  # no overlap, no gap
    # each epoch reshuffles
    e0 = order.samples(np.arange(order.epoch_size))
    e1 = order.samples(np.arange(order.epoch_size, 2 * order.epoch_size))
    assert (e0 != e1).any()


def test_batches_are_windows_of_the_stream(shards, tmp_path):
    train, _ = shards
    ds = ShardDataset([train])
    ld = loader(train, tmp_path, rank=1)
    (batch,) = take(ld, 1)
    samples, _ = ld.batches.samples(0)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, S)
    assert batch["input_ids"].dtype == torch.int64
    for row, i in enumerate(samples.tolist()):
        window = ds.tokens(i * S, i * S + S + 1).astype(np.int64)
        assert batch["input_ids"][row].tolist() == window[:-1].tolist()
        assert batch["labels"][row].tolist() == window[1:].tolist()
    assert ld.consumed == 4 * 2  # samples of all ranks


def test_order_does_not_depend_on_workers(shards, tmp_path):
    train, _ = shards
    a = take(loader(train, tmp_path, num_workers=0), 5)
    b = take(loader(train, tmp_path, num_workers=2), 5)
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"])


def test_order_depends_on_seed_and_seq_len(shards, tmp_path):
    train, _ = shards
    base, _ = loader(train, tmp_path).batches.samples(0)
    assert not np.array_equal(base, loader(train, tmp_path, seed=1).batches.samples(0)[0])


def test_resume_continues_exactly(shards, tmp_path):
    train, _ = shards
    full = take(loader(train, tmp_path), 6)
    first = loader(train, tmp_path)
    take(first, 2)
    state = first.state_dict()
    resumed = loader(train, tmp_path)
    resumed.load_state_dict(state)
    for x, y in zip(full[2:], take(resumed, 4)):
        assert torch.equal(x["input_ids"], y["input_ids"])


def test_resume_refuses_other_data_or_order(shards, tmp_path):
    train, _ = shards
    state = loader(train, tmp_path).state_dict()
    with pytest.raises(DataStateError, match="data changed since the checkpoint"):
        loader(train, tmp_path).load_state_dict({**state, "fingerprint": "sha256:other"})
    with pytest.raises(DataStateError, match=r"data.seq_len: 32, but the checkpoint was written with 64"):
        loader(train, tmp_path).load_state_dict({**state, "seq_len": 64})
    with pytest.raises(DataStateError, match="data.mixture"):
        loader(train, tmp_path).load_state_dict({**state, "mixture": [["Github", 2.0]]})


def test_mixture_copies_are_exact_in_expectation():
    sources = np.repeat(np.arange(3), 20000)  # [N]
    copies = mixture_copies(sources, np.array([0.0, 2.0, 0.5]), key=7)
    assert (copies[sources == 0] == 0).all()
    assert (copies[sources == 1] == 2).all()
    half = copies[sources == 2]
    assert set(half.tolist()) == {0, 1} and abs(half.mean() - 0.5) < 0.02


def test_mixture_reweights_sources(shards, tmp_path):
    train, _ = shards
    ds = ShardDataset([train])
    ld = loader(train, tmp_path, mixture={"Github": 0.0, "ArXiv": 2.0})
    n = (ds.num_tokens - 1) // S
    first = np.array([ds.token_source_ids(i * S, i * S + 1)[0] for i in range(n)])
    names = ds.source_names
    counts = np.bincount(first, minlength=len(names))
    expected = n - counts[names.index("Github")] + counts[names.index("ArXiv")]
    assert ld.order.num_samples == expected
    epoch = ld.batches.mixture[ld.order.samples(np.arange(ld.order.num_samples))]
    picked = first[np.asarray(epoch, np.int64)]
    assert names.index("Github") not in picked.tolist()
    with pytest.raises(ValueError, match=r"data.mixture.Nope: not a pile_set_name"):
        loader(train, tmp_path, mixture={"Nope": 1.0})


def test_eval_set_attributes_label_tokens_to_sources(shards):
    _, val = shards
    ds = ShardDataset([val])
    sets = [EvalSet([str(val)], S, r, 2) for r in range(2)]
    assert sets[0].per_rank == sets[1].per_rank == (ds.num_tokens - 1) // S // 2
    batch = next(sets[1].batches(batch_size=3, max_batches=0))  # rank 1: samples 1, 3, 5
    assert batch["input_ids"][1].tolist() == ds.tokens(3 * S, 4 * S).astype(np.int64).tolist()
    assert batch["source_ids"][0].tolist() == ds.token_source_ids(S + 1, 2 * S + 1).tolist()
    total = sum(b["input_ids"].shape[0] for es in sets for b in es.batches(3, 0))
    assert total == 2 * sets[0].per_rank
    assert sum(b["input_ids"].shape[0] for b in sets[0].batches(3, 2)) == 6  # max_batches


def _gather_samples(rank, world, train, cache):
    ld = MemmapLoader(DataConfig(train_dirs=[train], seq_len=S, num_workers=0), 4, rank, world, cache)
    steps = ld.samples_per_epoch // (4 * world)
    mine = np.concatenate([ld.batches.samples(k * 4 * world)[0] for k in range(steps)]).tolist()
    take(ld, 2)
    assert ld.consumed == 2 * 4 * world
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    flat = [i for share in shares for i in share]
    assert len(flat) == len(set(flat)) == steps * 4 * world  # no overlap
    assert len(set(flat)) >= ld.samples_per_epoch - 4 * world + 1  # no gap beyond the last batch


def test_data_order_is_sharded_across_two_processes(shards, tmp_path):
    train, _ = shards
    run_distributed(_gather_samples, str(train), tmp_path / "cache")


def test_streaming_source_gives_the_same_batch_format_and_resumes(shards, tmp_path):
    raw = sorted((Path(shards[0]).parent / "raw").glob("0*.jsonl.zst"))
    files = [str(p) for p in raw[:2]]  # one file per rank: no read amplification (and no warning)
    cfg = DataConfig(source="streaming", seq_len=S, streaming=StreamingDataConfig(data_files=files))
    first = StreamingLoader(cfg, 3, 0, 2)
    batches = take(first, 4)
    assert batches[0]["input_ids"].shape == batches[0]["labels"].shape == (3, S)
    assert batches[0]["input_ids"].dtype == torch.int64
    assert torch.equal(batches[0]["input_ids"][:, 1:], batches[0]["labels"][:, :-1])
    part = StreamingLoader(cfg, 3, 0, 2)
    take(part, 2)
    resumed = StreamingLoader(cfg, 3, 0, 2)
    resumed.load_state_dict(part.state_dict())
    assert torch.equal(take(resumed, 1)[0]["input_ids"], batches[2]["input_ids"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device")
def test_batches_for_a_gpu_are_pinned(shards, tmp_path):
    cfg = DataConfig(train_dirs=[str(shards[0])], seq_len=S)
    batch = next(iter(MemmapLoader(cfg, 4, 0, 1, tmp_path / "cache", pin_memory=True)))
    assert batch["input_ids"].is_pinned() and batch["labels"].is_pinned()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_eval_shows_progress_on_a_terminal_only_when_asked(shards, monkeypatch, progress):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    batches = list(EvalSet([str(shards[1])], S, 0, 1, progress=progress).batches(batch_size=4, max_batches=3))
    assert len(batches) == 3
    assert ("eval:" in terminal.getvalue() and "/3 " in terminal.getvalue()) == progress
