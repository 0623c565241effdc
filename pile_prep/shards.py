"""The on-disk shard format (docs/FORMAT.md): names, index layout, atomic writes, the writer."""

from __future__ import annotations

import json
import os
import sys
from array import array
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import xxhash

FORMAT = "pile-prep-shards"
FORMAT_VERSION = 2  # 2: shard records carry `metadata_checksum`
TOKEN_LAYOUT_VERSION = 1  # the .bin/.idx layout, unchanged since format 1 (keys the data fingerprint)
READABLE_VERSIONS = (1, 2)
TOKEN_DTYPE = np.dtype("<u4")  # uint32: Qwen's 151,936 ids overflow uint16
assert array("I").itemsize == 4, "ShardWriter needs a 4-byte C unsigned int"
INDEX_MAGIC = b"PPIDX001"
INDEX_HEADER = 16  # magic + uint64 document count
MANIFEST = "manifest.json"
JOB = "job.json"
MAX_BAD_LINES_LISTED = 100  # per shard record; the manifest lists up to 1,000


def shard_name(input_index: int, chunk_index: int) -> str:
    return f"shard-{input_index:05d}-{chunk_index:06d}"


def index_size(num_docs: int) -> int:
    return INDEX_HEADER + 8 * (num_docs + 1) + 2 * num_docs


def encode_index(offsets: np.ndarray, sources: np.ndarray) -> bytes:
    """offsets: uint64 [N+1] token offsets; sources: uint16 [N] ids into the shard's sources."""
    n = len(sources)
    header = INDEX_MAGIC + np.uint64(n).astype("<u8").tobytes()
    return header + offsets.astype("<u8").tobytes() + sources.astype("<u2").tobytes()


class OutputError(Exception):
    """A write into the output directory failed (disk full, file size limit, permissions)."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot write {path}: {reason}")

    def __reduce__(self):  # raised in worker processes: pickle with the real arguments
        return OutputError, (self.path, self.reason)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the directory itself became unusable: the error being raised says so


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """Where `path` is written before its rename (`is_temp` recognises it). Per process: an
    orphaned worker of a killed run may still be writing the same file."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def is_temp(name: str) -> bool:
    return ".tmp-" in name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all; on a failed write no temp file stays (OutputError)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise OutputError(path, e.strerror or str(e)) from None


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as deterministic JSON (sorted keys are not used: order is meaning)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())
    try:
        fsync_dir(path.parent)
    except OSError as e:
        raise OutputError(path.parent, e.strerror or str(e)) from None


def metadata_checksum(record: dict[str, Any]) -> str:
    """XXH3-128 of a shard record as canonical JSON (sorted keys, no spaces, UTF-8): source
    labels, line ranges and skipped lines included; not this checksum itself, nor the tokens'
    `checksum` (checked against the `.bin` bytes)."""
    rest = {k: v for k, v in record.items() if k not in ("metadata_checksum", "checksum")}
    data = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "xxh3_128:" + xxhash.xxh3_128(data.encode("utf-8", "surrogatepass")).hexdigest()


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


class ShardWriter:
    """Streams one shard's tokens to `NAME.bin.tmp-PID`, then commits bin, idx and record.

    Memory stays bounded by one piece of one document: tokens go to the file as they come.
    """

    def __init__(self, directory: Path, name: str):
        self.directory, self.name = directory, name
        self._bin = directory / f"{name}.bin"
        self._tmp_bin = temp_path(self._bin)
        try:
            self._file = open(self._tmp_bin, "wb", buffering=1 << 20)
        except OSError as e:
            raise OutputError(self._bin, e.strerror or str(e)) from None
        self._hash = xxhash.xxh3_128()
        self._offsets = [0]
        self._source_ids: list[int] = []
        self._sources: dict[str, list[int]] = {}  # name -> [id, tokens, documents]; id = first seen
        self._tokens = 0
        self._doc_start = 0

    def write_tokens(self, ids: np.ndarray | Sequence[int]) -> None:
        if isinstance(ids, np.ndarray):
            tokens = np.ascontiguousarray(ids, dtype=TOKEN_DTYPE)
        else:
            # array("I") converts a list of ints 2.5x faster than np.asarray; "I" is 4 bytes here.
            tokens = array("I", ids)
            if sys.byteorder == "big":
                tokens.byteswap()
        try:
            self._file.write(tokens)
        except OSError as e:
            raise OutputError(self._bin, e.strerror or str(e)) from None
        self._hash.update(tokens)
        self._tokens += len(tokens)

    def end_document(self, eos_id: int, source: str) -> None:
        self.write_tokens((eos_id,))
        stats = self._sources.setdefault(source, [len(self._sources), 0, 0])
        if len(self._sources) > 65535:  # ids are uint16
            raise ValueError(f"{self.name}: more than 65,535 sources in one shard")
        stats[1] += self._tokens - self._doc_start
        stats[2] += 1
        self._source_ids.append(stats[0])
        self._offsets.append(self._tokens)
        self._doc_start = self._tokens

    def commit(self, record: dict[str, Any]) -> dict[str, Any]:
        """Rename bin and idx into place, then write the record (the shard's done mark).

        On a failed write nothing of the shard stays: no temp file, no .bin without its record.
        """
        index = encode_index(np.array(self._offsets, np.uint64), np.array(self._source_ids))
        try:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                os.replace(self._tmp_bin, self._bin)
            except OSError as e:
                raise OutputError(self._bin, e.strerror or str(e)) from None
            atomic_write_bytes(self.directory / f"{self.name}.idx", index)
        except OutputError:
            self.abort()
            _unlink_quietly(self._bin)
            raise
        record = {
            "name": self.name,
            **record,
            "tokens": self._tokens,
            "documents": len(self._source_ids),
            "checksum": "xxh3_128:" + self._hash.hexdigest(),
            "sources": [
                {"name": s, "tokens": t, "documents": d} for s, (_, t, d) in self._sources.items()
            ],
        }
        record["metadata_checksum"] = metadata_checksum(record)
        try:
            write_json(self.directory / f"{self.name}.json", record)
        except OutputError:
            _unlink_quietly(self._bin)
            _unlink_quietly(self.directory / f"{self.name}.idx")
            raise
        return record

    def abort(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # flushing the buffer hits the error that made us abort: drop it
        _unlink_quietly(self._tmp_bin)


def size_problem(directory: Path, record: dict[str, Any], source: str = "the record") -> str | None:
    """Why the shard's .bin/.idx sizes disagree with `record` (a stat, no read), or None.

    `source` names where the record came from, for the message."""
    name = record["name"]
    for path, expected in ((directory / f"{name}.bin", 4 * record["tokens"]),
                           (directory / f"{name}.idx", index_size(record["documents"]))):  # fmt: skip
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path}: missing (listed in {source})"
        if size != expected:
            return f"{path}: {size} bytes, {source} says {expected}"
    return None


def shard_is_done(directory: Path, name: str) -> dict[str, Any] | None:
    """The shard's record if it is completely written, else None."""
    try:
        record = read_json(directory / f"{name}.json")
    except (OSError, ValueError):
        return None
    return record if size_problem(directory, record) is None else None
