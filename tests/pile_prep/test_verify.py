"""verify on shards made by the tokenize step, then corrupted in each way it must catch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xxhash
from click.testing import CliRunner

from pile_prep.cli import main
from pile_prep.reader import ShardDataset
from pile_prep.sample import write_sample_corpus
from pile_prep.tokenize import TokenizeError, TokenizeOptions, tokenize
from pile_prep.verify import MAX_PER_KIND, verify

EOS = 151643


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    inputs = write_sample_corpus(root / "in", num_files=2, docs_per_file=300, seed=0)
    out = root / "out"
    tokenize(TokenizeOptions(inputs=[str(p) for p in inputs], output=out, workers=1,
                             shard_bytes=50_000, progress=False))  # fmt: skip
    return {"out": out, "inputs": root / "in"}


@pytest.fixture
def shards(made, tmp_path) -> Path:
    """A fresh copy of the healthy shards, to corrupt."""
    return shutil.copytree(made["out"], tmp_path / "shards")


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m, indent=1))


def _shard(d: Path, k: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(name, tokens, offsets) of the k-th shard."""
    s = ShardDataset(d).shards[k]
    offsets = np.fromfile(s.idx_path, "<u8", s.record["documents"] + 1, offset=16).astype(int)
    return s.name, np.fromfile(s.bin_path, "<u4"), offsets


def _forge(d: Path, name: str, tokens: np.ndarray) -> None:
    """Write new tokens and a matching checksum, so that only the structural checks can tell."""
    tokens.astype("<u4").tofile(d / f"{name}.bin")
    checksum = "xxh3_128:" + xxhash.xxh3_128(tokens.astype("<u4").tobytes()).hexdigest()
    m = _manifest(d)
    for r in m["shards"]:
        if r["name"] == name:
            r["checksum"] = checksum
            (d / f"{name}.json").write_text(json.dumps(r))
    _write_manifest(d, m)


def _lines(report) -> list[str]:
    return [str(p) for p in report.problems]


@pytest.mark.parametrize("workers", [1, 2])
def test_healthy_shards_pass_and_every_byte_is_read_once(made, workers):
    report = verify(made["out"], workers=workers)
    assert report.ok, report.format()
    assert report.workers == workers
    on_disk = sum(p.stat().st_size for p in made["out"].glob("shard-*") if p.suffix != ".json")
    assert report.bytes_read == on_disk
    assert report.documents == 630 and report.tokens == ShardDataset(made["out"]).num_tokens
    assert "OK" in report.format()


def test_cli_exit_codes(made, shards):
    ok = CliRunner().invoke(main, ["verify", str(made["out"]), "-j", "1"])
    assert ok.exit_code == 0 and "OK: no problems found" in ok.output
    name, _, _ = _shard(shards, 1)
    (shards / f"{name}.bin").unlink()
    bad = CliRunner().invoke(main, ["verify", str(shards), "-j", "2"])
    assert bad.exit_code == 1
    assert f"{shards / name}.bin: missing (listed in the manifest)" in bad.output
    assert "FAILED: 1 problem(s)" in bad.output
    usage = CliRunner().invoke(main, ["verify", str(shards), "--sample", "3"])
    assert usage.exit_code == 2 and "--source" in usage.output


def test_flipped_byte(shards):
    name, tokens, _ = _shard(shards, 2)
    data = bytearray((shards / f"{name}.bin").read_bytes())
    data[4 * 100 + 3] ^= 0x40  # the high byte of token 100: an id far above the vocab
    data[4 * 200] ^= 0x01  # the low byte of token 200: still a valid id, only the checksum knows
    (shards / f"{name}.bin").write_bytes(data)
    lines = _lines(verify(shards, workers=1))
    bin_ = f"{shards / name}.bin"
    big = tokens[100] ^ (0x40 << 24)
    assert any(x.startswith(f"{bin_}: offset 400: token 100 (document ")
               and x.endswith(f": id {big} >= vocab size 151665") for x in lines)  # fmt: skip
    assert any(x.startswith(f"{bin_}: checksum xxh3_128:") for x in lines)
    assert len(lines) == 2, lines


def test_truncated_files(shards):
    a, tokens, _ = _shard(shards, 0)
    b, _, _ = _shard(shards, 3)
    with open(shards / f"{a}.bin", "r+b") as f:
        f.truncate(1001)  # not even whole tokens
    with open(shards / f"{b}.idx", "r+b") as f:
        f.truncate(40)
    lines = _lines(verify(shards, workers=2))
    size = 4 * len(tokens)
    assert f"{shards / a}.bin: 1001 bytes, the manifest says {size} ({len(tokens)} tokens)" in lines
    assert any(x.startswith(f"{shards / a}.bin: checksum") for x in lines)
    assert any(x.startswith(f"{shards / b}.idx: 40 bytes, expected") for x in lines)


def test_deleted_shard(shards):
    name, _, _ = _shard(shards, 4)
    for suffix in (".bin", ".idx", ".json"):
        (shards / f"{name}{suffix}").unlink()
    lines = _lines(verify(shards, workers=1))
    assert lines == [
        f"{shards / 'manifest.json'}: {name}.json is missing",
        f"{shards / name}.idx: missing (listed in the manifest)",
        f"{shards / name}.bin: missing (listed in the manifest)",
    ]


def test_stray_shard(shards):
    name, _, _ = _shard(shards, 0)
    shutil.copy(shards / f"{name}.bin", shards / "shard-00009-000000.bin")
    assert _lines(verify(shards, workers=1)) == [
        f"{shards / 'manifest.json'}: shard-00009-000000.bin is not listed in the manifest"
    ]


def test_temp_files_and_gaps(shards):
    (shards / "shard-00000-000001.bin.tmp-4242").write_bytes(b"half")
    m = _manifest(shards)
    dropped = m["shards"].pop(1)  # input 0's chunk 1: a gap between chunks 0 and 2
    m["shards"][3]["first_line"] += 1  # lines in no shard
    _write_manifest(shards, m)
    lines = _lines(verify(shards, workers=1))
    manifest = shards / "manifest.json"
    assert (f"{manifest}: shard-00000-000001.bin.tmp-4242: temp file of a killed or failed run "
            "(rerunning the same tokenize command removes it)") in lines  # fmt: skip
    assert f"{manifest}: input 0: chunk 1 is missing (next shard is shard-00000-000002)" in lines
    r = m["shards"][3]
    assert (f"{manifest}: input {r['input']}: {r['name']} starts at line {r['first_line']}, "
            f"expected {r['first_line'] - 1} (lines in no shard, or in two)") in lines  # fmt: skip
    assert f"{manifest}: {dropped['name']}.bin is not listed in the manifest" in lines


def test_edited_manifest(shards):
    m = _manifest(shards)
    m["totals"]["tokens"] += 1
    m["sources"]["ArXiv"]["documents"] -= 1
    r = m["shards"][1]
    r["checksum"] = "xxh3_128:" + "0" * 32
    _write_manifest(shards, m)
    lines = _lines(verify(shards, workers=1))
    man = shards / "manifest.json"
    tokens = m["totals"]["tokens"]
    assert f"{man}: totals.tokens is {tokens}, the shards add up to {tokens - 1}" in lines
    assert any(x.startswith(f"{man}: sources['ArXiv'] is {{'tokens'") for x in lines)
    assert f"{man}: {r['name']}.json differs from the manifest's record in checksum" in lines
    assert any(x.startswith(f"{shards / r['name']}.bin: checksum") and "0000" in x for x in lines)
    assert len(lines) == 4, lines


def test_manifest_of_another_version_or_missing(shards, tmp_path):
    m = _manifest(shards)
    m["format_version"] = 7
    _write_manifest(shards, m)
    (lines,) = [_lines(verify([shards, tmp_path / "none"], workers=1))]
    man = shards / "manifest.json"
    assert lines[0] == f"{man}: format_version 7, this reader reads versions 1, 2"
    assert lines[1] == f"{tmp_path / 'none' / 'manifest.json'}: no such directory"


def test_malformed_record(shards):
    m = _manifest(shards)
    m["shards"][3]["sources"][0].pop("tokens")
    _write_manifest(shards, m)
    assert _lines(verify(shards, workers=1)) == [
        f"{shards / 'manifest.json'}: missing or not int: 'shards[3].sources[0].tokens'"
    ]


def test_dropped_eos(shards):
    name, tokens, offsets = _shard(shards, 1)
    end = offsets[4] - 1  # document 3's EOS
    tokens[end] = 42
    _forge(shards, name, tokens)
    assert _lines(verify(shards, workers=1)) == [
        f"{shards / name}.bin: offset {4 * end}: document 3 does not end with EOS: its last "
        f"token (token {end}) is 42, not {EOS}"
    ]


def test_eos_inside_a_document(shards):
    name, tokens, offsets = _shard(shards, 1)
    pos = offsets[7] + 2  # inside document 7
    tokens[pos] = EOS
    _forge(shards, name, tokens)
    assert _lines(verify(shards, workers=1)) == [
        f"{shards / name}.bin: offset {4 * pos}: token {pos} (document 7): EOS inside a document"
    ]


def test_added_token_ids_inside_a_document(shards):
    name, tokens, offsets = _shard(shards, 1)
    pos = offsets[3] + 1  # inside document 3
    tokens[pos] = 151657  # <tool_call>, which Qwen2.5's tokenizer.json marks not special
    _forge(shards, name, tokens)
    assert _lines(verify(shards, workers=1)) == [
        f"{shards / name}.bin: offset {4 * pos}: token {pos} (document 3): id 151657 >= EOS id "
        f"{EOS} inside a document (an added token's string must be encoded as text)"
    ]


def test_broken_index(shards):
    name, _, offsets = _shard(shards, 2)
    idx = shards / f"{name}.idx"
    data = bytearray(idx.read_bytes())
    o = np.frombuffer(data, "<u8", len(offsets), 16).copy()
    o[5], o[6] = o[6], o[5]  # not monotonic
    data[16 : 16 + 8 * len(o)] = o.tobytes()
    idx.write_bytes(data)
    lines = _lines(verify(shards, workers=1))
    spans = f"[{offsets[6]}, {offsets[5]})"
    assert f"{idx}: offset {16 + 8 * 6}: offsets not increasing: document 5 spans {spans}" in lines
    # The tokens are intact (EOS count and checksum agree): only the index is blamed.
    assert all(x.startswith(str(idx)) for x in lines), lines


def test_wrong_source_in_index(shards):
    name, _, offsets = _shard(shards, 0)
    idx = shards / f"{name}.idx"
    data = bytearray(idx.read_bytes())
    src_at = 16 + 8 * len(offsets)
    s = np.frombuffer(data, "<u2", len(offsets) - 1, src_at).copy()
    s[0] = (s[0] + 1) % len(_manifest(shards)["shards"][0]["sources"])  # doc 0 moves source
    data[src_at:] = s.tobytes()
    idx.write_bytes(data)
    lines = _lines(verify(shards, workers=1))
    assert len(lines) == 2 and all(x.startswith(f"{idx}: source ") for x in lines), lines


def test_ids_above_the_vocab_are_listed_then_counted(shards):
    name, tokens, offsets = _shard(shards, 0)
    inside = np.setdiff1d(np.arange(len(tokens)), offsets[1:] - 1)[: MAX_PER_KIND + 5]
    tokens[inside] = 200_000
    _forge(shards, name, tokens)
    lines = _lines(verify(shards, workers=1))
    assert len(lines) == MAX_PER_KIND + 1
    first = inside[0]
    assert lines[0] == (f"{shards / name}.bin: offset {4 * first}: token {first} (document 0): "
                        "id 200000 >= vocab size 151665")  # fmt: skip
    assert lines[-1] == f"{shards / name}.bin: ... and 5 more: id >= vocab size"


def test_all_problems_of_all_shards_are_reported_in_one_run(shards):
    a, tokens, offsets = _shard(shards, 1)
    (b, _, _), (c, _, _) = _shard(shards, 5), _shard(shards, 6)
    tokens[offsets[1] - 1] = 7
    _forge(shards, a, tokens)
    (shards / f"{b}.bin").unlink()
    with open(shards / f"{c}.bin", "r+b") as f:
        f.truncate(8)
    text = verify(shards, workers=2).format()
    assert f"{a}.bin: offset {4 * (offsets[1] - 1)}: document 0 does not end with EOS" in text
    assert f"{b}.bin: missing" in text and f"{c}.bin: 8 bytes" in text


def test_small_blocks_give_the_same_verdicts(shards):
    name, tokens, offsets = _shard(shards, 1)
    tokens[offsets[9] - 1] = 5
    tokens[offsets[2] + 1] = EOS
    _forge(shards, name, tokens)
    whole = _lines(verify(shards, workers=1))
    blocks = _lines(verify(shards, workers=1, block_bytes=64))  # every document spans blocks
    assert whole == blocks and len(whole) == 2


def test_sample_matches_the_inputs(made, tmp_path):
    moved = shutil.copytree(made["inputs"], tmp_path / "elsewhere")  # matched by name and size
    report = verify(made["out"], workers=1, sample=25, sources=[str(moved)])
    assert report.ok and report.sampled == 25, report.format()
    report = verify(made["out"], workers=1, sample=10_000, sources=[str(made["inputs"])])
    assert report.ok and report.sampled == 630


def test_sample_catches_a_changed_token(made, shards):
    name, tokens, offsets = _shard(shards, 3)
    tokens[offsets[2] + 1] += 1  # still a valid id, still one EOS: only re-tokenizing can tell
    _forge(shards, name, tokens)
    assert verify(shards, workers=1).ok
    report = verify(shards, workers=1, sample=1000, sources=[str(made["inputs"])])
    (line,) = _lines(report)
    assert line.startswith(f"{shards / name}.bin: offset {4 * (offsets[2] + 1)}: document 2 (")
    assert "differs from the input re-tokenized at its token 1" in line


def test_sample_names_a_missing_input(made, shards, tmp_path):
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(made["inputs"] / "00.jsonl.zst", only)
    lines = _lines(verify(shards, workers=1, sample=600, sources=[str(only)]))
    assert lines and all("is not among the --source files" in x for x in lines)
    assert any(x.startswith(str(made["inputs"] / "01.jsonl.zst")) for x in lines)


def _edit_records(d: Path, edit) -> dict:
    """Apply `edit` to every shard record, in the manifest and in its .json alike."""
    m = _manifest(d)
    for r in m["shards"]:
        edit(r)
        (d / f"{r['name']}.json").write_text(json.dumps(r))
    _write_manifest(d, m)
    return m


def test_manifest_tokenizer_is_checked_against_the_job(shards):
    m = _manifest(shards)
    m["tokenizer"].update(name="hf:/other", fingerprint="sha256:" + "1" * 64, vocab_size=151936)
    _write_manifest(shards, m)
    lines = _lines(verify(shards, workers=1))
    man = shards / "manifest.json"
    assert f"{man}: tokenizer.fingerprint is 'sha256:{'1' * 64}', job.json says " in "\n".join(lines)
    assert any(x.startswith(f"{man}: tokenizer.name is 'hf:/other', job.json says 'qwen2.5'") for x in lines)
    assert f"{man}: tokenizer.vocab_size is 151936, job.json says 151665" in lines
    assert len(lines) == 3, lines
    (shards / "job.json").unlink()
    assert f"{man}: job.json is missing: the manifest's tokenizer and inputs cannot be checked" in _lines(
        verify(shards, workers=1))


@pytest.mark.parametrize("edit", ["source label", "line range", "skipped line"])
def test_shard_metadata_is_covered_by_a_checksum(shards, edit):
    def change(r: dict) -> None:
        if r["name"] != "shard-00000-000002":
            return
        if edit == "source label":  # relabel a source everywhere: totals still add up
            r["sources"][0]["name"] = "Relabelled"
        elif edit == "line range":
            r["first_line"] += 1
        else:
            r["skipped_lines"].append([r["last_line"], "bad"])

    m = _edit_records(shards, change)
    if edit == "source label":
        sources = {}
        for r in m["shards"]:
            for s in r["sources"]:
                t = sources.setdefault(s["name"], {"tokens": 0, "documents": 0})
                t["tokens"] += s["tokens"]
                t["documents"] += s["documents"]
        m["sources"] = dict(sorted(sources.items()))
        _write_manifest(shards, m)
    lines = _lines(verify(shards, workers=1))
    assert any("shard-00000-000002): metadata (sources, line ranges, skipped lines, ...) changed" in x
               for x in lines), lines  # fmt: skip


def test_a_version_1_output_is_read_and_verified_with_a_note(made, shards):
    def drop(r: dict) -> None:
        del r["metadata_checksum"]

    m = _edit_records(shards, drop)
    m["format_version"] = 1
    _write_manifest(shards, m)
    job = json.loads((shards / "job.json").read_text())
    (shards / "job.json").write_text(json.dumps({**job, "format_version": 1}))
    report = verify(shards, workers=1)
    assert report.ok, report.format()
    assert report.notes == [f"{shards}: format version 1: its shard metadata (sources, line ranges, "
                            "skipped lines) has no checksum and was not checked; retokenize to get one"]  # fmt: skip
    assert ShardDataset(shards).num_documents == report.documents
    inputs = [str(p) for p in sorted(made["inputs"].glob("0*.jsonl.zst"))] + [str(made["inputs"] / "val.jsonl.zst")]
    with pytest.raises(TokenizeError, match=r"\(written by another pile-prep \(format version 1, this one writes 2\)\)"):
        tokenize(TokenizeOptions(inputs=inputs, output=shards, workers=1, shard_bytes=50_000, progress=False))
    m["format_version"] = 2  # claiming version 2 without the checksums
    _write_manifest(shards, m)
    (shards / "job.json").write_text(json.dumps(job))
    assert any("has no metadata_checksum" in x for x in _lines(verify(shards, workers=1)))
