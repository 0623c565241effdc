"""Packings (`data.packing`): every document once, grouped as promised, deterministic, resumable,
disjoint across ranks, mixture weights honoured; validation under any packing and per document."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ioe_train.config import DataConfig
from ioe_train.data import EvalSet, MemmapLoader, epoch_shifts
from ioe_train.evaluate import evaluate_dirs
from ioe_train.model import ModelConfig, build_model, init_weights
from ioe_train.moe import MoEConfig
from ioe_train.packing import content_signature_index, pack
from pile_prep.packing import segment_continuity
from pile_prep.reader import ShardDataset
from pile_prep.sample import packing_continuity
from tests.distributed import run_distributed

S = 32
GROUPED = ("by_source", "similarity")


def documents_of(packed) -> list[tuple[int, ...]]:
    """The packed stream's documents (split at EOS) in packed order, read through `window_ranges`."""
    stream = np.concatenate([packed.ds.tokens(a, b) for a, b in packed._pieces(0, int(packed.spans[-1]))])
    ends = np.flatnonzero(stream == packed.ds.eos_id)
    return [tuple(d) for d in np.split(stream, ends[:-1] + 1)]


@pytest.mark.parametrize("packing", GROUPED)
def test_a_packing_holds_every_document_once(shards, tmp_path, packing):
    ds = ShardDataset([shards[0]])
    packed = pack(ds, packing, S, seed=0, cache_dir=tmp_path)
    data_order = [tuple(ds.document(i)) for i in range(ds.num_documents)]
    packed_docs = documents_of(packed)
    assert Counter(packed_docs) == Counter(data_order)
    assert packed_docs != data_order  # reordered
    again = pack(ds, packing, S, seed=0, cache_dir=tmp_path / "other")  # built anew: the same order
    assert np.array_equal(np.asarray(again.order), np.asarray(packed.order))
    reseeded = np.asarray(pack(ds, packing, S, 1, tmp_path).order)
    # by_source: the seed shuffles each source; similarity: signatures fix the order, the seed breaks ties.
    assert np.array_equal(reseeded, np.asarray(packed.order)) == (packing == "similarity")


def test_by_source_windows_hold_one_source(shards, tmp_path):
    ds = ShardDataset([shards[0]])
    packed = pack(ds, "by_source", S, seed=0, cache_dir=tmp_path)
    stream = pack(ds, "stream", S, seed=0, cache_dir=tmp_path)
    mixed = [len(set(p.source_ids(i).tolist())) > 1 for p in (packed, stream) for i in range(p.num_windows)]
    assert not any(mixed[: packed.num_windows]) and any(mixed[packed.num_windows :])
    assert len(packed.spans) - 1 == len(ds.source_names)  # one span per source
    shifted = [set(packed.source_ids(i, shift=S - 1).tolist()) for i in range(packed.num_windows)]
    assert all(len(s) == 1 for s in shifted)  # a shifted window wraps within its source's span
    assert packed.window_sources().tolist() == [s.pop() for s in shifted]


def test_similarity_puts_documents_that_share_words_next_to_each_other(domain_shards, tmp_path):
    ds = ShardDataset([domain_shards[0]])  # 8 hidden domains; the signature never sees the labels
    signatures = content_signature_index(ds, tmp_path, workers=2)
    assert np.array_equal(signatures, content_signature_index(ds, tmp_path / "one", workers=1))
    domains = ds.document_sources()[np.asarray(pack(ds, "similarity", 64, seed=0, cache_dir=tmp_path).order)]
    neighbours = float((domains[1:] == domains[:-1]).mean())  # of one domain; 1/8 in a random order
    assert neighbours > 0.25  # documents of ~33 words: a weak signature (0.97 at the shipped 256)


def test_windows_shift_between_epochs_and_wrap_within_the_stream(shards, tmp_path):
    ds = ShardDataset([shards[0]])
    packed = pack(ds, "stream", S, seed=0, cache_dir=tmp_path)
    stream = ds.tokens(0, ds.num_tokens)
    assert np.array_equal(packed.tokens(3), stream[3 * S : 4 * S + 1])
    assert np.array_equal(packed.tokens(3, shift=5), stream[3 * S + 5 : 4 * S + 6])
    last, shift = packed.num_windows - 1, S - 1
    start = last * S + shift
    wrapped = np.concatenate([stream[start:], stream[: start + S + 1 - ds.num_tokens]])
    assert np.array_equal(packed.tokens(last, shift), wrapped)
    shifts = epoch_shifts(np.array([0, 1, 2, 3, 0]), S, key=11)
    assert shifts[0] == shifts[4] == 0 and len(set(shifts[1:4].tolist())) > 1 and (shifts < S).all()


def grouped_loader(train, tmp_path, rank=0, world=2, **kw) -> MemmapLoader:
    cfg = DataConfig(train_dirs=[str(train)], seq_len=S, packing="by_source", num_workers=0, **kw)
    return MemmapLoader(cfg, 4, rank, world, tmp_path / "cache")


def test_a_grouped_packing_resumes_exactly(shards, tmp_path):
    train, _ = shards
    first = grouped_loader(train, tmp_path)
    epoch = first.samples_per_epoch // 8
    batches = list(itertools.islice(iter(first), epoch + 3))  # into the second (shifted) epoch
    part = grouped_loader(train, tmp_path)
    list(itertools.islice(iter(part), epoch + 1))
    resumed = grouped_loader(train, tmp_path)
    resumed.load_state_dict(part.state_dict())
    for want, got in zip(batches[epoch + 1 :], itertools.islice(iter(resumed), 2)):
        assert torch.equal(want["input_ids"], got["input_ids"])
    other = DataConfig(train_dirs=[str(train)], seq_len=S, packing="similarity", num_workers=0)
    with pytest.raises(ValueError, match=r"data.packing: 'similarity', but the checkpoint was written with 'by_source'"):
        MemmapLoader(other, 4, 0, 2, tmp_path / "cache").load_state_dict(part.state_dict())


def _grouped_samples(rank, world, train, cache):
    cfg = DataConfig(train_dirs=[train], seq_len=S, packing="by_source", num_workers=0)
    ld = MemmapLoader(cfg, 4, rank, world, cache)
    steps = ld.samples_per_epoch // (4 * world)
    mine = np.concatenate([ld.batches.samples(k * 4 * world)[0] for k in range(steps)]).tolist()
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    flat = [i for share in shares for i in share]
    assert len(flat) == len(set(flat)) == steps * 4 * world  # disjoint
    assert len(set(flat)) >= ld.samples_per_epoch - 4 * world + 1


def test_grouped_packing_is_disjoint_across_ranks(shards, tmp_path):
    pack(ShardDataset([shards[0]]), "by_source", S, 0, tmp_path / "cache")  # as local rank 0 would first
    run_distributed(_grouped_samples, str(shards[0]), tmp_path / "cache")


def test_mixture_weights_hold_under_by_source_packing(shards, tmp_path):
    train, _ = shards
    ld = grouped_loader(train, tmp_path, mixture={"Github": 0.0, "ArXiv": 2.0})
    packed, names = ld.batches.packed, ShardDataset([train]).source_names
    truth = [names[int(packed.source_ids(i)[0])] for i in range(packed.num_windows)]  # one source each
    windows, picked = Counter(truth), Counter(truth[i] for i in ld.batches.mixture.tolist())
    assert windows["Github"] > 0 and picked == Counter({**windows, "Github": 0, "ArXiv": 2 * windows["ArXiv"]})


def test_eval_set_under_a_grouped_packing_covers_every_source(shards, tmp_path):
    _, val = shards
    sets = [EvalSet([str(val)], S, r, 2, "by_source", tmp_path) for r in range(2)]
    first = next(sets[0].batches(batch_size=8, max_batches=1))
    assert len(set(first["source_ids"][:, 0].tolist())) > 2  # not one source after another
    windows = [tuple(b["input_ids"][i].tolist()) for es in sets for b in es.batches(4, 0)
               for i in range(b["input_ids"].shape[0])]  # fmt: skip
    assert len(windows) == len(set(windows)) == 2 * sets[0].per_rank
    with pytest.raises(ValueError, match="needs a cache directory"):
        EvalSet([str(val)], S, 0, 1, "by_source")


def test_per_document_evaluation_is_block_causal_attention_with_the_ioe_reset(domain_shards, tmp_path):
    moe = MoEConfig(router="ioe", num_experts=4, expert_hidden_dim=32, ioe_segment_len=8)
    plain = ModelConfig(name="tiny_moe", vocab_size=129, eos_id=128, max_seq_len=64, moe=moe)
    torch.manual_seed(0)
    model = build_model(plain)
    init_weights(model)
    isolated = build_model(ModelConfig(**{**plain.__dict__, "attention": "block_causal",
                                          "moe": MoEConfig(**{**moe.__dict__, "ioe_document_reset": True})}))
    isolated.load_state_dict(model.state_dict())
    val = [domain_shards[1]]
    per_doc = evaluate_dirs(model, val, 64, 8, 4, per_document=True)
    assert per_doc == evaluate_dirs(isolated, val, 64, 8, 4)
    assert per_doc["val/loss"] != evaluate_dirs(model, val, 64, 8, 4)["val/loss"]
    grouped = evaluate_dirs(model, val, 64, 8, 4, packing="by_source", cache_dir=tmp_path)
    assert grouped["val/loss"] != per_doc["val/loss"]


def test_segment_continuity_counts_routed_tokens_whose_previous_segment_is_theirs():
    # One span of 9 tokens, S 8, L 2: one window, inputs [0, 8); segments 1..3 are routed.
    docs = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2])
    sources = np.array([5, 5, 5, 5, 5, 5, 6, 6, 6])
    # segment 1 = (0, 1) after (0, 0): 1 token of doc 0; segment 2 = (1, 1) after (0, 1): mixed;
    # segment 3 = (1, 2) after (1, 1): 1 token. Sources: 2 + 2 (after (5, 5)) + 0 (after (5, 6)).
    assert segment_continuity(docs, sources, np.array([9]), 8, 2) == (2 / 6, 4 / 6)
    # Two spans of 5: windows of S 4 never cross them.
    assert segment_continuity(np.array([0] * 5 + [1] * 5), np.zeros(10), np.array([5, 5]), 4, 2) == (1.0, 1.0)


def test_packing_report_grouping_by_source_keeps_the_domain():
    rng = np.random.default_rng(0)
    docs = [(int(rng.integers(4)), rng.integers(0, 16, size=int(rng.integers(1, 6))).tolist()) for _ in range(400)]
    report = packing_continuity(docs, words=16, seq_len=16, segment_len=4)
    assert report["by_source"][1] == 1.0 > report["stream"][1]
    assert max(r[0] for r in report.values()) < 0.1  # documents shorter than two segments: never their own


def test_a_grouped_loader_in_worker_processes_gives_the_same_batches(shards, tmp_path):
    train, _ = shards
    plain = list(itertools.islice(iter(grouped_loader(train, tmp_path)), 3))
    workers = grouped_loader(train, tmp_path, )
    workers.cfg.num_workers = 2  # the packing's order travels as file names, mapped again there
    for want, got in zip(plain, itertools.islice(iter(workers), 3)):
        assert torch.equal(want["input_ids"], got["input_ids"])
