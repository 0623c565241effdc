"""Read Pile-format inputs: expand INPUT specs, cut each file into chunks, parse records.

A tokenize reader process decompresses and cuts each input into chunks of whole lines (memchr
speed); workers parse and tokenize them (pile_prep/pipeline.py). Chunk boundaries depend on the bytes alone
(docs/FORMAT.md).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import xxhash
import zstandard

SUFFIXES = (".jsonl.zst", ".jsonl.zstd", ".jsonl", ".jsonl.gz", ".parquet")
UNKNOWN_SOURCE = "unknown"
_READ_SIZE = 1 << 20
# job.json identifies an input by its size and a hash of its first and last MiB (4 ms of reading
# per file, whatever its size); each shard also records a hash of its own input bytes.
_IDENTITY_BYTES = 1 << 20


class InputError(Exception):
    """Bad input, named by file and line: the expected failure, reported without a traceback."""

    def __init__(self, path: str | Path, line: int | None, reason: str, hint: str | None = None):
        self.path, self.line, self.reason, self.hint = str(path), line, reason, hint
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # raised in worker processes: pickle with the real arguments
        return InputError, (self.path, self.line, self.reason, self.hint)


def expand_inputs(specs: list[str], recursive: bool = False) -> list[Path]:
    """Files, directories (their supported files, sorted) or globs (sorted), in argument order.

    A directory gives the files directly inside it; `recursive` also those in its
    subdirectories (never by default: The Pile's root holds `val/` and `test/` next to `train/`).
    """
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in (p.rglob("*") if recursive else p.iterdir())
                           if f.is_file() and f.name.endswith(SUFFIXES))  # fmt: skip
            if not found and not recursive:
                deeper = sum(1 for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
                if deeper:
                    raise InputError(spec, None, f"no Pile input files directly inside ({deeper} in "
                                     "subdirectories: name them, or pass --recursive)")  # fmt: skip
        elif p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise InputError(p, None, f"unsupported file type (expected {', '.join(SUFFIXES)})")
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(spec) if f.endswith(SUFFIXES))
        if not found:
            raise InputError(spec, None, "no such file, or no Pile input files match it")
        paths.extend(found)
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return unique


def input_identity(path: Path) -> dict:
    """{"path", "size", "head_tail"}: the input as job.json records it.

    Not the mtime: a copy or a `touch` changes it without changing a byte, and the output must
    stay a function of the input bytes. An edit that keeps the size and both ends is caught by
    the shard records' `input_checksum` instead.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h = xxhash.xxh3_128(f.read(_IDENTITY_BYTES))
        if size > 2 * _IDENTITY_BYTES:
            f.seek(size - _IDENTITY_BYTES)
        h.update(f.read(_IDENTITY_BYTES))
    return {"path": str(path), "size": size, "head_tail": "xxh3_128:" + h.hexdigest()}


@dataclass
class Chunk:
    """A run of whole input lines (JSONL bytes) or Parquet rows: one future shard."""

    input_index: int
    chunk_index: int
    path: str
    first_line: int  # 1-based
    last_line: int
    progress: int  # input-file bytes consumed once this chunk is read (for the progress bar)
    lines: bytes = b""  # JSONL: whole lines
    rows: tuple[list, list] | None = None  # Parquet: (texts, sources)
    error: str | None = None  # the input broke after this chunk (kept under --skip-bad-lines)


def chunk_checksum(chunk: Chunk) -> str:
    """XXH3-128 of the chunk's input: its line bytes, or (Parquet) each row's text and source."""
    if chunk.rows is None:
        return "xxh3_128:" + xxhash.xxh3_128(chunk.lines).hexdigest()
    h = xxhash.xxh3_128()
    for text, source in zip(*chunk.rows):
        for value in (text, source):
            data = (value if isinstance(value, str) else repr(value)).encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little") + data)
    return "xxh3_128:" + h.hexdigest()


class _ZstdStream:
    """Multi-frame zstd decompression that, unlike `stream_reader`, notices truncation."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._d = zstandard.ZstdDecompressor()
        self._obj = self._d.decompressobj()
        self._started = False

    def read(self) -> bytes:
        while True:
            raw = self._f.read(_READ_SIZE)
            if not raw:
                if self._started and not self._obj.eof:
                    raise ValueError("truncated zstd stream (file ends inside a frame)")
                return b""
            out = []
            while raw:
                if self._obj.eof:  # next frame
                    self._obj = self._d.decompressobj()
                self._started = True
                out.append(self._obj.decompress(raw))
                raw = self._obj.unused_data if self._obj.eof else b""
            data = b"".join(out)
            if data:
                return data


def _open_blocks(path: Path, f: BinaryIO) -> Iterator[bytes]:
    name = Path(path).name
    if name.endswith((".zst", ".zstd")):
        stream = _ZstdStream(f)
        while block := stream.read():
            yield block
    elif name.endswith(".gz"):
        with gzip.GzipFile(fileobj=f) as g:
            # read1, not read: read() drops what it decoded before hitting a truncated end.
            while block := g.read1(_READ_SIZE):
                yield block
    else:
        while block := f.read(_READ_SIZE):
            yield block


def _jsonl_chunks(index: int, path: Path, shard_bytes: int, opener=open) -> Iterator[Chunk]:
    try:
        f = opener(path, "rb")
    except OSError as e:
        raise InputError(path, None, f"cannot open: {e.strerror}") from e
    with f:
        buf = bytearray()
        line, chunk_index = 1, 0
        error = None

        def cut(end: int, err: str | None = None) -> Chunk:
            nonlocal line, chunk_index
            data = bytes(memoryview(buf)[:end])  # one copy (buf[:end] would make two)
            del buf[:end]
            n = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
            chunk = Chunk(index, chunk_index, str(path), line, line + n - 1, f.tell(), data, None, err)
            line += n
            chunk_index += 1
            return chunk

        scanned = 0  # bytes of buf known to hold no newline past shard_bytes - 1
        try:
            for block in _open_blocks(path, f):
                buf += block
                while len(buf) >= shard_bytes:
                    # Resume the search where the last one stopped: a line of many blocks is
                    # scanned once (linear), not once per block (quadratic).
                    end = buf.find(b"\n", max(shard_bytes - 1, scanned))
                    if end < 0:
                        scanned = len(buf)
                        break
                    yield cut(end + 1)
                    scanned = 0
        except (zstandard.ZstdError, ValueError, OSError, EOFError, zlib.error) as e:
            error = f"corrupt or truncated input: {e}"
        if error is not None:
            # Only complete lines before the damage are kept; a partial last line is dropped.
            keep = buf.rfind(b"\n") + 1
            del buf[keep:]
            if buf:
                yield cut(len(buf), error)
            else:
                yield Chunk(index, chunk_index, str(path), line, line - 1, f.tell(), error=error)
        elif buf:
            yield cut(len(buf))


def _parquet_chunks(index: int, path: Path, shard_bytes: int, text_field: str) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on non-Parquet files
        raise InputError(path, None, f"cannot read Parquet: {e}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise InputError(path, None, f"no column {text_field!r} (columns: {', '.join(names)})")
    columns = [text_field] + (["meta"] if "meta" in names else [])
    file_size, num_rows = path.stat().st_size, max(1, pf.metadata.num_rows)
    line, chunk_index = 1, 0
    texts: list = []
    sources: list = []
    size = 0
    try:
        for batch in pf.iter_batches(batch_size=4096, columns=columns):
            column = batch.column(text_field)
            metas = batch.column("meta").to_pylist() if "meta" in columns else [None] * batch.num_rows
            texts += column.to_pylist()
            sources += [_source_of(m) for m in metas]
            size += pc.sum(pc.binary_length(column)).as_py() or 0  # UTF-8 bytes of text
            if size >= shard_bytes:
                last = line + len(texts) - 1
                yield Chunk(index, chunk_index, str(path), line, last, file_size * last // num_rows,
                            rows=(texts, sources))  # fmt: skip
                line, chunk_index, texts, sources, size = line + len(texts), chunk_index + 1, [], [], 0
    except (OSError, pa.ArrowException) as e:  # a corrupt page: keep the rows read before it
        yield Chunk(index, chunk_index, str(path), line, line + len(texts) - 1, file_size,
                    rows=(texts, sources), error=f"corrupt Parquet data: {e}")  # fmt: skip
        return
    if texts:
        yield Chunk(index, chunk_index, str(path), line, line + len(texts) - 1, file_size,
                    rows=(texts, sources))  # fmt: skip


def input_chunks(index: int, path: Path, shard_bytes: int, text_field: str) -> Iterator[Chunk]:
    """Every chunk of one input, numbered as input `index` of its job."""
    if path.name.endswith(".parquet"):
        return _parquet_chunks(index, path, shard_bytes, text_field)
    return _jsonl_chunks(index, path, shard_bytes)


def _source_of(meta: object) -> str:
    if isinstance(meta, str):  # some mirrors store meta as a JSON string
        try:
            meta = json.loads(meta)
        except ValueError:
            return UNKNOWN_SOURCE
    if isinstance(meta, dict) and isinstance(meta.get("pile_set_name"), str):
        return meta["pile_set_name"]
    return UNKNOWN_SOURCE


@dataclass
class Record:
    line: int
    text: str | None  # None: a bad line (see `error`) or a blank one
    source: str
    error: str | None = None
    blank: bool = False  # a whitespace-only line: no record (HF's json reader skips it too)


def _is_blank(raw: bytes) -> bool:
    """Empty, or only JSON whitespace (space, tab, CR): what Hugging Face's JSON reader skips.

    A form feed or vertical tab is not JSON whitespace: such a line is not JSON, here and in
    the streaming reader alike. (isspace first: no copy of a long line.)
    """
    return not raw or (raw.isspace() and not raw.translate(None, b" \t\r"))


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


_KEYS_SHOWN = 10  # of a record without the text field, in its error


def parse_line(raw: bytes, line: int, text_field: str) -> Record:
    """One JSONL line as a record: exactly one JSON object, no key twice in any of its objects.

    The one rule for the offline and the streaming reader (which reads JSONL through this too,
    docs/FORMAT.md): a UTF-8 BOM, a form feed, two objects on a line, a key given twice (in
    `meta` too, and however its name is escaped: `"te\\u0078t"` is `"text"`), or a null text
    make a bad line. (Python would keep the last of a duplicated key, Arrow refuses the line.)
    """
    if _is_blank(raw):
        return Record(line, None, "", blank=True)
    try:
        # The hook sees every object's keys after unescaping: ~3 us per 5 kB line, ~1% of
        # tokenizing it.
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
        return Record(line, None, "", f"invalid UTF-8 at byte {e.start}")
    except _DuplicateKey as e:
        return Record(line, None, "", f"duplicated {e.args[0]!r} key")
    except ValueError as e:
        return Record(line, None, "", f"not JSON: {e}")
    if not isinstance(obj, dict):
        return Record(line, None, "", f"not a JSON object: {type(obj).__name__}")
    text = obj.get(text_field)
    if not isinstance(text, str):
        if text_field not in obj:
            keys = list(obj)
            shown = ", ".join(map(repr, keys[:_KEYS_SHOWN])) + (", ..." if len(keys) > _KEYS_SHOWN else "")
            return Record(line, None, "", f"no {text_field!r} field (keys: {shown or 'none'})")
        else:
            what = "null" if text is None else f"non-string ({type(text).__name__})"
        return Record(line, None, "", f"{what} {text_field!r} field")
    source = _source_of(obj.get("meta"))
    if b"\\u" in raw:  # only a \uXXXX escape can smuggle a lone surrogate past UTF-8 decoding
        try:
            text.encode("utf-8")
            source.encode("utf-8")
        except UnicodeEncodeError as e:
            return Record(line, None, "", f"lone surrogate {e.object[e.start]!r} (not a character)")
    return Record(line, text, source)


JSONL_SUFFIXES = tuple(s for s in SUFFIXES if s.startswith(".jsonl"))
_STREAM_CHUNK_BYTES = 4 << 20


def read_records(path: str, text_field: str, opener=open) -> Iterator[Record]:
    """Every record (non-blank line) of one JSONL file, in order, a bad one with `error` set:
    the streaming reader's way into the same cutting and parsing as `tokenize`. Raises
    InputError where the file itself breaks (corrupt or truncated), after its last whole line.
    `opener(path, "rb")` opens it (fsspec's for a URL)."""
    for chunk in _jsonl_chunks(0, path, _STREAM_CHUNK_BYTES, opener):
        for rec in iter_records(chunk, text_field):
            if not rec.blank:
                yield rec
        if chunk.error is not None:
            raise InputError(path, chunk.last_line + 1, chunk.error)


def iter_records(chunk: Chunk, text_field: str) -> Iterator[Record]:
    """The chunk's records in order; a bad one comes back with `error` set."""
    if chunk.rows is not None:
        for i, (text, source) in enumerate(zip(*chunk.rows)):
            if isinstance(text, str):
                yield Record(chunk.first_line + i, text, source)
            else:
                what = "null" if text is None else f"non-string ({type(text).__name__})"
                yield Record(chunk.first_line + i, None, "", f"{what} {text_field!r}")
        return
    line = chunk.first_line
    start = 0
    data = chunk.lines
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        yield parse_line(data[start:end], line, text_field)
        start, line = end + 1, line + 1
