"""`pile-prep export megatron`: shard directories -> one Megatron indexed dataset (.bin + .idx).

Megatron-LM, NeMo and GPT-NeoX read `PREFIX.bin` (the tokens) and `PREFIX.idx` (`MMIDIDX`
header, then per-sequence lengths and byte pointers, then document boundaries); the layout is
written out in docs/FORMAT.md. One sequence per document, its EOS included, int32 tokens.
Streaming: the tokens are copied shard by shard, and the index is written in two passes over
the shards' `.idx` files, so memory holds one shard's offsets at a time.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pile_prep.reader import ShardDataset, ShardError, read_index
from pile_prep.shards import _unlink_quietly, fsync_dir, temp_path

MEGATRON_INDEX_HEADER = b"MMIDIDX\x00\x00"
MEGATRON_INDEX_VERSION = 1
MEGATRON_INT32 = 4  # megatron.core.datasets.indexed_dataset.DType.int32
_COPY_BYTES = 16 << 20
_ARANGE_BLOCK = 1 << 20


class ExportError(Exception):
    """Shards that cannot be exported, or an output that cannot be written: one line, no traceback."""


@dataclass
class ExportSummary:
    bin_path: Path
    idx_path: Path
    documents: int
    tokens: int
    seconds: float


def _write_bin(ds: ShardDataset, out) -> None:
    # Every id is below the vocab size (< 2**31), so each uint32 of a shard has the bytes of
    # the same int32: the tokens are copied, not converted.
    for shard in ds.shards:
        with open(shard.bin_path, "rb") as f:
            shutil.copyfileobj(f, out, _COPY_BYTES)


def _write_idx(ds: ShardDataset, out) -> None:
    n = ds.num_documents
    out.write(MEGATRON_INDEX_HEADER + struct.pack("<Q", MEGATRON_INDEX_VERSION))
    out.write(struct.pack("<B", MEGATRON_INT32) + struct.pack("<QQ", n, n + 1))
    for shard in ds.shards:  # int32 [n]: tokens per sequence (= per document)
        lengths = np.diff(read_index(shard)[0])
        if len(lengths) and int(lengths.max()) >= 2**31:
            raise ExportError(f"{shard.bin_path}: a document of {lengths.max()} tokens does "
                              "not fit Megatron's int32 lengths")  # fmt: skip
        out.write(lengths.astype("<i4").tobytes())
    start = 0
    for shard in ds.shards:  # int64 [n]: byte offset of each sequence in the .bin
        out.write((4 * (read_index(shard)[0][:-1] + start)).astype("<i8").tobytes())
        start += shard.record["tokens"]
    for i in range(0, n + 1, _ARANGE_BLOCK):  # int64 [n+1]: document k = sequences [k, k+1)
        out.write(np.arange(i, min(i + _ARANGE_BLOCK, n + 1), dtype="<i8").tobytes())


def _remove_debris(paths: Sequence[Path]) -> None:
    """Delete the temp files of exports to these paths that were killed (kill -9, power loss).

    A running export holds an flock on each of its temp files, so a temp file that can be
    locked belongs to no live export. On a file system without flock, a temp file whose PID
    is not a process here counts as dead.
    """
    for path in paths:
        for tmp in path.parent.glob(f"{path.name}.tmp-*"):
            try:
                fd = os.open(tmp, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                dead = True
            except BlockingIOError:
                dead = False
            except OSError:
                dead = not _alive(tmp.name.rsplit("-", 1)[-1])
            finally:
                os.close(fd)
            if dead:
                _unlink_quietly(tmp)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def _write_locked(tmp: Path, write, ds: ShardDataset) -> None:
    with open(tmp, "wb") as out:
        try:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # no flock here: _remove_debris goes by the PID in the name
        write(ds, out)
        out.flush()
        os.fsync(out.fileno())


def export_megatron(
    dirs: Sequence[str | Path], prefix: str | Path, partial: bool = False, overwrite: bool = False
) -> ExportSummary:
    """Write the documents of `dirs` (read as one dataset, in order) to PREFIX.bin / PREFIX.idx.

    Byte-identical for the same shards. Each file is written under a temp name and renamed, so
    a failed or killed export leaves the previous files (or none), never half of one; a failed
    export deletes its temp files, and the next export to the prefix those of a killed one.
    PREFIX's directory is created; an existing PREFIX.bin or .idx is replaced only if
    `overwrite`. `partial`: accept a set missing tasks of a `--num-tasks` job.
    """
    start = time.perf_counter()
    try:
        ds = ShardDataset(dirs, partial=partial)
    except ShardError as e:
        raise ExportError(str(e)) from None
    if ds.vocab_size > 2**31:
        raise ExportError(f"vocab size {ds.vocab_size} does not fit Megatron's int32 tokens")
    prefix = Path(prefix)
    paths = (Path(f"{prefix}.bin"), Path(f"{prefix}.idx"))
    if paths[0].parent.exists() and not paths[0].parent.is_dir():
        raise ExportError(f"cannot write {prefix}: {paths[0].parent} is a file, not a directory")
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise ExportError(f"{' and '.join(existing)} exist(s): pass --overwrite to replace, or "
                          "choose another --output")  # fmt: skip
    temps = [temp_path(p) for p in paths]
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        _remove_debris(paths)
        _write_locked(temps[0], _write_bin, ds)
        _write_locked(temps[1], _write_idx, ds)
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
        fsync_dir(paths[0].parent)
    except BaseException as e:
        for tmp in temps:
            _unlink_quietly(tmp)
        if isinstance(e, OSError):
            where = e.filename or paths[0].parent
            raise ExportError(f"cannot write {where}: {e.strerror or e}") from None
        if isinstance(e, (ShardError, ExportError)):
            raise ExportError(str(e)) from None
        raise
    return ExportSummary(*paths, ds.num_documents, ds.num_tokens, time.perf_counter() - start)
