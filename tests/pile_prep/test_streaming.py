"""Streaming fallback: same tokens as the offline shards, exact rank x worker split, resume."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from torch.utils.data import DataLoader, IterableDataset

from pile_prep.packing import BlockPacker
from pile_prep.streaming import (
    StreamingConfig,
    StreamingError,
    StreamingTokenDataset,
    StreamingWarning,
    amplification_warning,
    make_streaming_loader,
    read_amplification,
    reader_files,
)
from pile_prep.tokenize import TokenizeOptions, tokenize
from pile_prep.tokenizer import load_tokenizer

from .conftest import SPECIAL_DOCS, pile_record, write_jsonl_zst

S = 64  # seq_len of the tests: a few hundred blocks per corpus


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_corpus) -> list[Path]:
    """Six files of 50 records (sample texts; every 7th record an empty text, not a document)."""
    texts = []
    for p in sample_corpus:
        raw = zstandard.ZstdDecompressor().decompress(p.read_bytes(), max_output_size=1 << 28)
        texts += [json.loads(line)["text"] for line in raw.splitlines()]
    out = tmp_path_factory.mktemp("six")
    files = []
    for f in range(6):
        recs = [pile_record("" if j % 7 == 3 else texts[50 * f + j], "Pile-CC") for j in range(50)]
        files.append(write_jsonl_zst(out / f"{f:02d}.jsonl.zst", recs))
    return files


def cfg_of(files, **kw) -> StreamingConfig:
    return StreamingConfig(data_files=[str(p) for p in files], **kw)


def offline_stream(inputs: list[Path], out: Path) -> np.ndarray:
    tokenize(TokenizeOptions(inputs=[str(p) for p in inputs], output=out, workers=1,
                             shard_bytes=50_000, progress=False))  # fmt: skip
    return np.concatenate([np.fromfile(p, "<u4") for p in sorted(out.glob("shard-*.bin"))])


def windows(stream: np.ndarray, seq_len: int) -> list[np.ndarray]:
    n = (len(stream) - 1) // seq_len
    return [stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]


def block_of(item: dict[str, torch.Tensor]) -> np.ndarray:
    assert item["input_ids"].dtype == item["labels"].dtype == torch.int64
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    return np.concatenate([item["input_ids"].numpy(), item["labels"].numpy()[-1:]])


def records(files: list[Path]) -> list[tuple[str, int, str]]:
    """(resolved path, record index, text) of every document (non-empty text) of the files."""
    docs = []
    for p in files:
        raw = zstandard.ZstdDecompressor().decompress(p.read_bytes(), max_output_size=1 << 28)
        for j, line in enumerate(raw.splitlines()):
            if text := json.loads(line)["text"]:
                docs.append((str(p.resolve()), j, text))
    return docs


# --- the packer ---------------------------------------------------------------------------------


def test_packer_gives_stride_s_windows_and_the_next_block_position():
    rng = np.random.default_rng(0)
    seq_len = 16
    # Short documents, some in several pieces, and one piece far larger than the buffer.
    docs = [[rng.integers(0, 1000, rng.integers(1, 40)) for _ in range(rng.integers(1, 3))]
            for _ in range(60)]  # fmt: skip
    docs[30] = [rng.integers(0, 1000, 500)]
    packer: BlockPacker[int] = BlockPacker(seq_len)
    blocks, positions = [], []
    for d, pieces in enumerate(docs):
        for piece in pieces:
            for block, pos in packer.push(piece, d):
                blocks.append(block)
                positions.append(pos)
    stream = np.concatenate([p for pieces in docs for p in pieces])
    assert len(blocks) == (len(stream) - 1) // seq_len
    for got, want in zip(blocks, windows(stream, seq_len)):
        np.testing.assert_array_equal(got, want)
    starts = np.cumsum([0] + [sum(len(p) for p in pieces) for pieces in docs])
    for i, (d, offset) in enumerate(positions):
        assert 0 <= offset < starts[d + 1] - starts[d]
        assert starts[d] + offset == (i + 1) * seq_len  # first token of block i+1


# --- same content as the offline shards ----------------------------------------------------------


def test_one_reader_stream_equals_offline_shards(tmp_path, sample_corpus, special_input, tok):
    """Two .jsonl.zst files, the tokenizer's edge cases (JSONL and Parquet): identical tokens."""
    parquet = tmp_path / "special.parquet"
    pq.write_table(pa.table({"text": [t for t, _ in SPECIAL_DOCS],
                             "meta": [{"pile_set_name": s} for _, s in SPECIAL_DOCS]}), parquet)  # fmt: skip
    inputs = [*sample_corpus, special_input, parquet]
    stream = offline_stream(inputs, tmp_path / "out").astype(np.int64)

    ds = StreamingTokenDataset(cfg_of(inputs), S, rank=0, world_size=1, tokenizer=tok)
    items = list(ds)
    n = len(items) * S
    assert len(items) == (len(stream) - 1) // S  # only the last partial block is dropped
    input_ids = torch.cat([it["input_ids"] for it in items]).numpy()
    labels = torch.cat([it["labels"] for it in items]).numpy()
    np.testing.assert_array_equal(input_ids, stream[:n])
    np.testing.assert_array_equal(labels, stream[1 : n + 1])
    # One DataLoader worker is the same single reader.
    in_worker = [block_of(b) for b in DataLoader(ds, batch_size=None, num_workers=1)]
    assert [b.tolist() for b in in_worker] == [block_of(b).tolist() for b in items]


def test_hub_style_dataset_dir_resolves_patterns_like_local_files(corpus, tok):
    """A dataset id + data_files patterns (here a local dataset dir: no network in tests)."""
    dataset_dir = str(corpus[0].parent)
    by_id = StreamingTokenDataset(
        StreamingConfig(data_files=["0[0-2].jsonl.zst"], hub_dataset=dataset_dir), S, 0, 1, tok
    )
    local = StreamingTokenDataset(cfg_of(corpus[:3]), S, 0, 1, tok)
    assert [Path(f).name for f in by_id.files] == ["00.jsonl.zst", "01.jsonl.zst", "02.jsonl.zst"]
    assert [block_of(b).tolist() for b in by_id] == [block_of(b).tolist() for b in local]
    # No data_files: the dataset's own layout (here every file is "train").
    assert len(StreamingTokenDataset(StreamingConfig(hub_dataset=dataset_dir), S, 0, 1).files) == 6
    with pytest.raises(StreamingError, match="no data files for split 'validation'"):
        StreamingTokenDataset(StreamingConfig(split="validation", hub_dataset=dataset_dir), S, 0, 1)


# --- sharding: 2 ranks x 2 DataLoader workers ---------------------------------------------------


class _DocsPerReader(IterableDataset):
    """Yields (reader, file, record, tokens) of the wrapped dataset's documents, per worker."""

    def __init__(self, ds: StreamingTokenDataset):
        self.ds = ds

    def __iter__(self):
        reader = self.ds.rank * 2 + torch.utils.data.get_worker_info().id  # 2 workers per rank
        for doc in self.ds.iter_documents():
            yield reader, doc.file, doc.record, np.concatenate(doc.tokens)


def _as_is(x):
    return x


@pytest.mark.parametrize("num_files, mode", [(4, "whole"), (6, "mixed"), (2, "stride")])
def test_two_ranks_two_workers_read_every_document_exactly_once(corpus, tok, num_files, mode):
    files = corpus[:num_files]
    cfg = cfg_of(files)
    per_reader: dict[int, list] = {}
    got_blocks: Counter = Counter()
    for rank in range(2):
        ds = StreamingTokenDataset(cfg, S, rank=rank, world_size=2, tokenizer=tok)
        for reader, file, record, tokens in DataLoader(_DocsPerReader(ds), batch_size=None,
                                                       num_workers=2, collate_fn=_as_is):  # fmt: skip
            per_reader.setdefault(reader, []).append((file, record, tokens))
        got_blocks.update(
            block_of(b).tobytes() for b in DataLoader(ds, batch_size=None, num_workers=2)
        )

    assert sorted(per_reader) == [0, 1, 2, 3]
    keys = [(f, r) for docs in per_reader.values() for f, r, _ in docs]
    expected = records(files)
    assert len(keys) == len(set(keys))  # no document twice
    assert set(keys) == {(f, r) for f, r, _ in expected}  # none missed, no empty one
    text = {(f, r): t for f, r, t in expected}
    for docs in per_reader.values():
        for f, r, tokens in docs:
            assert tokens.tolist() == tok.encode(text[f, r]) + [tok.eos_id]
    files_read = {reader: {f for f, _, _ in docs} for reader, docs in per_reader.items()}
    if mode == "whole":  # one file per reader
        assert all(len(fs) == 1 for fs in files_read.values())
    elif mode == "stride":  # every reader takes every 4th record of both files
        assert all(len(fs) == 2 for fs in files_read.values())
    else:  # one whole file each, then a stride over the 2 files left over
        assert all(len(fs) == 3 for fs in files_read.values())

    # Each reader packs its own document stream; the blocks of all readers are exactly those.
    want_blocks: Counter = Counter()
    for docs in per_reader.values():
        stream = np.concatenate([t for _, _, t in docs]).astype(np.int64)
        want_blocks.update(w.tobytes() for w in windows(stream, S))
    assert got_blocks == want_blocks


def test_reader_files_deals_whole_files_then_strides_the_rest():
    files = [f"{i}" for i in range(7)]
    plans = [reader_files(files, r, 3) for r in range(3)]
    assert [[(w.path, w.shared) for w in p] for p in plans] == [
        [("0", False), ("3", False), ("6", True)],
        [("1", False), ("4", False), ("6", True)],
        [("2", False), ("5", False), ("6", True)],
    ]
    assert all(w.shared for r in range(4) for w in reader_files(files[:3], r, 4))


def test_shuffle_keeps_the_split_exact_and_is_deterministic(corpus, tok):
    files = corpus[:3]

    def keys(seed: int, epoch: int = 0) -> list[list[tuple[str, int]]]:
        out = []
        for rank in range(2):
            ds = StreamingTokenDataset(cfg_of(files, shuffle_buffer=16, seed=seed), S, rank, 2, tok)
            ds.set_epoch(epoch)
            out.append([(d.file, d.record) for d in ds.iter_documents()])
        return out

    plain = [(f, r) for f, r, _ in records(files)]
    a, b, c, d = keys(0), keys(0), keys(1), keys(0, epoch=1)
    for run in (a, c, d):
        union = run[0] + run[1]
        assert len(union) == len(set(union)) and set(union) == set(plain)
    assert a == b  # same seed, same epoch: same order
    assert a != c and a != d  # new seed or new epoch: another order
    assert a[0] + a[1] != plain


# --- resume -------------------------------------------------------------------------------------


def _roundtrip(state):
    """As a trainer checkpoint would store it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _batches(loader, n=None) -> list[np.ndarray]:
    out = []
    for batch in loader:
        out.append(torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy())
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.filterwarnings("error:'set_vital' is deprecated")  # torchdata's, silenced at the source
@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_with_the_next_unseen_batch(tmp_path, corpus, tok, num_workers):
    # Rank 1 of 2 with 2 workers reads files 2 and 3 whole; file 3 is short, so its worker
    # runs out long before the other.
    short = write_jsonl_zst(
        tmp_path / "short.jsonl.zst", [pile_record(t, "x") for t, _ in SPECIAL_DOCS]
    )
    cfg = cfg_of([*corpus[:3], short])

    def loader():
        return make_streaming_loader(cfg, S, batch_size=3, rank=1, world_size=2,
                                     num_workers=num_workers, tokenizer=tok)  # fmt: skip

    full = _batches(loader())
    assert len(full) > 12
    # Before and after the short worker has run out, and near the end.
    for k in (1, 5, len(full) - 2):
        first = loader()
        head = _batches(first, k)
        state = _roundtrip(first.state_dict())
        resumed = loader()
        resumed.load_state_dict(state)
        rest = _batches(resumed)
        assert len(head) + len(rest) == len(full)
        for got, want in zip(head + rest, full):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_dataset_state_resumes_at_any_block(corpus, tok, shuffle_buffer):
    cfg = cfg_of(corpus[:2], shuffle_buffer=shuffle_buffer)
    full = [block_of(b) for b in StreamingTokenDataset(cfg, S, 0, 1, tok)]
    for k in (0, 1, 37, len(full) - 1, len(full)):
        ds = StreamingTokenDataset(cfg, S, 0, 1, tok)
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(ds.state_dict()))  # plain JSON types
        assert state["blocks"] == k
        fresh = StreamingTokenDataset(cfg, S, 0, 1, tok)
        fresh.load_state_dict(state)
        rest = [block_of(b) for b in fresh]
        assert [r.tolist() for r in rest] == [f.tolist() for f in full[k:]]
        assert [block_of(b).tolist() for b in fresh] == [f.tolist() for f in full]  # next pass


def test_state_from_another_setup_is_refused(corpus, tok):
    cfg = cfg_of(corpus[:2])
    ds = StreamingTokenDataset(cfg, S, 0, 1, tok)
    next(iter(ds))
    state = ds.state_dict()
    with pytest.raises(StreamingError, match="seq_len"):
        StreamingTokenDataset(cfg, 2 * S, 0, 1, tok).load_state_dict(state)
    other = StreamingTokenDataset(cfg, S, 1, 2, tok)
    other.load_state_dict(state)
    with pytest.raises(StreamingError, match="same world_size and num_workers"):
        next(iter(other))


# --- errors and imports --------------------------------------------------------------------------


def test_bad_record_and_bad_arguments_are_named(tmp_path, corpus, tok):
    bad = write_jsonl_zst(tmp_path / "bad.jsonl.zst",
                          [pile_record("fine", "x"), {"text": None, "meta": {}}])  # fmt: skip
    with pytest.raises(StreamingError, match=r"bad\.jsonl\.zst, record 2 \(line 2\): null 'text' field"):
        list(StreamingTokenDataset(cfg_of([bad]), S, 0, 1, tok))
    broken = write_jsonl_zst(
        tmp_path / "broken.jsonl.zst", [pile_record("fine", "x"), b"{not json"]
    )
    with pytest.raises(StreamingError, match=r"broken\.jsonl\.zst, record 2 \(line 2\): not JSON"):
        list(StreamingTokenDataset(cfg_of([broken]), S, 0, 1, tok))
    with pytest.raises(StreamingError, match=r"record 1 \(line 1\): no 'body' field \(keys: 'text', 'meta'\)"):
        list(StreamingTokenDataset(cfg_of(corpus[:1], text_field="body"), S, 0, 1, tok))
    with pytest.raises(StreamingError, match="rank 2"):
        StreamingTokenDataset(cfg_of(corpus[:1]), S, 2, 2)
    with pytest.raises(StreamingError, match="data_files"):
        StreamingTokenDataset(StreamingConfig(data_files=[]), S, 0, 1)


EDGE_LINES = {  # line -> pile-prep tokenize's reason; the streaming reader must refuse it too
    b'\xef\xbb\xbf{"text": "after a BOM"}': "not JSON: Unexpected UTF-8 BOM",
    b"\x0c": "not JSON: Expecting value",
    b'{"text": "first", "text": "second"}': "duplicated 'text' key",
    b'{"text": null}': "null 'text' field",
    b'{"text": "a", "te\\u0078t": "b"}': "duplicated 'text' key",  # escaped: the same key
    b'{"text": "a"}{"text": "b"}': "not JSON: Extra data",  # two objects on one line
    b'{"text": "a", "meta": {"pile_set_name": "A", "pile_set_name": "B"}}': "duplicated 'pile_set_name' key",
}


@pytest.mark.parametrize("line", EDGE_LINES, ids=["bom", "form-feed", "duplicated-key", "null", "escaped-key",
                                                  "two-objects", "duplicated-meta-key"])
def test_edge_lines_are_decided_as_offline(tmp_path, tok, line):
    from pile_prep.inputs import parse_line

    path = write_jsonl_zst(tmp_path / "edge.jsonl.zst", [pile_record("fine", "x"), line, pile_record("b", "y")])
    assert parse_line(line, 2, "text").error.startswith(EDGE_LINES[line])  # offline: a bad line
    with pytest.raises(StreamingError, match=r"edge\.jsonl\.zst(: cannot read record 1|, record 2)"):
        list(StreamingTokenDataset(cfg_of([path]), S, 0, 1, tok))


def test_more_readers_than_files_warns_with_the_amplification(corpus, tok):
    assert read_amplification(30, 64) == 64 and read_amplification(64, 16) == 1
    assert read_amplification(30, 16) == (16 + 16 * 14) / 30
    message = amplification_warning(30, 16, 4)
    assert message.startswith("streaming: 30 input files for 64 readers (16 ranks x 4 DataLoader "
                              "workers): 30 files are decompressed and parsed by every reader, "
                              "64.0x the reading of the inputs; with a multiple of 64 files (e.g. "
                              "64) each is read once")  # fmt: skip
    assert amplification_warning(32, 16, 2) is None
    with pytest.warns(StreamingWarning, match=r"2 input files for 3 readers .* 3\.0x"):
        make_streaming_loader(cfg_of(corpus[:2]), S, 2, 0, 3, tokenizer=tok)


def test_datasets_is_imported_only_when_streaming_runs():
    code = ("import sys, pile_prep, pile_prep.streaming; "
            "assert 'datasets' not in sys.modules and 'torchdata' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_jsonl_url_is_read_like_its_file(corpus):
    from pile_prep.streaming import _texts

    local = list(_texts(str(corpus[0]), "text", 3))
    assert local and list(_texts(corpus[0].resolve().as_uri(), "text", 3)) == local
