"""ShardDataset on shards made by the real tokenize step: values, ranges, refusals, handles."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import zstandard

from pile_prep import ShardDataset, ShardError
from pile_prep.sample import write_sample_corpus
from pile_prep.tokenize import TokenizeOptions, tokenize
from pile_prep.tokenizer import load_tokenizer
from pile_prep.verify import verify


def _tokenize(inputs: list[Path], out: Path, shard_bytes: int = 50_000) -> Path:
    tokenize(TokenizeOptions(inputs=[str(p) for p in inputs], output=out, workers=1,
                             shard_bytes=shard_bytes, progress=False))  # fmt: skip
    return out


def _records(path: Path) -> list[dict]:
    text = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes()).decode()
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    train0, train1, val = write_sample_corpus(root / "in", num_files=2, docs_per_file=300, seed=0)
    return {
        "train": _tokenize([train0, train1], root / "train"),
        "val": _tokenize([val], root / "val"),
        "records": _records(train0) + _records(train1),
        "val_records": _records(val),
    }


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _stream(directory: Path) -> np.ndarray:
    manifest = json.loads((directory / "manifest.json").read_text())
    bins = [np.fromfile(directory / f"{r['name']}.bin", "<u4") for r in manifest["shards"]]
    return np.concatenate(bins)


def test_totals_match_the_manifest(data):
    ds = ShardDataset(data["train"])
    manifest = json.loads((data["train"] / "manifest.json").read_text())
    assert ds.num_shards == manifest["totals"]["shards"] == len(list(data["train"].glob("*.bin")))
    assert ds.num_shards > 2  # the test needs several shards
    assert ds.num_tokens == manifest["totals"]["tokens"] == len(_stream(data["train"]))
    assert ds.num_documents == len(data["records"]) == 600
    assert ds.source_totals == manifest["sources"]
    assert ds.source_names == sorted({r["meta"]["pile_set_name"] for r in data["records"]})
    assert ds.tokenizer == manifest["tokenizer"]
    assert (ds.eos_id, ds.vocab_size) == (151643, 151665)


def test_documents_decode_to_the_input_texts(data, tok):
    ds = ShardDataset(data["train"])
    for i, rec in enumerate(data["records"]):
        doc = ds.document(i)
        assert doc.dtype == np.uint32
        assert doc[-1] == ds.eos_id and ds.eos_id not in doc[:-1]
        assert tok.decode(doc[:-1].tolist()) == unicodedata.normalize("NFC", rec["text"])
        assert ds.document_source(i) == rec["meta"]["pile_set_name"]
    np.testing.assert_array_equal(ds.document(-1), ds.document(len(data["records"]) - 1))
    with pytest.raises(IndexError):
        ds.document(len(data["records"]))


def test_iter_documents_is_the_whole_stream_in_order(data):
    ds = ShardDataset(data["train"])
    docs = list(ds.iter_documents())
    assert [s for _, s in docs] == [r["meta"]["pile_set_name"] for r in data["records"]]
    np.testing.assert_array_equal(np.concatenate([d for d, _ in docs]), _stream(data["train"]))
    np.testing.assert_array_equal(ds.document_lengths(), [len(d) for d, _ in docs])


def test_token_ranges_within_and_across_shards(data):
    ds = ShardDataset(data["train"])
    stream = _stream(data["train"])
    first = ds.shards[0].record["tokens"]
    rng = np.random.default_rng(0)
    ranges = [(0, 0), (0, 1), (0, first), (first - 3, first + 5), (0, ds.num_tokens),
              (ds.num_tokens - 1, ds.num_tokens)]  # fmt: skip
    ranges += [tuple(sorted(rng.integers(0, ds.num_tokens + 1, 2))) for _ in range(50)]
    for a, b in ranges:
        got = ds.tokens(int(a), int(b))
        assert got.dtype == np.uint32 and len(got) == b - a
        np.testing.assert_array_equal(got, stream[a:b])
    inside = ds.tokens(10, 20)  # one shard: a view of the mapped file, not a copy
    assert not inside.flags.owndata and not inside.flags.writeable
    with pytest.raises(IndexError):
        ds.tokens(0, ds.num_tokens + 1)


def test_token_source_ids_label_every_token(data):
    ds = ShardDataset(data["train"])
    naive = np.concatenate(
        [np.full(len(d), ds.source_names.index(s)) for d, s in ds.iter_documents()]
    )
    first = ds.shards[0].record["tokens"]
    for a, b in [(0, ds.num_tokens), (5, 6), (first - 200, first + 300), (1234, 5678)]:
        got = ds.token_source_ids(a, b)
        assert got.dtype == np.int16
        np.testing.assert_array_equal(got, naive[a:b])
    assert len(ds.token_source_ids(7, 7)) == 0


def test_several_dirs_read_as_one_stream(data, tmp_path):
    train, val = ShardDataset(data["train"]), ShardDataset(data["val"])
    both = ShardDataset([data["train"], data["val"]])
    assert both.num_tokens == train.num_tokens + val.num_tokens
    assert both.num_documents == train.num_documents + val.num_documents
    np.testing.assert_array_equal(both.document(train.num_documents), val.document(0))
    end = train.num_tokens
    across = np.concatenate([train.tokens(end - 4, end), val.tokens(0, 4)])
    np.testing.assert_array_equal(both.tokens(end - 4, end + 4), across)
    for name in set(train.source_names) | set(val.source_names):
        t, v = train.source_totals.get(name, {}), val.source_totals.get(name, {})
        assert both.source_totals[name]["tokens"] == t.get("tokens", 0) + v.get("tokens", 0)
    # Data fingerprint: the content and order, not the paths.
    assert len({train.fingerprint, val.fingerprint, both.fingerprint}) == 3
    assert ShardDataset([data["val"], data["train"]]).fingerprint != both.fingerprint
    moved = shutil.copytree(data["train"], tmp_path / "moved")
    assert ShardDataset(moved).fingerprint == train.fingerprint


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_open_reads_no_data_and_mappings_are_bounded(data, tmp_path):
    # Zeroed .bin files of the right size: opening (and the index) never look at tokens.
    blank = shutil.copytree(data["train"], tmp_path / "blank")
    for b in blank.glob("*.bin"):
        size = b.stat().st_size
        b.unlink()
        with open(b, "wb") as f:
            f.truncate(size)
    before = _open_fds()
    ds = ShardDataset(blank, max_open=2)
    assert _open_fds() == before and ds.open_mappings() == 0
    assert ds.num_tokens == ShardDataset(data["train"]).num_tokens
    assert not ds.document(ds.num_documents - 1).any()  # zeros: the blank data, as mapped
    for i in range(ds.num_documents):
        ds.document(i)
    assert ds.open_mappings() == 2
    assert _open_fds() <= before + 2  # one descriptor per mapping, no more


def test_pickles_without_the_mapped_data(data):
    ds = ShardDataset(data["train"])
    ds.tokens(0, ds.num_tokens)  # map every shard
    blob = pickle.dumps(ds)
    assert len(blob) < ds.num_tokens  # the description, not 4 bytes per token
    again = pickle.loads(blob)
    assert again.fingerprint == ds.fingerprint and again.open_mappings() == 0
    np.testing.assert_array_equal(again.document(17), ds.document(17))


def test_expected_tokenizer(data, tok):
    assert ShardDataset(data["train"], expect_fingerprint=tok.fingerprint).num_documents == 600
    with pytest.raises(ShardError, match="expected sha256:0000"):
        ShardDataset(data["train"], expect_fingerprint="sha256:0000")
    assert ShardDataset(data["train"]).load_tokenizer().fingerprint == tok.fingerprint


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_refusals_name_what_is_wrong(data, tmp_path):
    def copy(name: str) -> Path:
        return shutil.copytree(data["train"], tmp_path / name)

    with pytest.raises(ShardError, match="no such directory"):
        ShardDataset(tmp_path / "nope")
    unfinished = copy("unfinished")
    (unfinished / "manifest.json").unlink()
    with pytest.raises(ShardError, match="not complete.*rerun the same `pile-prep tokenize`"):
        ShardDataset(unfinished)
    (unfinished / "job.json").unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        ShardDataset(unfinished)

    version = copy("version")
    _edit_manifest(version, lambda m: m.update(format_version=3))
    with pytest.raises(ShardError, match="format_version 3"):
        ShardDataset(version)
    key = copy("key")
    _edit_manifest(key, lambda m: m["shards"][1].pop("checksum"))
    with pytest.raises(ShardError, match=r"missing key 'shards\[1\].checksum'"):
        ShardDataset(key)

    short = copy("short")
    name = ShardDataset(short).shards[1].name
    with open(short / f"{name}.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ShardError, match=f"{name}.bin: 100 bytes, the manifest says"):
        ShardDataset(short)
    gone = copy("gone")
    (gone / f"{name}.idx").unlink()
    with pytest.raises(ShardError, match=f"{name}.idx: missing"):
        ShardDataset(gone)

    other = copy("other")
    _edit_manifest(other, lambda m: m["tokenizer"].update(name="hf:x", fingerprint="sha256:1"))
    with pytest.raises(ShardError, match="different|cannot be read as one"):
        ShardDataset([data["train"], other])
    with pytest.raises(ShardError, match="--tokenizer PATH"):
        ShardDataset(other).load_tokenizer()
    assert issubclass(ShardError, ValueError)


def test_a_shard_without_documents(tmp_path):
    # The middle chunk holds only empty texts: a shard of 0 tokens (an empty, unmappable .bin).
    lines = [json.dumps({"text": f"first {i}", "meta": {"pile_set_name": "A"}}) for i in range(5)]
    lines += [json.dumps({"text": ""})] * 40
    lines += [json.dumps({"text": f"last {i}"}) for i in range(5)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = _tokenize([src], tmp_path / "out", shard_bytes=150)
    ds = ShardDataset(out)
    assert 0 in [s.record["tokens"] for s in ds.shards]
    assert ds.num_documents == 10 and ds.source_names == ["A", "unknown"]
    tok = load_tokenizer()
    assert tok.decode(ds.document(5)[:-1].tolist()) == "last 0"
    np.testing.assert_array_equal(ds.tokens(0, ds.num_tokens), _stream(out))
    assert verify(out, workers=1).ok


def test_sources_at_matches_token_source_ids(tmp_path):
    from pile_prep.sample import write_sample_corpus
    from pile_prep.tokenize import TokenizeOptions, tokenize

    paths = write_sample_corpus(tmp_path / "raw", num_files=2, docs_per_file=200)
    tokenize(TokenizeOptions(inputs=[str(p) for p in paths], output=tmp_path / "out", workers=1,
                             shard_bytes=10_000, progress=False))  # fmt: skip
    ds = ShardDataset(tmp_path / "out")
    every = ds.token_source_ids(0, ds.num_tokens)
    positions = np.random.default_rng(0).integers(0, ds.num_tokens, 5000)
    assert np.array_equal(ds.sources_at(positions), every[positions])
    assert np.array_equal(ds.sources_at(np.arange(ds.num_tokens)), every)
    with pytest.raises(IndexError):
        ds.sources_at(np.array([ds.num_tokens]))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A 3-task job over 3 small inputs: one directory per task."""
    root = tmp_path_factory.mktemp("tasks")
    inputs = write_sample_corpus(root / "in", num_files=2, docs_per_file=60, seed=1)
    dirs = []
    for t in range(3):
        tokenize(TokenizeOptions(inputs=[str(p) for p in inputs], output=root / f"t{t}", workers=1,
                                 shard_bytes=5_000, num_tasks=3, task_index=t, progress=False))  # fmt: skip
        dirs.append(root / f"t{t}")
    return dirs


def test_directory_sets_cannot_double_count(tasks, data, tmp_path):
    from click.testing import CliRunner

    from pile_prep.cli import main as cli
    from pile_prep.export import ExportError, export_megatron

    t0, t1, t2 = tasks
    whole = ShardDataset(tasks)
    assert whole.num_documents == sum(ShardDataset(t, partial=True).num_documents for t in tasks)
    link = tmp_path / "link"
    link.symlink_to(t0)
    copy = shutil.copytree(t0, tmp_path / "copy")
    for dirs, why in (([t0, t0, t1, t2], "given twice"), ([t0, link, t1, t2], "given twice"),
                      ([data["train"], data["train"]], "given twice"),
                      ([t0, t1, t2, copy], "same task 0 of 3 of one job"),
                      ([t0, t2], r"task\(s\) 1 of its 3-task job are not given \(given: 0, 2\)"),
                      ([t1], r"task\(s\) 0, 2 of its"), ([data["val"], t0, t1], r"task\(s\) 2 ")):  # fmt: skip
        with pytest.raises(ShardError, match=why):
            ShardDataset(dirs)
        assert any(re.search(why, str(p)) for p in verify(dirs, workers=1).problems), dirs
        with pytest.raises(ExportError, match=why):
            export_megatron(dirs, tmp_path / "m")
    # A partial set on purpose; duplicates stay refused.
    assert ShardDataset([t0, t2], partial=True).num_shards == ShardDataset(t0, partial=True).num_shards + \
        ShardDataset(t2, partial=True).num_shards
    assert verify([t2, t0], workers=1, partial=True).ok
    with pytest.raises(ShardError, match="given twice"):
        ShardDataset([t0, t0], partial=True)
    result = CliRunner().invoke(cli, ["verify", str(t1), "-j", "1"])
    assert result.exit_code == 1 and "--partial" in result.output
    assert CliRunner().invoke(cli, ["verify", str(t1), "-j", "1", "--partial"]).exit_code == 0
    result = CliRunner().invoke(cli, ["export", "megatron", str(t1), "-o", str(tmp_path / "e")])
    assert result.exit_code == 1 and "--partial" in result.output
    assert CliRunner().invoke(cli, ["inspect", str(t1), "--partial"]).exit_code == 0
