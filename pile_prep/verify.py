"""`pile-prep verify`: check every byte of a shard directory against its manifest.

Each shard is checked by one worker process that reads its `.idx` and then its `.bin` once, in
large blocks: the XXH3-128 checksum and the numpy checks (ids below the vocab size, exactly one
EOS at the end of each document, no id above the EOS id inside one) run on the same block. The
manifest's own arithmetic (totals, per-source sums, names, stray and temp files, gaps between
chunks) is checked in the main process. `sample > 0` also re-tokenizes documents from the
original inputs and compares them with the shards."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import xxhash

from pile_prep.inputs import InputError, expand_inputs, input_chunks, iter_records
from pile_prep.reader import ShardDataset, ShardError, _as_dirs, directory_set_problems, load_manifest
from pile_prep.shards import (
    INDEX_HEADER,
    INDEX_MAGIC,
    JOB,
    MANIFEST,
    index_size,
    is_temp,
    metadata_checksum,
    read_json,
    shard_name,
)
from pile_prep.tasks import Share, task_shares
from pile_prep.tokenize import usable_cores

# Per read. Small enough that the block and numpy's temporaries stay in cache and are reused
# (a fresh 64 MiB buffer costs more in page faults than checking it: 0.3 vs 2 GB/s measured);
# large enough that per-call overheads vanish.
BLOCK_BYTES = 1 << 20
_BYTES_PER_AUTO_WORKER = 256 << 20
MAX_PER_KIND = 10  # problems of one kind listed per file; the rest are counted


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    offset: int | None = None  # byte offset in `file`, where one point is at fault

    def __str__(self) -> str:
        where = f"{self.file}: offset {self.offset}" if self.offset is not None else self.file
        return f"{where}: {self.message}"


@dataclass
class VerifyReport:
    dirs: list[Path]
    problems: list[Problem] = field(default_factory=list)
    shards: int = 0
    tokens: int = 0
    documents: int = 0
    bytes_read: int = 0  # shard bytes read (.bin and .idx)
    seconds: float = 0.0
    workers: int = 1
    sampled: int = 0  # documents re-tokenized from the inputs
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9

    def format(self) -> str:
        lines = [
            f"checked {self.shards:,} shards in {len(self.dirs)} dir(s): {self.tokens:,} tokens, "
            f"{self.documents:,} documents, {_size(self.bytes_read)} read in {self.seconds:.2f} s "
            f"({self.gb_per_s:.2f} GB/s, {self.workers} worker(s))"
        ]
        if self.sampled:
            lines.append(f"re-tokenized {self.sampled} documents from the inputs")
        lines += [f"note: {n}" for n in self.notes]
        if self.ok:
            lines.append("OK: no problems found")
        else:
            lines += [str(p) for p in self.problems]
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


class _Collector:
    """Problems of one file, at most MAX_PER_KIND listed per kind."""

    def __init__(self, file: Path):
        self.file, self.problems, self._counts = str(file), [], {}

    def add(self, kind: str, message: str, offset: int | None = None) -> None:
        n = self._counts[kind] = self._counts.get(kind, 0) + 1
        if n <= MAX_PER_KIND:
            self.problems.append(Problem(self.file, message, offset))

    def more(self, kind: str, n: int) -> None:
        """Count n further problems of `kind` without describing them (they would not be listed)."""
        self._counts[kind] = self._counts.get(kind, 0) + n

    def finish(self) -> list[Problem]:
        for kind, n in self._counts.items():
            if n > MAX_PER_KIND:
                self.problems.append(Problem(self.file, f"... and {n - MAX_PER_KIND} more: {kind}"))
        return self.problems


# --- one shard (runs in a worker) ---------------------------------------------------------------


@dataclass(frozen=True)
class ShardCheck:
    directory: Path
    record: dict[str, Any]
    vocab_size: int
    eos_id: int
    block_bytes: int = BLOCK_BYTES


def _check_index(c: ShardCheck, path: Path, out: _Collector) -> tuple[np.ndarray | None, int]:
    """(offsets [n+1] int64 if usable, bytes read)."""
    rec = c.record
    n = rec["documents"]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        out.add("missing", "missing (listed in the manifest)")
        return None, 0
    if len(data) != index_size(n):
        out.add("size", f"{len(data)} bytes, expected {index_size(n)} for {n} documents")
        return None, len(data)
    if data[:8] != INDEX_MAGIC:
        out.add("magic", f"bad magic {data[:8]!r}, expected {INDEX_MAGIC!r}", 0)
        return None, len(data)
    header_n = int(np.frombuffer(data, "<u8", 1, 8)[0])
    if header_n != n:
        out.add("count", f"header says {header_n} documents, the manifest {n}", 8)
    offsets = np.frombuffer(data, "<u8", n + 1, INDEX_HEADER).astype(np.int64)  # [n+1]
    sources = np.frombuffer(data, "<u2", n, INDEX_HEADER + 8 * (n + 1))  # [n]
    usable = True
    if offsets[0] != 0:
        out.add("first offset", f"first offset is {offsets[0]}, expected 0", INDEX_HEADER)
        usable = False
    if offsets[-1] != rec["tokens"]:
        out.add("last offset", f"last offset is {offsets[-1]}, expected {rec['tokens']} tokens",
                INDEX_HEADER + 8 * n)  # fmt: skip
        usable = False
    for j in np.flatnonzero(np.diff(offsets) < 1):  # a document holds at least its EOS
        out.add("offsets", f"offsets not increasing: document {j} spans [{offsets[j]}, "
                f"{offsets[j + 1]})", INDEX_HEADER + 8 * (int(j) + 1))  # fmt: skip
        usable = False
    names = [s["name"] for s in rec["sources"]]
    for j in np.flatnonzero(sources >= len(names)):
        out.add("source id", f"document {j}: source id {sources[j]} but the record lists "
                f"{len(names)} sources", INDEX_HEADER + 8 * (n + 1) + 2 * int(j))  # fmt: skip
    if usable and n and int(sources.max()) < len(names):
        docs = np.bincount(sources, minlength=len(names))
        toks = np.bincount(sources, weights=np.diff(offsets), minlength=len(names)).astype(np.int64)
        for k, s in enumerate(rec["sources"]):
            if (toks[k], docs[k]) != (s["tokens"], s["documents"]):
                index, record = f"{toks[k]} in {docs[k]}", f"{s['tokens']} in {s['documents']}"
                out.add("source totals", f"source {s['name']!r}: the index has {index} documents, "
                        f"the record {record}")  # fmt: skip
    return (offsets if usable else None), len(data)


def _read_full(f, view: memoryview) -> int:
    n = 0
    while n < len(view):
        got = f.readinto(view[n:])
        if not got:
            break
        n += got
    return n


def check_shard(c: ShardCheck) -> tuple[list[Problem], int]:
    """Every check of one shard's `.idx` and `.bin`: (problems, bytes read)."""
    name, rec = c.record["name"], c.record
    idx_out = _Collector(c.directory / f"{name}.idx")
    offsets, nbytes = _check_index(c, c.directory / f"{name}.idx", idx_out)
    bin_path = c.directory / f"{name}.bin"
    out = _Collector(bin_path)
    try:
        f = open(bin_path, "rb", buffering=0)
    except FileNotFoundError:
        out.add("missing", "missing (listed in the manifest)")
        return idx_out.finish() + out.finish(), nbytes
    with f:
        size = os.fstat(f.fileno()).st_size
        if hasattr(os, "posix_fadvise"):  # cold data: let the kernel read ahead further
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if size != 4 * rec["tokens"]:
            out.add("size", f"{size} bytes, the manifest says {4 * rec['tokens']} "
                    f"({rec['tokens']} tokens)")  # fmt: skip
        ends = offsets[1:] - 1 if offsets is not None else None  # [n] where each EOS must be
        buf = bytearray(max(4, min(c.block_bytes - c.block_bytes % 4, size)))
        view = memoryview(buf)
        h = xxhash.xxh3_128()
        # For Qwen the EOS is the lowest special id, so ids >= it are rare (one per document):
        # one comparison finds both the EOS ids and the out-of-vocab ids.
        low = min(c.eos_id, c.vocab_size)
        pos = eos_count = 0  # tokens read so far
        while got := _read_full(f, view):
            h.update(view[:got])
            block = np.frombuffer(buf, "<u4", got // 4)  # [B]
            rare = np.flatnonzero(block >= low)  # [R]
            values = block[rare]
            bad = rare[values >= c.vocab_size]
            for k in bad[:MAX_PER_KIND]:
                out.add("id >= vocab size", f"token {pos + k}{_doc_of(offsets, pos + k)}: id "
                        f"{block[k]} >= vocab size {c.vocab_size}", 4 * (pos + int(k)))  # fmt: skip
            out.more("id >= vocab size", max(0, len(bad) - MAX_PER_KIND))
            # pile-prep encodes every added token's string as text: an id above the EOS id
            # (Qwen's other 21 added tokens) inside a document means another encoder made it.
            added = rare[(values > c.eos_id) & (values < c.vocab_size)]
            for k in added[:MAX_PER_KIND]:
                out.add("added-token id inside a document", f"token {pos + k}"
                        f"{_doc_of(offsets, pos + k)}: id {block[k]} >= EOS id {c.eos_id} inside "
                        "a document (an added token's string must be encoded as text)",
                        4 * (pos + int(k)))  # fmt: skip
            out.more("added-token id inside a document", max(0, len(added) - MAX_PER_KIND))
            found = rare[values == c.eos_id] + pos  # [E] EOS positions
            eos_count += len(found)
            if ends is not None:
                lo, hi = np.searchsorted(ends, (pos, pos + len(block)))
                expected = ends[lo:hi]
                if not np.array_equal(found, expected):
                    _eos_problems(found, expected, block, pos, offsets, c.eos_id, out)
            pos += len(block)
            nbytes += got
        if ends is None and eos_count != rec["documents"]:
            out.add("eos count", f"{eos_count} EOS ids, the manifest says {rec['documents']} "
                    "documents")  # fmt: skip
        checksum = "xxh3_128:" + h.hexdigest()
        if checksum != rec["checksum"]:
            out.add("checksum", f"checksum {checksum}, the manifest says {rec['checksum']}: the "
                    "tokens changed after they were written")  # fmt: skip
    return idx_out.finish() + out.finish(), nbytes


def _doc_of(offsets: np.ndarray | None, token: int) -> str:
    if offsets is None:
        return ""
    return f" (document {int(np.searchsorted(offsets, token, 'right')) - 1})"


def _eos_problems(found, expected, block, pos, offsets, eos_id: int, out: _Collector) -> None:
    extra, missing = np.setdiff1d(found, expected), np.setdiff1d(expected, found)
    for t in extra[:MAX_PER_KIND]:
        out.add("EOS inside a document", f"token {t}{_doc_of(offsets, t)}: EOS inside a document",
                4 * int(t))  # fmt: skip
    for t in missing[:MAX_PER_KIND]:
        doc = int(np.searchsorted(offsets, t, "right")) - 1
        out.add("missing EOS", f"document {doc} does not end with EOS: its last token (token {t}) "
                f"is {block[t - pos]}, not {eos_id}", 4 * int(t))  # fmt: skip
    out.more("EOS inside a document", max(0, len(extra) - MAX_PER_KIND))
    out.more("missing EOS", max(0, len(missing) - MAX_PER_KIND))


# --- the manifest (main process) ----------------------------------------------------------------


def _check_manifest(directory: Path, manifest: dict[str, Any]) -> list[Problem]:
    out = _Collector(directory / MANIFEST)
    records = manifest["shards"]
    totals = {"shards": len(records), "tokens": 0, "documents": 0, "skipped_empty": 0,
              "blank_lines": 0, "bad_lines": 0}  # fmt: skip
    sources: dict[str, dict[str, int]] = {}
    names = set()
    for i, r in enumerate(records):
        where = f"shards[{i}] ({r['name']})"
        if r["name"] in names:
            out.add("duplicate", f"{where}: listed twice")
        names.add(r["name"])
        if r["name"] != shard_name(r["input"], r.get("chunk", -1)):
            out.add("name", f"{where}: name does not match its input and chunk")
        if not 0 <= r["input"] < len(manifest["inputs"]):
            out.add("input", f"{where}: input {r['input']} is not in the manifest's inputs")
        if i and r["name"] < records[i - 1]["name"]:
            out.add("order", f"{where}: out of name order")
        st, sd = sum(s["tokens"] for s in r["sources"]), sum(s["documents"] for s in r["sources"])
        if (st, sd) != (r["tokens"], r["documents"]):
            out.add("record sources", f"{where}: sources add up to {st} tokens, {sd} documents; "
                    f"the record says {r['tokens']}, {r['documents']}")  # fmt: skip
        totals["tokens"] += r["tokens"]
        totals["documents"] += r["documents"]
        totals["skipped_empty"] += sum(1 for _, why in r["skipped_lines"] if why == "empty")
        totals["blank_lines"] += sum(1 for _, why in r["skipped_lines"] if why == "blank")
        totals["bad_lines"] += sum(1 for _, why in r["skipped_lines"] if why == "bad")
        for s in r["sources"]:
            t = sources.setdefault(s["name"], {"tokens": 0, "documents": 0})
            t["tokens"] += s["tokens"]
            t["documents"] += s["documents"]
        _check_record_file(directory, r, out)
        if manifest["format_version"] >= 2 and r.get("metadata_checksum") != metadata_checksum(r):
            what = "has no metadata_checksum" if "metadata_checksum" not in r else (
                "metadata (sources, line ranges, skipped lines, ...) changed after it was written: "
                f"metadata_checksum {r['metadata_checksum']}, the record hashes to {metadata_checksum(r)}")
            out.add("metadata checksum", f"{where}: {what}")
    for key, value in totals.items():
        if manifest["totals"].get(key) != value:
            out.add("totals", f"totals.{key} is {manifest['totals'].get(key)}, the shards add up "
                    f"to {value}")  # fmt: skip
    for name in sorted(sources.keys() | manifest["sources"].keys()):
        have, want = manifest["sources"].get(name), sources.get(name)
        if have != want:
            out.add("sources", f"sources[{name!r}] is {have}, the shards add up to {want}")
    _check_job(directory, manifest, out)
    tok = manifest["tokenizer"]
    if not 0 <= tok["eos_id"] < tok["vocab_size"]:
        out.add("tokenizer", f"tokenizer eos_id {tok['eos_id']} >= vocab_size {tok['vocab_size']}")
    for file in sorted(os.listdir(directory)):
        if is_temp(file):
            out.add("temp", f"{file}: temp file of a killed or failed run (rerunning the same "
                    "tokenize command removes it)")  # fmt: skip
        elif file.startswith("shard-") and file.split(".")[0] not in names:
            out.add("stray", f"{file} is not listed in the manifest")
    task = manifest.get("task", {"index": 0, "count": 1})
    _check_coverage(records, task_shares(len(manifest["inputs"]), task["count"], task["index"]), out)
    return out.finish()


def _read_json_or_report(path: Path, kind: str, out: _Collector, consequence: str = "") -> Any | None:
    """`path`'s JSON, or None after reporting it missing (with `consequence`) or unreadable."""
    try:
        return read_json(path)
    except FileNotFoundError:
        out.add(kind, f"{path.name} is missing" + (f": {consequence}" if consequence else ""))
    except ValueError as e:
        out.add(kind, f"{path.name} is not JSON: {e}")
    return None


def _check_job(directory: Path, manifest: dict[str, Any], out: _Collector) -> None:
    """The manifest repeats job.json (what the run was started with): every key must agree, the
    tokenizer's name, fingerprint and vocab size included."""
    job = _read_json_or_report(directory / JOB, "job", out, "the manifest's tokenizer and inputs cannot be checked")
    if job is None:
        return
    for key in job:
        have, want = manifest.get(key), job[key]
        if key == "tokenizer" and isinstance(have, dict) and isinstance(want, dict):
            for k in sorted(have.keys() | want.keys()):
                if have.get(k) != want.get(k):
                    out.add("job", f"tokenizer.{k} is {have.get(k)!r}, {JOB} says {want.get(k)!r}")
        elif have != want:
            out.add("job", f"{key} differs from {JOB}'s")


def _check_coverage(records: list[dict[str, Any]], shares: dict[int, Share], out: _Collector) -> None:
    """Each input's shards are this task's chunks (0, 1, 2, ... for a whole input) with no
    chunk missing, and, where no other task holds chunks in between, line ranges that follow
    one another."""
    last: dict[int, dict[str, Any]] = {}
    for r in records:  # (in name order: by input, then chunk)
        share = shares.get(r["input"])
        if share is None:
            out.add("gap", f"{r['name']}: input {r['input']} is not this task's")
            continue
        prev = last.get(r["input"])
        want_chunk = share.phase if prev is None else prev["chunk"] + share.stride
        want_line = 1 if prev is None else prev["last_line"] + 1
        if r["chunk"] != want_chunk:
            out.add("gap", f"input {r['input']}: chunk {want_chunk} is missing (next shard is "
                    f"{r['name']})")  # fmt: skip
        elif share.stride == 1 and r["first_line"] != want_line:
            out.add("gap", f"input {r['input']}: {r['name']} starts at line {r['first_line']}, "
                    f"expected {want_line} (lines in no shard, or in two)")  # fmt: skip
        last[r["input"]] = r


def _check_record_file(directory: Path, record: dict[str, Any], out: _Collector) -> None:
    path = directory / f"{record['name']}.json"
    on_disk = _read_json_or_report(path, "record file", out)
    if on_disk is None:
        return
    if on_disk != record:
        keys = sorted(k for k in on_disk.keys() | record.keys() if on_disk.get(k) != record.get(k))
        out.add("record file", f"{path.name} differs from the manifest's record in "
                f"{', '.join(keys)}")  # fmt: skip


# --- re-tokenizing a sample ---------------------------------------------------------------------


def _document_lines(record: dict[str, Any]) -> np.ndarray:
    """Input line of each document of the shard: [first, last] minus the skipped lines."""
    lines = np.arange(record["first_line"], record["last_line"] + 1)
    return np.setdiff1d(lines, [line for line, _ in record["skipped_lines"]])


def _match_inputs(manifest: dict[str, Any], given: list[Path]) -> list[Path | None]:
    """The given file for each manifest input: same path, else same file name and size."""
    by_path = {str(p): p for p in given}
    matched: list[Path | None] = []
    for inp in manifest["inputs"]:
        p = by_path.get(inp["path"])
        if p is None:
            same = [g for g in given if g.name == Path(inp["path"]).name
                    and g.stat().st_size == inp["size"]]  # fmt: skip
            p = same[0] if len(same) == 1 else None
        matched.append(p if p is not None and p.stat().st_size == inp["size"] else None)
    return matched


def _sample_dir(
    ds: ShardDataset, docs: np.ndarray, given: list[Path], tok: Any, out: list[Problem]
) -> int:
    """Re-tokenize documents `docs` of the one-directory dataset `ds`; returns how many compared."""
    manifest = ds.manifests[0]
    inputs = _match_inputs(manifest, given)
    wanted: dict[int, dict[int, dict[int, int]]] = {}  # input -> chunk -> line -> global doc
    for i in docs:
        s, j = ds.locate_document(int(i))
        r = ds.shards[s].record
        lines = _document_lines(r)
        if len(lines) != r["documents"]:
            out.append(Problem(str(ds.dirs[0] / MANIFEST), f"{r['name']}: lines "
                               f"{r['first_line']}-{r['last_line']} less skipped_lines are "
                               f"{len(lines)}, not {r['documents']} documents"))  # fmt: skip
            continue
        wanted.setdefault(r["input"], {}).setdefault(r["chunk"], {})[int(lines[j])] = int(i)
    compared = 0
    for input_index, chunks in sorted(wanted.items()):
        path, inp = inputs[input_index], manifest["inputs"][input_index]
        if path is None:
            why = "is not among the --source files (same path, or name and size)"
            out.append(Problem(inp["path"], f"input of {ds.dirs[0]} ({inp['size']} bytes) {why}"))
            continue
        try:
            for chunk in input_chunks(input_index, path, manifest["shard_bytes"], manifest["text_field"]):
                if chunk.chunk_index > max(chunks):
                    break
                for rec in iter_records(chunk, manifest["text_field"]):
                    doc = chunks.get(chunk.chunk_index, {}).get(rec.line)
                    if doc is not None:
                        compared += _compare(ds, doc, path, rec, tok, out)
        except (InputError, OSError) as e:
            out.append(Problem(str(path), f"cannot read: {e}"))
    return compared


def _compare(ds: ShardDataset, i: int, path: Path, rec: Any, tok: Any, out: list[Problem]) -> int:
    s, j = ds.locate_document(i)
    shard = ds.shards[s]
    where = f"document {j} ({path.name} line {rec.line})"
    if rec.text is None or rec.text == "":
        out.append(Problem(str(shard.idx_path), f"{where}: the input line is "
                           f"{'empty' if rec.text == '' else 'bad'}, not a document"))  # fmt: skip
        return 1
    expected = np.array(tok.encode(rec.text) + [tok.eos_id], np.int64)
    have = ds.document(i).astype(np.int64)
    if not np.array_equal(have, expected):
        n = min(len(have), len(expected))
        k = int(np.argmax(have[:n] != expected[:n])) if np.any(have[:n] != expected[:n]) else n
        start = ds.document_span(i)[0] - int(ds._token_starts[s])
        shard_tok = have[k] if k < len(have) else "the end"
        input_tok = expected[k] if k < len(expected) else "the end"
        message = (f"{where}: differs from the input re-tokenized at its token {k}: shard has "
                   f"{shard_tok}, the input gives {input_tok} ({len(have)} vs {len(expected)} "
                   "tokens)")  # fmt: skip
        out.append(Problem(str(shard.bin_path), message, 4 * (start + k)))
    if ds.document_source(i) != rec.source:
        out.append(Problem(str(shard.idx_path), f"{where}: source {ds.document_source(i)!r}, the "
                           f"input says {rec.source!r}"))  # fmt: skip
    return 1


def sample_check(
    dirs: Sequence[Path], k: int, sources: Sequence[str], seed: int = 0,
    tokenizer: str | None = None, notes: list[str] | None = None,
) -> tuple[list[Problem], int]:  # fmt: skip
    """Re-tokenize k documents (seeded choice) from `sources` and compare: (problems, compared).

    A directory the reader refuses is left out (and named in `notes`): the integrity checks
    report why.
    """
    problems: list[Problem] = []
    if not sources:
        return [Problem("--source", "re-tokenizing a sample needs the original inputs")], 0
    try:
        # Recursive: inputs are matched by path (or name and size), so extra files are harmless
        # and a tokenize run with --recursive is found again.
        given = expand_inputs(list(sources), recursive=True)
    except InputError as e:
        return [Problem(e.path, e.reason)], 0
    datasets = []
    for d in dirs:
        try:
            datasets.append(ShardDataset(d, partial=True))  # (the set is verify's to judge)
        except ShardError as e:
            if notes is not None:
                notes.append(f"{d} not sampled: the reader refuses it ({e})")
    if not datasets:
        return problems, 0
    try:
        tok = datasets[0].load_tokenizer(tokenizer)
    except (ShardError, ValueError) as e:
        return [Problem(str(datasets[0].dirs[0] / MANIFEST), f"cannot re-tokenize: {e}")], 0
    counts = np.array([ds.num_documents for ds in datasets])
    total = int(counts.sum())
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(k, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    compared = 0
    for n, ds in enumerate(datasets):
        mine = chosen[(chosen >= starts[n]) & (chosen < starts[n + 1])] - starts[n]
        if len(mine):
            compared += _sample_dir(ds, mine, given, tok, problems)
    return problems, compared


# --- everything ---------------------------------------------------------------------------------


def verify(
    dirs: str | Path | Sequence[str | Path],
    workers: int = 0,
    sample: int = 0,
    sources: Sequence[str] = (),
    seed: int = 0,
    tokenizer: str | None = None,
    block_bytes: int = BLOCK_BYTES,
    partial: bool = False,
) -> VerifyReport:
    """Check `dirs` completely; `sample` documents are also re-tokenized from `sources`.

    `workers`: processes checking shards in parallel; 0 picks all usable cores for large data
    and fewer (down to checking in this process) for small. `partial`: accept a set missing
    tasks of a `--num-tasks` job (the readers' rule, `directory_set_problems`).
    """
    start = time.perf_counter()
    report = VerifyReport(_as_dirs(dirs))
    checks: list[ShardCheck] = []
    tokenizer_of: dict[str, Path] = {}
    loaded: list[tuple[Path, dict[str, Any]]] = []
    for d in report.dirs:
        try:
            manifest = load_manifest(d)
        except ShardError as e:
            message = str(e).removeprefix(f"{d / MANIFEST}: ").removeprefix(f"{d}: ")
            report.problems.append(Problem(str(d / MANIFEST), message))
            continue
        loaded.append((d, manifest))
        if manifest["format_version"] < 2:
            report.notes.append(f"{d}: format version {manifest['format_version']}: its shard "
                                "metadata (sources, line ranges, skipped lines) has no checksum and "
                                "was not checked; retokenize to get one")  # fmt: skip
        tokenizer_of.setdefault(manifest["tokenizer"]["fingerprint"], d)
        try:
            report.problems += _check_manifest(d, manifest)
        except (KeyError, TypeError, ValueError) as e:  # a hand-edited record of the wrong shape
            report.problems.append(Problem(str(d / MANIFEST), f"malformed: {e!r}"))
        tok = manifest["tokenizer"]
        for r in manifest["shards"]:
            checks.append(ShardCheck(d, r, tok["vocab_size"], tok["eos_id"], block_bytes))
            report.tokens += r["tokens"]
            report.documents += r["documents"]
    set_problems = directory_set_problems([d for d, _ in loaded], [m for _, m in loaded], partial)
    report.problems += [Problem(", ".join(map(str, report.dirs)), p) for p in set_problems]
    if len(tokenizer_of) > 1:
        report.problems.append(Problem(", ".join(map(str, tokenizer_of.values())),
                                       "made with different tokenizers"))  # fmt: skip
    report.shards = len(checks)
    if workers == 0:  # auto: one worker per 256 MiB, so that small data is not split
        total = sum(4 * c.record["tokens"] for c in checks)
        workers = min(usable_cores(), 1 + total // _BYTES_PER_AUTO_WORKER)
    report.workers = max(1, min(workers, len(checks)))
    if report.workers == 1:
        report.problems += _gather(map(_check_guarded, checks), report)
    else:
        ctx = multiprocessing.get_context(_start_method())
        with ProcessPoolExecutor(report.workers, ctx) as pool:
            report.problems += _gather(pool.map(_check_guarded, checks), report)
    report.seconds = time.perf_counter() - start
    if sample > 0:
        problems, report.sampled = sample_check(
            report.dirs, sample, sources, seed, tokenizer, report.notes
        )
        report.problems += problems
    return report


def _check_guarded(c: ShardCheck) -> tuple[list[Problem], int]:
    """check_shard, with a malformed record or an unreadable file reported, not raised."""
    try:
        return check_shard(c)
    except (OSError, KeyError, TypeError, ValueError) as e:
        file = c.directory / f"{c.record.get('name')}.bin"
        return [Problem(str(file), f"cannot check: {e!r}")], 0


def _start_method() -> str:
    # fork starts a worker in ~10 ms, spawn in ~0.7 s (re-imports numpy and pile_prep): on
    # small data spawn costs more than the checks. Fork only where it is safe: on Linux, from
    # a process without other Python threads (whose locks a forked child could inherit held).
    if sys.platform == "linux" and threading.active_count() == 1:
        return "fork"
    return "spawn"


def _gather(results, report: VerifyReport) -> list[Problem]:
    problems = []
    for shard_problems, nbytes in results:
        problems += shard_problems
        report.bytes_read += nbytes
    return problems
