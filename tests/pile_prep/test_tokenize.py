"""pile-prep tokenize: exact tokens, deterministic bytes, resume after kill -9, bad input."""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from click.testing import CliRunner

from pile_prep.cli import main as cli
from pile_prep.inputs import expand_inputs
from pile_prep.shards import read_json
from pile_prep.tasks import Share, task_shares
from pile_prep.verify import verify
from pile_prep.reader import ShardDataset
from pile_prep.sample import write_sample_corpus
from pile_prep.tokenize import TokenizeError, TokenizeOptions, tokenize
from pile_prep.tokenizer import load_tokenizer, nfc

from .conftest import pile_record, write_jsonl_zst


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def run(inputs, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return tokenize(TokenizeOptions(inputs=[str(p) for p in inputs], output=out, **kw))


def read_docs(out: Path) -> list[tuple[list[int], str]]:
    """Every document (tokens incl. EOS, source) of an output dir, through the one reader."""
    return [(tokens.tolist(), source) for tokens, source in ShardDataset(out).iter_documents()]


def input_docs(paths) -> list[tuple[str, str]]:
    docs = []
    for p in paths:
        for line in zstandard.ZstdDecompressor().decompress(Path(p).read_bytes(), max_output_size=1 << 30).splitlines():
            r = json.loads(line)
            docs.append((r["text"], r["meta"]["pile_set_name"]))
    return docs


def dir_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def assert_same_dirs(a: Path, b: Path) -> None:
    assert dir_files(a) == dir_files(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, dir_files(a), shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_round_trip_and_counts(tok, sample_corpus, special_input, tmp_path):
    inputs = [special_input, *sample_corpus]
    summary = run(inputs, tmp_path / "out", shard_bytes=20_000)
    expected = [(t, s) for t, s in input_docs(inputs) if t != ""]
    docs = read_docs(tmp_path / "out")
    assert len(docs) == len(expected)
    for (ids, source), (text, want_source) in zip(docs, expected):
        assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
        assert ids[:-1] == tok.encode(text)
        assert tok.decode(ids[:-1]) == nfc(text)
        assert source == want_source
    m = summary.manifest
    assert m["totals"]["documents"] == len(expected)
    assert m["totals"]["skipped_empty"] == 1
    assert m["totals"]["tokens"] == sum(len(ids) for ids, _ in docs)
    assert m["totals"]["shards"] > 3
    per_source: dict = {}
    for ids, s in docs:
        per_source.setdefault(s, {"tokens": 0, "documents": 0})
        per_source[s]["tokens"] += len(ids)
        per_source[s]["documents"] += 1
    assert m["sources"] == dict(sorted(per_source.items()))
    assert [i["path"] for i in m["inputs"]] == [str(p.resolve()) for p in inputs]
    assert m["tokenizer"] == {"name": "qwen2.5", "fingerprint": tok.fingerprint,
                              "vocab_size": 151665, "eos_id": 151643}  # fmt: skip
    assert m["shards"][0]["skipped_lines"] == [[2, "empty"]]
    for rec in m["shards"]:
        assert (tmp_path / "out" / f"{rec['name']}.bin").stat().st_size == 4 * rec["tokens"]


def test_bytes_identical_across_worker_counts(sample_corpus, tmp_path):
    run(sample_corpus, tmp_path / "w1", shard_bytes=30_000, workers=1)
    run(sample_corpus, tmp_path / "w3", shard_bytes=30_000, workers=3)  # each file shared 2 ways
    assert_same_dirs(tmp_path / "w1", tmp_path / "w3")


def test_other_input_formats_give_same_tokens(sample_corpus, tmp_path):
    raw = zstandard.ZstdDecompressor().decompress(sample_corpus[0].read_bytes(), max_output_size=1 << 30)
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(raw))
    records = [json.loads(line) for line in raw.splitlines()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    reference = read_docs_of(sample_corpus[0], tmp_path / "ref")
    for name in ("a.jsonl", "b.jsonl.gz", "c.parquet"):
        assert read_docs_of(tmp_path / name, tmp_path / f"out-{name}") == reference, name


def read_docs_of(path: Path, out: Path):
    run([path], out, shard_bytes=1 << 20)
    return read_docs(out)


def test_text_field_and_missing_meta(tok, tmp_path):
    path = write_jsonl_zst(tmp_path / "x.jsonl.zst", [{"content": "abc"}, {"content": "def", "meta": {}}])
    run([path], tmp_path / "out", text_field="content")
    assert read_docs(tmp_path / "out") == [
        (tok.encode("abc") + [tok.eos_id], "unknown"),
        (tok.encode("def") + [tok.eos_id], "unknown"),
    ]


def test_inputs_from_dirs_and_globs_in_order(sample_corpus, tmp_path):
    corpus_dir = sample_corpus[0].parent
    a = run([corpus_dir], tmp_path / "a").manifest["inputs"]
    b = run([str(corpus_dir / "*.jsonl.zst")], tmp_path / "b").manifest["inputs"]
    names = [Path(i["path"]).name for i in a]
    assert names == ["00.jsonl.zst", "01.jsonl.zst", "val.jsonl.zst"]
    assert a == b
    with pytest.raises(TokenizeError, match="no Pile input files match"):
        run([str(tmp_path / "nothing-*.jsonl.zst")], tmp_path / "c")


def test_directory_inputs_are_not_recursive_unless_asked(tmp_path):
    root = tmp_path / "pile"
    (root / "val").mkdir(parents=True)
    write_jsonl_zst(root / "00.jsonl.zst", [pile_record("train text", "Pile-CC")])
    write_jsonl_zst(root / "val" / "val.jsonl.zst", [pile_record("held out", "Pile-CC")])
    deep = [root.resolve() / "00.jsonl.zst", root.resolve() / "val" / "val.jsonl.zst"]
    assert expand_inputs([str(root)]) == deep[:1]
    assert expand_inputs([str(root)], recursive=True) == deep
    result = CliRunner().invoke(cli, ["tokenize", str(root), "-o", str(tmp_path / "o"), "-q", "-j",
                                      "1", "--recursive"])  # fmt: skip
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [i["path"] for i in m["inputs"]] == list(map(str, deep))
    (root / "00.jsonl.zst").unlink()
    with pytest.raises(TokenizeError, match=r"no Pile input files directly inside \(1 in "
                       r"subdirectories: name them, or pass --recursive\)"):  # fmt: skip
        run([root], tmp_path / "none")


def test_task_shares_deal_whole_files_then_chunks():
    assert task_shares(4, 2, 1) == {1: Share(1, 0), 3: Share(1, 0)}
    assert task_shares(3, 2, 0) == {0: Share(1, 0), 2: Share(2, 0)}  # file 2 shared by chunk
    assert task_shares(30, 64, 33) == {3: Share(3, 1)}  # tasks 3, 33, 63 share file 3
    for files, tasks in ((3, 2), (2, 5), (30, 64), (30, 16)):
        owners = Counter((f, c) for t in range(tasks) for f, share in task_shares(files, tasks, t).items()
                         for c in range(64) if share.takes(c))  # fmt: skip
        assert owners == Counter((f, c) for f in range(files) for c in range(64))


def test_tasks_union_is_byte_identical_to_one_task(sample_corpus, tmp_path):
    inputs = [sample_corpus[0], sample_corpus[0].parent / "val.jsonl.zst", sample_corpus[1]]
    run(inputs, tmp_path / "one", shard_bytes=20_000)  # 3 files for 2 tasks:
    m0 = run(inputs, tmp_path / "t0", shard_bytes=20_000, num_tasks=2, task_index=0).manifest
    m1 = run(inputs, tmp_path / "t1", shard_bytes=20_000, num_tasks=2, task_index=1).manifest
    assert m0["task"] == {"index": 0, "count": 2} and m0["inputs"] == m1["inputs"]
    n0, n1 = ({r["name"] for r in m["shards"]} for m in (m0, m1))
    assert {n[:11] for n in n0} == {"shard-00000", "shard-00002"}  # file 0 whole, file 2 shared
    assert {n[:11] for n in n1} == {"shard-00001", "shard-00002"}
    assert not n0 & n1
    union = sorted(n0 | n1)
    assert union == [r["name"] for r in read_json(tmp_path / "one" / "manifest.json")["shards"]]
    for name in union:
        task = tmp_path / ("t0" if name in n0 else "t1")
        for ext in ("bin", "idx", "json"):
            assert (task / f"{name}.{ext}").read_bytes() == (tmp_path / "one" / f"{name}.{ext}").read_bytes()
    assert verify([tmp_path / "t0", tmp_path / "t1"], workers=1).ok


def test_refuses_output_of_other_inputs(sample_corpus, tmp_path):
    out = tmp_path / "out"
    run(sample_corpus[:1], out)
    with pytest.raises(TokenizeError, match=r"different inputs \(new input .*01.jsonl.zst"):
        run(sample_corpus, out)
    with pytest.raises(TokenizeError, match="shard_bytes"):
        run(sample_corpus[:1], out, shard_bytes=1000)
    summary = run(sample_corpus, out, overwrite=True)
    assert len(summary.manifest["inputs"]) == 2
    assert not list(out.glob("*.tmp-*"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("x")
    with pytest.raises(TokenizeError, match="not a pile-prep output"):
        run(sample_corpus, tmp_path / "foreign")


def test_input_edited_in_place_is_refused_or_its_shards_redone(sample_corpus, tmp_path, monkeypatch):
    import pile_prep.inputs as inputs_mod

    monkeypatch.setattr(inputs_mod, "_IDENTITY_BYTES", 64)  # job.json hashes the first/last 64 B
    raw = zstandard.ZstdDecompressor().decompress(sample_corpus[0].read_bytes(), max_output_size=1 << 30)
    path, out = tmp_path / "in.jsonl", tmp_path / "out"
    path.write_bytes(raw)
    run([path], out, shard_bytes=20_000)
    (out / "manifest.json").unlink()  # as if the run had stopped before its end
    # Same size, same first and last 64 bytes: only the shards' input checksums can tell.
    at = raw.index(b" ka ", len(raw) // 2)
    edited = raw[:at] + b" KA " + raw[at + 4 :]
    path.write_bytes(edited)
    assert run([path], out, shard_bytes=20_000).shards_resumed > 0
    run([path], tmp_path / "fresh", shard_bytes=20_000)
    assert_same_dirs(tmp_path / "fresh", out)
    path.write_bytes(b"{" + edited[1:].replace(b'"text"', b'"TEXT"', 1))
    with pytest.raises(TokenizeError, match=rf"input {path.resolve()} changed \(its first or last"):
        run([path], out, shard_bytes=20_000)


def test_rerun_of_finished_output_is_a_no_op(sample_corpus, tmp_path):
    first = run(sample_corpus, tmp_path / "out", shard_bytes=50_000)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = run(sample_corpus, tmp_path / "out", shard_bytes=50_000)
    assert again.manifest == first.manifest and again.tokens_this_run == 0
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}


# --- bad input ---------------------------------------------------------------------------------

GOOD = json.dumps(pile_record("fine text", "Pile-CC")).encode()
BAD_LINES = {
    "not JSON": b'{"text": "unterminated',
    "invalid UTF-8": b'{"text": "caf\xe9"}',
    "no 'text' field": b'{"body": "x"}',
    "non-string (int) 'text' field": b'{"text": 42}',
    "lone surrogate '\\ud800'": b'{"text": "a\\ud800b"}',
}


@pytest.mark.parametrize("reason", BAD_LINES)
def test_bad_line_stops_with_file_and_line(reason, tmp_path):
    path = write_jsonl_zst(tmp_path / "in.jsonl.zst", [GOOD] * 50 + [BAD_LINES[reason]] + [GOOD] * 5)
    result = CliRunner().invoke(cli, ["tokenize", str(path), "-o", str(tmp_path / "o"), "-j", "1", "-q",
                                      "--shard-mb", "0.0005"])  # fmt: skip
    assert result.exit_code == 1
    assert f"{path.resolve()}, line 51: {reason}" in result.output
    assert "Traceback" not in result.output
    assert "rerun the same command to resume" in result.output
    # Shards before the bad line are finished and kept; the manifest is not written.
    assert (tmp_path / "o" / "shard-00000-000000.json").exists()
    assert not (tmp_path / "o" / "manifest.json").exists()

    result = CliRunner().invoke(cli, ["tokenize", str(path), "-o", str(tmp_path / "o"), "-j", "1", "-q",
                                      "--shard-mb", "0.0005", "--skip-bad-lines"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 bad lines" in result.output and "line 51" in result.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["totals"]["bad_lines"] == 1 and m["totals"]["documents"] == 55
    assert m["bad_lines"][0]["line"] == 51 and reason in m["bad_lines"][0]["reason"]


def test_truncated_zst(tmp_path):
    data = write_sample_corpus(tmp_path / "big", num_files=1, docs_per_file=3000)[0].read_bytes()
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizeError, match=r"cut.jsonl.zst, line \d+: corrupt or truncated input: truncated"):
        run([path], tmp_path / "o")
    summary = run([path], tmp_path / "o", skip_bad_lines=True)
    assert summary.manifest["totals"]["bad_lines"] == 1
    assert 0 < summary.manifest["totals"]["documents"] < 3000


def test_corrupt_zst(tmp_path):
    path = tmp_path / "junk.jsonl.zst"
    path.write_bytes(b"this is not zstd" * 100)
    with pytest.raises(TokenizeError, match=r"junk.jsonl.zst, line 1: corrupt or truncated input"):
        run([path], tmp_path / "o")


def test_kill_9_and_resume_gives_identical_bytes(sample_corpus, tmp_path):
    args = [*map(str, sample_corpus), "--workers", "1", "--shard-mb", "0.005", "-q"]
    subprocess.run([sys.executable, "-m", "pile_prep.cli", "tokenize", *args, "-o", str(tmp_path / "ref")],
                   check=True)  # fmt: skip
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pile_prep.cli", "tokenize", *args, "-o", str(out)],
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while len(list(out.glob("shard-*.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers, mid-run
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.json")}
    assert done_before and not (out / "manifest.json").exists()

    (out / "shard-00000-000999.bin.tmp-999999").write_bytes(b"half")  # a dead worker's debris
    result = subprocess.run([sys.executable, "-m", "pile_prep.cli", "tokenize", *args, "-o", str(out)],
                            check=True, capture_output=True, text=True)  # fmt: skip
    assert f"({len(done_before)} already done)" in result.stdout
    assert_same_dirs(tmp_path / "ref", out)  # temp files of the killed run removed too
    # Finished shards were not redone.
    assert all((out / n).stat().st_mtime_ns == t for n, t in done_before.items())


def _limit_file_size(limit: int):
    def preexec():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # EFBIG past it, like ENOSPC

    return preexec


def test_failed_write_exits_1_in_one_line_and_rerun_completes(tmp_path):
    docs = [pile_record(f"short document {i}", "Pile-CC") for i in range(300)]
    path = write_jsonl_zst(tmp_path / "in.jsonl.zst", docs + [pile_record("long " * 40_000, "ArXiv")])
    last = run([path], tmp_path / "ref", shard_bytes=2000).manifest["shards"][-1]["name"]
    n = int(last[-6:])
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pile_prep.cli", "tokenize", str(path), "-o", str(out), "-q", "-j", "1",
            "--shard-mb", str(2000 / 2**20)]  # fmt: skip
    # Every shard fits in 64 kB but the long document's (160 kB of ids).
    failed = subprocess.run(args, capture_output=True, text=True, preexec_fn=_limit_file_size(64_000))
    assert failed.returncode == 1
    assert failed.stdout == "" and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith(f"Error: cannot write {out / last}.bin: File too large; "
                                    f"{n} finished shards are kept in {out}")  # fmt: skip
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert len(list(out.glob("shard-*.json"))) == n and not (out / f"{last}.bin").exists()
    subprocess.run(args, check=True, capture_output=True)
    assert_same_dirs(tmp_path / "ref", out)


def test_unusable_or_busy_output_is_one_line(sample_corpus, tmp_path):
    import fcntl

    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(cli, ["tokenize", str(sample_corpus[0]), "-o", str(tmp_path / "file"), "-q"])
    assert result.exit_code == 1
    assert result.output == f"Error: --output {tmp_path / 'file'} is a file, not a directory\n"
    (tmp_path / "busy").mkdir()
    fd = os.open(tmp_path / "busy", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running tokenize holds it
    try:
        result = CliRunner().invoke(cli, ["tokenize", str(sample_corpus[0]), "-o", str(tmp_path / "busy")])
    finally:
        os.close(fd)
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'busy'}: another pile-prep tokenize is writing to it\n"


def test_overwrite_starts_again(sample_corpus, tmp_path):
    out = tmp_path / "out"
    run(sample_corpus[:1], out)
    assert run(sample_corpus[:1], out).tokens_this_run == 0  # complete: nothing to redo
    again = run(sample_corpus[:1], out, overwrite=True)
    assert again.tokens_this_run == again.manifest["totals"]["tokens"] > 0


def test_blank_lines_are_skipped_and_counted(tok, tmp_path):
    # A blank line mid-file, a lone CR (CRLF file), and a trailing empty line: no records, as in
    # Hugging Face's json reader (the streaming source), so both sources see the same documents.
    raw = GOOD + b"\n\n" + GOOD + b"\r\n\r\n" + GOOD + b"\n   \n\n"
    path = tmp_path / "blank.jsonl"
    path.write_bytes(raw)
    m = run([path], tmp_path / "out").manifest
    assert m["totals"]["documents"] == 3 and m["totals"]["bad_lines"] == 0
    assert m["totals"]["blank_lines"] == 4
    assert m["shards"][0]["skipped_lines"] == [[2, "blank"], [4, "blank"], [6, "blank"], [7, "blank"]]
    assert [ids for ids, _ in read_docs(tmp_path / "out")] == [tok.encode("fine text") + [tok.eos_id]] * 3


def test_truncated_gzip_keeps_every_complete_line(tmp_path):
    lines = [json.dumps(pile_record(f"document {i} " + "x" * (i % 300), "Pile-CC")).encode() for i in range(20000)]
    data = gzip.compress(b"\n".join(lines) + b"\n")
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    readable = zlib.decompressobj(31).decompress(data[: len(data) // 2])
    complete = readable.count(b"\n")
    m = run([path], tmp_path / "out", skip_bad_lines=True).manifest
    assert m["totals"]["documents"] == complete
    assert m["bad_lines"][0]["line"] == complete + 1


def test_corrupt_parquet_is_a_bad_input_not_a_crash(tmp_path):
    records = [pile_record(f"row {i} " + "y" * 200, "ArXiv") for i in range(4000)]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(records), path, compression="none", row_group_size=1000)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = b"\xff" * 2000
    path.write_bytes(bytes(data))
    with pytest.raises(TokenizeError, match=r"c.parquet, line \d+: corrupt Parquet data"):
        run([path], tmp_path / "o")
    m = run([path], tmp_path / "o", skip_bad_lines=True).manifest
    assert m["totals"]["bad_lines"] == 1 and m["totals"]["documents"] < 4000


def test_wrong_text_field_is_named_with_the_keys_seen(tmp_path):
    path = write_jsonl_zst(tmp_path / "in.jsonl.zst", [{"content": f"doc {i}", "meta": {}} for i in range(20)])
    args = ["tokenize", str(path), "-o", str(tmp_path / "o"), "-j", "1", "-q", "--shard-mb", "0.0002"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert "line 1: no 'text' field (keys: 'content', 'meta')" in result.output
    assert "--text-field" in result.output and "--skip-bad-lines" not in result.output
    # Every line bad under --skip-bad-lines: no dataset, a non-zero exit, the same hint.
    for _ in range(2):  # and the same on the rerun
        result = CliRunner().invoke(cli, args + ["--skip-bad-lines"])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: every line was bad (20 bad lines; the first: ")
        assert "keys: 'content', 'meta'" in result.output and "--text-field" in result.output
        assert result.output.count("\n") == 1
        assert not (tmp_path / "o" / "manifest.json").exists()
    result = CliRunner().invoke(cli, args + ["--skip-bad-lines", "--text-field", "content", "--overwrite"])
    assert result.exit_code == 0, result.output


def test_each_input_is_read_by_one_reader_only():
    from pile_prep.pipeline import reader_inputs

    paths = [Path(f"{i:02d}.jsonl.zst") for i in range(30)]
    for files, tasks, workers in ((30, 1, 64), (30, 1, 128), (30, 1, 4), (1, 1, 128), (3, 2, 5), (30, 64, 8)):
        for task in range(tasks):
            shares = task_shares(files, tasks, task)
            readers = reader_inputs(shares, paths[:files], workers)
            assert len(readers) == min(len(shares), workers)  # no more readers than inputs or workers
            dealt = [(i, share) for job in readers for i, _, share in job]
            assert sorted(dealt) == sorted(shares.items())  # every input of the task, once


def test_one_input_many_workers_and_a_shared_input_are_byte_identical(sample_corpus, tmp_path):
    one = [sample_corpus[0]]
    run(one, tmp_path / "w1", shard_bytes=20_000, workers=1)
    run(one, tmp_path / "w5", shard_bytes=20_000, workers=5)  # 1 reader feeding 5 workers
    assert_same_dirs(tmp_path / "w1", tmp_path / "w5")
    inputs = [*sample_corpus, sample_corpus[0].parent / "val.jsonl.zst"]
    run(inputs, tmp_path / "all", shard_bytes=20_000, workers=1)
    for task in range(2):  # input 2 shared by both tasks; 4 workers, 2 readers each
        run(inputs, tmp_path / f"t{task}", shard_bytes=20_000, workers=4, num_tasks=2, task_index=task)
    union = {p.name for t in range(2) for p in (tmp_path / f"t{t}").glob("shard-*")}
    assert union == {p.name for p in (tmp_path / "all").glob("shard-*")}
    for name in union:
        task = next(tmp_path / f"t{t}" for t in range(2) if (tmp_path / f"t{t}" / name).exists())
        assert (task / name).read_bytes() == (tmp_path / "all" / name).read_bytes()


def test_no_chunk_is_lost_behind_the_end_marks(tmp_path):
    # Many chunks larger than the pipe's buffer, one reader, 12 workers: the last chunks a reader
    # puts must reach a worker before the end marks do.
    docs = [pile_record(f"document {i} " + "word " * 800, "Pile-CC") for i in range(1200)]
    path = write_jsonl_zst(tmp_path / "in.jsonl.zst", docs)
    one = run([path], tmp_path / "w1", shard_bytes=150_000, workers=1).manifest
    many = run([path], tmp_path / "w12", shard_bytes=150_000, workers=12).manifest
    assert len(many["shards"]) == len(one["shards"]) > 30
    assert_same_dirs(tmp_path / "w1", tmp_path / "w12")


def test_workers_tokenize_with_the_tokenizer_object_they_are_given(tmp_path):
    """Workers are forked holding the main process's tokenizer: none loads its own (no start-up
    cost per worker), and a tokenizer that cannot be pickled or rebuilt by name works."""
    import numpy as np

    from pile_prep import pipeline

    class Lengths:  # one id per document: its text's length (a lambda: not picklable)
        eos_id, count = 0, staticmethod(lambda text: len(text))

        def encode_pieces(self, text):
            yield np.array([self.count(text)], np.uint32)

    texts = [f"document number {i}" + "x" * i for i in range(40)]
    path = write_jsonl_zst(tmp_path / "in.jsonl.zst", [pile_record(t, "Pile-CC") for t in texts])
    settings = pipeline.Settings(tmp_path / "out", "text", 300, False)
    (tmp_path / "out").mkdir()
    with pipeline.started(settings, Lengths(), task_shares(1, 1, 0), [path], 3) as messages:
        records = [m[1] for m in messages if m[0] == "record"]
    assert len(records) > 3 and not [m for m in records if m is None]
    ids = np.concatenate([np.fromfile(tmp_path / "out" / f"{r['name']}.bin", np.uint32)
                          for r in sorted(records, key=lambda r: r["name"])])  # fmt: skip
    assert ids.tolist() == [x for t in texts for x in (len(t), 0)]


def test_a_worker_killed_mid_run_fails_it_without_hanging(tmp_path):
    """A worker killed (say, out of memory) while a reader still holds a chunk for the queue: the
    run reports it and ends (nobody is left to take the reader's chunk)."""
    import numpy as np

    from pile_prep import pipeline

    class DiesOnSecondDocument:
        eos_id, seen = 0, 0

        def encode_pieces(self, text):
            self.seen += 1
            if self.seen == 2:
                time.sleep(1)  # the reader is done by now, waiting to flush the second chunk
                os.kill(os.getpid(), signal.SIGKILL)
            yield np.array([1], np.uint32)

    # Two chunks of nine documents, each chunk far larger than a pipe's buffer: the worker dies in
    # the first, while the reader, done with its input, waits to flush the second into the queue.
    path = write_jsonl_zst(tmp_path / "in.jsonl.zst", [pile_record("x" * 100_000, "Pile-CC") for _ in range(18)])
    (tmp_path / "out").mkdir()
    settings = pipeline.Settings(tmp_path / "out", "text", 900_000, False)
    def hung(signum, frame):
        raise TimeoutError("the run did not end")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pipeline.started(settings, DiesOnSecondDocument(), task_shares(1, 1, 0), [path], 1) as messages:
            failed = [m[1] for m in messages if m[0] == "failed"]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(failed) == 1 and "exit code -9" in str(failed[0])
