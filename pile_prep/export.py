"""`pile-prep export megatron`: shard directories -> one Megatron indexed dataset (.bin + .idx).

Megatron-LM, NeMo and GPT-NeoX read `PREFIX.bin` (the tokens) and `PREFIX.idx` (`MMIDIDX`
header, then per-sequence lengths and byte pointers, then document boundaries); the layout is
written out in docs/FORMAT.md. One sequence per document, its EOS included, int32 tokens.
Streaming: the tokens are copied shard by shard, and the index is written in two passes over
the shards' `.idx` files, so memory holds one shard's offsets at a time.
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pile_prep.reader import ShardDataset, ShardError, read_index
from pile_prep.shards import fsync_dir, temp_path

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


def _write_bin(ds: ShardDataset, path: Path) -> None:
    # Every id is below the vocab size (< 2**31), so each uint32 of a shard has the bytes of
    # the same int32: the tokens are copied, not converted.
    with open(path, "wb") as out:
        for shard in ds.shards:
            with open(shard.bin_path, "rb") as f:
                shutil.copyfileobj(f, out, _COPY_BYTES)
        out.flush()
        os.fsync(out.fileno())


def _write_idx(ds: ShardDataset, path: Path) -> None:
    n = ds.num_documents
    with open(path, "wb") as out:
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
        out.flush()
        os.fsync(out.fileno())


def export_megatron(dirs: Sequence[str | Path], prefix: str | Path, partial: bool = False) -> ExportSummary:
    """Write the documents of `dirs` (read as one dataset, in order) to PREFIX.bin / PREFIX.idx.

    Byte-identical for the same shards. Each file is written under a temp name and renamed, so
    a failed or killed export leaves the previous files (or none), never half of one.
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
    temps = [temp_path(p) for p in paths]
    try:
        _write_bin(ds, temps[0])
        _write_idx(ds, temps[1])
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
        fsync_dir(paths[0].parent)
    except (OSError, ShardError, ExportError) as e:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ExportError(f"cannot write {e.filename or paths[0].parent}: {e.strerror or e}") from None
        raise ExportError(str(e)) from None
    return ExportSummary(*paths, ds.num_documents, ds.num_tokens, time.perf_counter() - start)
