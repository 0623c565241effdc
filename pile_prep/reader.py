"""The one reader of pile-prep shards (docs/FORMAT.md): the trainer, `inspect` and `verify` use it.

Opening reads only each directory's `manifest.json` and `stat`s every `.bin`/`.idx`: no token
data, no file kept open. Shards are mapped on first use and kept in a bounded LRU, so a dataset
of thousands of shards holds at most `max_open` mappings (one file descriptor each).

Letters: S shards, N documents, T tokens (of the global stream: the shards concatenated in
directory order, then manifest order).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pile_prep.shards import (
    FORMAT,
    INDEX_HEADER,
    INDEX_MAGIC,
    JOB,
    MANIFEST,
    READABLE_VERSIONS,
    TOKEN_DTYPE,
    TOKEN_LAYOUT_VERSION,
    index_size,
    size_problem,
)

DEFAULT_MAX_OPEN = 64  # shards mapped at once (each mapping holds one file descriptor)
_RECORD_KEYS = {
    "name": str, "input": int, "first_line": int, "last_line": int, "tokens": int,
    "documents": int, "checksum": str, "sources": list, "skipped_lines": list,
}  # fmt: skip


class ShardError(ValueError):
    """Shards that cannot be read as asked; the message names the directory, file or key."""


@dataclass(frozen=True)
class Shard:
    """One shard of the dataset, as its manifest record describes it."""

    directory: Path
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def bin_path(self) -> Path:
        return self.directory / f"{self.name}.bin"

    @property
    def idx_path(self) -> Path:
        return self.directory / f"{self.name}.idx"


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The directory's manifest, checked for format and required keys (raises ShardError)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ShardError(f"{directory}: no such directory")
    if not path.is_file():
        if (directory / JOB).is_file():
            raise ShardError(
                f"{directory}: the tokenize run that writes it is not complete (job.json but no "
                "manifest.json); rerun the same `pile-prep tokenize` command to finish it"
            )
        raise ShardError(f"{directory}: not a pile-prep shard directory (no {MANIFEST})")
    try:
        with open(path, "rb") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: cannot read: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ShardError(
            f"{path}: format_version {manifest.get('format_version')!r}, this reader reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if (manifest.get("dtype"), manifest.get("byteorder")) != ("uint32", "little"):
        raise ShardError(f"{path}: dtype {manifest.get('dtype')!r} {manifest.get('byteorder')!r}, "
                         "expected 'uint32' 'little'")  # fmt: skip
    for key, kind in (("tokenizer", dict), ("inputs", list), ("totals", dict),
                      ("sources", dict), ("shards", list)):  # fmt: skip
        if not isinstance(manifest.get(key), kind):
            raise ShardError(f"{path}: missing key or not a {kind.__name__}: {key!r}")
    for key, kind in (("name", str), ("fingerprint", str), ("vocab_size", int), ("eos_id", int)):
        if not isinstance(manifest["tokenizer"].get(key), kind):
            raise ShardError(f"{path}: missing key or not {kind.__name__}: 'tokenizer.{key}'")
    for i, record in enumerate(manifest["shards"]):
        if not isinstance(record, dict):
            raise ShardError(f"{path}: 'shards[{i}]' is not an object")
        for key, kind in _RECORD_KEYS.items():
            if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
                what = "missing key" if key not in record else f"not {kind.__name__}:"
                raise ShardError(f"{path}: {what} 'shards[{i}].{key}'")
        for j, source in enumerate(record["sources"]):
            for key, kind in (("name", str), ("tokens", int), ("documents", int)):
                if not isinstance(source.get(key) if isinstance(source, dict) else None, kind):
                    raise ShardError(f"{path}: missing or not {kind.__name__}: "
                                     f"'shards[{i}].sources[{j}].{key}'")  # fmt: skip
    return manifest


def check_shard_files(shard: Shard) -> str | None:
    """Why the shard's files disagree with the manifest (a stat, no read), or None if they agree."""
    return size_problem(shard.directory, shard.record, "the manifest")


def read_index(shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n+1] int64, source ids [n] uint16) of a shard, read into memory and checked."""
    n = shard.record["documents"]
    with open(shard.idx_path, "rb") as f:
        data = f.read()
    if len(data) != index_size(n) or data[:8] != INDEX_MAGIC:
        raise ShardError(f"{shard.idx_path}: not a pile-prep index of {n} documents")
    if int(np.frombuffer(data, "<u8", 1, 8)[0]) != n:
        raise ShardError(f"{shard.idx_path}: header counts a different number of documents "
                         f"than the manifest's {n}")  # fmt: skip
    offsets = np.frombuffer(data, "<u8", n + 1, INDEX_HEADER).astype(np.int64)
    sources = np.frombuffer(data, "<u2", n, INDEX_HEADER + 8 * (n + 1))
    if offsets[0] != 0 or offsets[-1] != shard.record["tokens"] or np.any(np.diff(offsets) < 1):
        raise ShardError(f"{shard.idx_path}: offsets are not increasing from 0 to "
                         f"{shard.record['tokens']}; run `pile-prep verify`")  # fmt: skip
    if n and int(sources.max()) >= len(shard.record["sources"]):
        raise ShardError(f"{shard.idx_path}: source id out of range; run `pile-prep verify`")
    return offsets, sources


def _job_of(manifest: dict[str, Any]) -> str:
    """What makes two directories parts of one job: everything job.json holds but the task
    index, with inputs by content (size and head_tail), not by path (each machine of a
    `--num-tasks` job may mount the files elsewhere)."""
    task = manifest.get("task", {"index": 0, "count": 1})
    job = {
        "tokenizer": manifest["tokenizer"].get("fingerprint"),
        "text_field": manifest.get("text_field"),
        "shard_bytes": manifest.get("shard_bytes"),
        "tasks": task.get("count"),
        "inputs": [[i.get("size"), i.get("head_tail")] for i in manifest["inputs"]],
    }
    return json.dumps(job, sort_keys=True)


def directory_set_problems(
    dirs: Sequence[Path], manifests: Sequence[dict[str, Any]], partial: bool = False
) -> list[str]:
    """Why `dirs` (with their loaded manifests) cannot be read as one dataset without counting
    a document twice or missing a task, one message each; [] if they can.

    Refused: the same directory twice (by inode, so a symlink or `a/../a` too), and two
    directories holding the same task of the same job (a copy). Unless `partial`, a job split
    with `--num-tasks` must come with every task.
    """
    problems = []
    seen: dict[tuple[int, int], Path] = {}
    tasks: dict[str, dict[int, Path]] = {}
    for d, m in zip(dirs, manifests, strict=True):
        st = d.stat()
        first = seen.setdefault((st.st_dev, st.st_ino), d)
        if first is not d:
            problems.append(f"{d}: given twice (as {first} too); its documents would be read twice")
            continue
        task = m.get("task", {"index": 0, "count": 1})
        other = tasks.setdefault(_job_of(m), {}).setdefault(task["index"], d)
        if other is not d:
            problems.append(f"{d} and {other} hold the same task {task['index']} of "
                            f"{task['count']} of one job (a copy?); its documents would be read "
                            "twice")  # fmt: skip
    if not partial:
        for d, m in zip(dirs, manifests, strict=True):
            count = m.get("task", {"count": 1})["count"]
            held = tasks.pop(_job_of(m), None)
            if held is None or count == 1:
                continue
            missing = [t for t in range(count) if t not in held]
            if missing:
                problems.append(
                    f"{d}: task(s) {_ranges(missing)} of its {count}-task job are not given "
                    f"(given: {_ranges(sorted(held))}); pass every task's directory, or accept "
                    "a partial set on purpose (--partial)"
                )
    return problems


def _ranges(numbers: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for n in numbers:
        if out and out[-1].split("-")[-1] == str(n - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out)


def _as_dirs(dirs: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(dirs, (str, Path)):
        return [Path(dirs)]
    if not dirs:
        raise ShardError("no shard directory given")
    return [Path(d) for d in dirs]


class _LRU:
    """A bounded map that evicts the least recently used entry (its mapping closes when unused)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int, load) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load(key)
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


class ShardDataset:
    """One or several `pile-prep tokenize` output directories as one token stream.

    `dirs`: a directory or a sequence of them (their streams are concatenated in that order).
    `expect_fingerprint`: the tokenizer fingerprint the caller was built for; data made with
    another tokenizer is refused. `partial`: accept a set missing tasks of a `--num-tasks` job.
    Raises ShardError on a missing or unfinished manifest, another format version, a shard whose
    files are missing or of the wrong size, directories made with different tokenizers, or a
    set that would count documents twice or miss tasks (`directory_set_problems`).
    """

    def __init__(
        self,
        dirs: str | Path | Sequence[str | Path],
        expect_fingerprint: str | None = None,
        max_open: int = DEFAULT_MAX_OPEN,
        partial: bool = False,
    ):
        self.dirs = _as_dirs(dirs)
        self.manifests = [load_manifest(d) for d in self.dirs]
        problems = directory_set_problems(self.dirs, self.manifests, partial)
        if problems:
            raise ShardError("; ".join(problems))
        self.tokenizer: dict[str, Any] = dict(self.manifests[0]["tokenizer"])
        for d, m in zip(self.dirs[1:], self.manifests[1:], strict=True):
            t = m["tokenizer"]
            if any(t[k] != self.tokenizer[k] for k in ("fingerprint", "vocab_size", "eos_id")):
                raise ShardError(
                    f"{d} was made with tokenizer {t['name']} ({t['fingerprint']}), "
                    f"{self.dirs[0]} with {self.tokenizer['name']} "
                    f"({self.tokenizer['fingerprint']}): they cannot be read as one dataset"
                )
        if expect_fingerprint is not None and self.tokenizer["fingerprint"] != expect_fingerprint:
            raise ShardError(
                f"{self.dirs[0]}: made with tokenizer {self.tokenizer['name']} "
                f"({self.tokenizer['fingerprint']}), expected {expect_fingerprint}; "
                "retokenize with the model's tokenizer"
            )
        self.eos_id: int = self.tokenizer["eos_id"]
        self.vocab_size: int = self.tokenizer["vocab_size"]
        self.shards = [Shard(d, r) for d, m in zip(self.dirs, self.manifests, strict=True)
                       for r in m["shards"]]  # fmt: skip
        for shard in self.shards:
            problem = check_shard_files(shard)
            if problem is not None:
                raise ShardError(problem)
        self.num_shards = len(self.shards)
        # Global position -> shard: searchsorted over these cumulative counts.
        self._token_starts = np.cumsum([0] + [s.record["tokens"] for s in self.shards])  # [S+1]
        self._doc_starts = np.cumsum([0] + [s.record["documents"] for s in self.shards])  # [S+1]
        self.num_tokens = int(self._token_starts[-1])
        self.num_documents = int(self._doc_starts[-1])

        totals: dict[str, dict[str, int]] = {}
        for shard in self.shards:
            for s in shard.record["sources"]:
                t = totals.setdefault(s["name"], {"tokens": 0, "documents": 0})
                t["tokens"] += s["tokens"]
                t["documents"] += s["documents"]
        self.source_totals = dict(sorted(totals.items()))
        self.source_names = list(self.source_totals)
        ids = {name: i for i, name in enumerate(self.source_names)}
        self._source_dtype = np.int16 if len(ids) < 2**15 else np.int32
        # Shard-local source id -> index into source_names.
        self._source_maps = [
            np.array([ids[s["name"]] for s in shard.record["sources"]], self._source_dtype)
            for shard in self.shards
        ]
        self.fingerprint = self._data_fingerprint()
        self.max_open = max_open
        self._init_caches()

    def _init_caches(self) -> None:
        self._bins = _LRU(self.max_open)
        self._indexes = _LRU(self.max_open)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into DataLoader workers: send the description, never the mapped data.
        state = self.__dict__.copy()
        del state["_bins"], state["_indexes"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def __repr__(self) -> str:
        return (f"ShardDataset({', '.join(map(str, self.dirs))}: {self.num_shards} shards, "
                f"{self.num_tokens:,} tokens, {self.num_documents:,} documents)")  # fmt: skip

    def _data_fingerprint(self) -> str:
        h = hashlib.sha256()
        desc = {
            # The token layout's version: format 2 added shard metadata checksums only, so the
            # same tokens keep one fingerprint (and one sample order) in either format.
            "format_version": TOKEN_LAYOUT_VERSION,
            "tokenizer": self.tokenizer["fingerprint"],
            "dirs": [[[r["name"], r["tokens"], r["checksum"]] for r in m["shards"]]
                     for m in self.manifests],
        }  # fmt: skip
        h.update(json.dumps(desc, separators=(",", ":")).encode())
        return "sha256:" + h.hexdigest()

    # --- per-shard data, loaded lazily ---------------------------------------------------------

    def _bin(self, s: int) -> np.ndarray:
        def load(s: int) -> np.ndarray:
            shard = self.shards[s]
            if shard.record["tokens"] == 0:  # mmap refuses an empty file
                return np.empty(0, TOKEN_DTYPE)
            # mmap + frombuffer rather than np.memmap: 10 us instead of 100 (no path resolving),
            # which matters when random access cycles through more shards than the LRU holds.
            with open(shard.bin_path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return np.frombuffer(mapped, TOKEN_DTYPE, shard.record["tokens"])  # [T_shard]

        return self._bins.get(s, load)

    def _index(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets [n+1] int64, global source ids [n]) of shard s."""

        def load(s: int) -> tuple[np.ndarray, np.ndarray]:
            offsets, local = read_index(self.shards[s])
            return offsets, self._source_maps[s][local]

        return self._indexes.get(s, load)

    def load_tokenizer(self, spec: str | None = None) -> Any:
        """The tokenizer the shards were made with: `spec` (a path) or the bundled one by name.

        Raises ShardError if it is not the same tokenizer (by fingerprint).
        """
        from pile_prep.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

        want = self.tokenizer
        if spec is None:
            if want["name"] != DEFAULT_TOKENIZER:
                raise ShardError(f"{self.dirs[0]}: made with tokenizer {want['name']}; "
                                 "pass --tokenizer PATH to its files")  # fmt: skip
            spec = DEFAULT_TOKENIZER
        tok = load_tokenizer(spec)
        if tok.fingerprint != want["fingerprint"]:
            raise ShardError(f"tokenizer {spec} ({tok.fingerprint}) is not the one {self.dirs[0]} "
                             f"was made with ({want['name']}, {want['fingerprint']})")  # fmt: skip
        return tok

    def open_mappings(self) -> int:
        """Shards currently mapped (at most `max_open`)."""
        return len(self._bins)

    # --- documents ------------------------------------------------------------------------------

    def document_index(self, i: int) -> int:
        """i in [0, num_documents); a negative i counts from the end."""
        j = i + self.num_documents if i < 0 else i
        if not 0 <= j < self.num_documents:
            raise IndexError(f"document {i} out of range [0, {self.num_documents})")
        return j

    def locate_document(self, i: int) -> tuple[int, int]:
        """(shard, document within the shard) of global document i (negative: from the end)."""
        i = self.document_index(i)
        s = int(np.searchsorted(self._doc_starts, i, "right")) - 1
        return s, i - int(self._doc_starts[s])

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i, its EOS included: a read-only view of the mapped shard."""
        s, j = self.locate_document(i)
        offsets, _ = self._index(s)
        return self._bin(s)[offsets[j] : offsets[j + 1]]

    def document_source(self, i: int) -> str:
        s, j = self.locate_document(i)
        return self.source_names[self._index(s)[1][j]]

    def document_span(self, i: int) -> tuple[int, int]:
        """[start, stop) of document i in the global token stream."""
        s, j = self.locate_document(i)
        offsets, _ = self._index(s)
        base = int(self._token_starts[s])
        return base + int(offsets[j]), base + int(offsets[j + 1])

    def iter_documents(self) -> Iterator[tuple[np.ndarray, str]]:
        """(tokens, source) of every document in order, shard by shard."""
        for s in range(self.num_shards):
            offsets, sources = self._index(s)
            tokens = self._bin(s)
            for j in range(len(sources)):
                yield tokens[offsets[j] : offsets[j + 1]], self.source_names[sources[j]]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (EOS included), [N] int64, from the index files alone."""
        if not self.shards:
            return np.empty(0, np.int64)
        return np.concatenate([np.diff(read_index(shard)[0]) for shard in self.shards])

    def document_sources(self) -> np.ndarray:
        """Index into `source_names` of each document, [N] int16/int32, from the index files alone."""
        if not self.shards:
            return np.empty(0, self._source_dtype)
        return np.concatenate([self._source_maps[s][read_index(shard)[1]] for s, shard in enumerate(self.shards)])

    # --- token ranges ---------------------------------------------------------------------------

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard, local start, local stop) covering the global range [start, stop)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) not in [0, {self.num_tokens})")
        pos = start
        while pos < stop:
            s = int(np.searchsorted(self._token_starts, pos, "right")) - 1
            base = int(self._token_starts[s])
            end = min(stop, int(self._token_starts[s + 1]))
            yield s, pos - base, end - base
            pos = end

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the global stream, uint32 [stop - start].

        A zero-copy read-only view when the range lies in one shard; a copy when it crosses.
        """
        pieces = [self._bin(s)[a:b] for s, a, b in self._pieces(start, stop)]
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, TOKEN_DTYPE)

    def sources_at(self, positions: np.ndarray) -> np.ndarray:
        """Index into `source_names` of the token at each global position: [len(positions)].

        Reads index files only (one searchsorted per shard touched), never token data.
        """
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_tokens):
            raise IndexError(f"token positions outside [0, {self.num_tokens})")
        out = np.empty(len(positions), self._source_dtype)
        shard_of = np.searchsorted(self._token_starts, positions, "right") - 1  # [P]
        for s in np.unique(shard_of).tolist():
            sel = shard_of == s
            offsets, sources = self._index(s)
            local = positions[sel] - int(self._token_starts[s])
            out[sel] = sources[np.searchsorted(offsets, local, "right") - 1]
        return out

    def token_source_ids(self, start: int, stop: int) -> np.ndarray:
        """Index into `source_names` of each token in [start, stop): [stop - start] int16/int32."""
        out = []
        for s, a, b in self._pieces(start, stop):
            offsets, sources = self._index(s)
            first = int(np.searchsorted(offsets, a, "right")) - 1
            last = int(np.searchsorted(offsets, b - 1, "right")) - 1
            bounds = np.clip(offsets[first : last + 2], a, b)  # [docs + 1]
            out.append(np.repeat(sources[first : last + 1], np.diff(bounds)))
        return np.concatenate(out) if out else np.empty(0, self._source_dtype)
