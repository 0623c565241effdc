"""How a dataset's documents become windows: one packing's token stream, cut into samples.

Letters: S seq_len, D documents, P spans, N windows, T tokens.

A packing puts the documents of a `ShardDataset` in an order (the packed stream: each document
followed by its EOS, as in the shards) and cuts that stream into spans; each span of length T_s
holds (T_s - 1) // S windows of S + 1 tokens with stride S (`pile_prep.packing.span_windows`), and
a window never leaves its span.

- "stream": the documents in data order, one span: the shards' own token stream (no index).
- "by_source": documents grouped by `pile_set_name`, shuffled within each source by the seed;
  one span per source, so every window holds documents of one source.
- "similarity": documents sorted by a 64-bit SimHash of their first 2,048 tokens
  (`pile_prep.packing.content_signatures`), one span: neighbours share content (Lory's
  similarity-based batching, after In-Context Pretraining).

`shift` moves every window of a span by that many tokens (0 <= shift < S), cyclically: a window
that runs past its span's end continues at the span's start. The trainer shifts each epoch after
the first by a keyed amount, so a window's content moves between epochs.

The order of a grouped packing is built once per (data, packing, seed) into a cache directory:
`order` [D] (4 bytes per document below 2^32 documents) and `starts` [D + 1] int64, read through
memory maps. Signatures are built once per dataset (8 bytes per document), in parallel over
document chunks.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ioe_train.order import derive_key
from pile_prep.packing import SIGNATURE_TOKENS, content_signatures, document_order, signature_projection, span_windows
from pile_prep.reader import ShardDataset

_CHUNK_TOKENS = 1 << 18  # tokens per signature step: a [T, 64] fp32 gather of 64 MiB


class PackedStream:
    """The windows of one packing of `ds` at seq_len S: `num_windows`, `tokens`, `source_ids`."""

    def __init__(self, ds: ShardDataset, seq_len: int, spans: np.ndarray, order: np.ndarray | None = None,
                 starts: np.ndarray | None = None):  # fmt: skip
        self.ds, self.seq_len = ds, seq_len
        self.order, self.starts = order, starts  # None: the data order (packing "stream")
        self.spans = np.asarray(spans, np.int64)  # [P + 1] span boundaries in the packed stream
        windows = span_windows(np.diff(self.spans), seq_len)  # [P]
        self._first_window = np.concatenate([[0], np.cumsum(windows)])  # [P + 1]
        self.num_windows = int(self._first_window[-1])

    def __getstate__(self) -> dict:
        # Pickled into DataLoader workers: send the cache files' names, never their mapped bytes.
        state = self.__dict__.copy()
        for name in ("order", "starts"):
            if isinstance(state[name], np.memmap):
                state[name] = Path(state[name].filename)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for name in ("order", "starts"):
            if isinstance(state[name], Path):
                setattr(self, name, np.load(state[name], mmap_mode="r"))

    def window_ranges(self, i: int, shift: int = 0) -> list[tuple[int, int]]:
        """Window i's S + 1 tokens as ranges of the packed stream (two when it wraps)."""
        span = int(np.searchsorted(self._first_window, i, "right")) - 1
        a, length = int(self.spans[span]), int(self.spans[span + 1] - self.spans[span])
        p = (i - int(self._first_window[span])) * self.seq_len + shift  # < length - 1 (span_windows)
        end = p + self.seq_len + 1
        if end <= length:
            return [(a + p, a + end)]
        return [(a + p, a + length), (a, a + end - length)]

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Ranges of the dataset's own stream that hold packed tokens [start, stop), in order."""
        if self.order is None:
            yield start, stop
            return
        assert self.starts is not None
        j = int(np.searchsorted(self.starts, start, "right")) - 1  # packed document holding `start`
        while start < stop:
            doc_start, _ = self.ds.document_span(int(self.order[j]))
            end = min(stop, int(self.starts[j + 1]))
            yield doc_start + start - int(self.starts[j]), doc_start + end - int(self.starts[j])
            start, j = end, j + 1

    def _ranges(self, i: int, shift: int) -> Iterator[tuple[int, int]]:
        for a, b in self.window_ranges(i, shift):
            yield from self._pieces(a, b)

    def tokens(self, i: int, shift: int = 0) -> np.ndarray:
        """Window i: [S + 1] uint32 (a view of the mapped shard when it lies in one document range)."""
        pieces = [self.ds.tokens(a, b) for a, b in self._ranges(i, shift)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def source_ids(self, i: int, shift: int = 0) -> np.ndarray:
        """Index into ds.source_names of each token of window i: [S + 1]."""
        return np.concatenate([self.ds.token_source_ids(a, b) for a, b in self._ranges(i, shift)])

    def window_sources(self) -> np.ndarray:
        """Index into ds.source_names of each window's first token (shift 0): [N]."""
        doc_sources = None if self.order is None else self.ds.document_sources()  # [D]
        out = np.empty(self.num_windows, np.int32)
        for a in range(0, self.num_windows, 1 << 20):
            idx = np.arange(a, min(self.num_windows, a + (1 << 20)), dtype=np.int64)  # [n]
            span = np.searchsorted(self._first_window, idx, "right") - 1
            packed = self.spans[span] + (idx - self._first_window[span]) * self.seq_len  # [n]
            if doc_sources is None:
                out[a : a + len(idx)] = self.ds.sources_at(packed)
            else:
                assert self.order is not None and self.starts is not None
                j = np.searchsorted(self.starts, packed, "right") - 1  # [n] packed documents
                out[a : a + len(idx)] = doc_sources[np.asarray(self.order[j], np.int64)]
        return out


def pack(ds: ShardDataset, packing: str, seq_len: int, seed: int, cache_dir: Path | None) -> PackedStream:
    """`ds` packed by `packing` ("stream", "by_source", "similarity") with the document order of
    `seed`; a grouped packing's order is read from `cache_dir`, built there first if absent
    ("stream" needs none: it is the data's own order)."""
    if packing == "stream":
        return PackedStream(ds, seq_len, np.array([0, ds.num_tokens]))
    if cache_dir is None:
        raise ValueError(f"packing {packing!r} needs a cache directory for its document order")
    key = derive_key("packing", packing, ds.fingerprint, seed)
    order_path = cache_dir / f"packing-{key:016x}-order.npy"
    starts_path = cache_dir / f"packing-{key:016x}-starts.npy"
    spans_path = cache_dir / f"packing-{key:016x}-spans.npy"
    if not spans_path.exists():  # written last: its presence marks a complete build
        sources = ds.document_sources()  # [D]
        signatures = content_signature_index(ds, cache_dir) if packing == "similarity" else None
        order = document_order(packing, sources, signatures, key)  # [D]
        lengths = ds.document_lengths()[order]  # [D] in packed order
        starts = np.concatenate([[0], np.cumsum(lengths)])  # [D + 1]
        if packing == "by_source":  # a span per source: where the packed source changes
            packed_sources = sources[order]
            cut = np.flatnonzero(packed_sources[1:] != packed_sources[:-1]) + 1
            spans = np.concatenate([[0], starts[cut], [starts[-1]]])
        else:
            spans = np.array([0, starts[-1]])
        save_atomic(order_path, order.astype(np.uint32 if len(order) < 2**32 else np.int64))
        save_atomic(starts_path, starts)
        save_atomic(spans_path, spans)
    return PackedStream(ds, seq_len, np.load(spans_path), np.load(order_path, mmap_mode="r"),
                        np.load(starts_path, mmap_mode="r"))  # fmt: skip


def save_atomic(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` atomically: ranks building the same file at once all end with one
    copy (host and pid in the temp name: several nodes may share the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{socket.gethostname()}-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


# --- content signatures ---------------------------------------------------------------------------


def content_signature_index(ds: ShardDataset, cache_dir: Path, workers: int | None = None) -> np.ndarray:
    """[D] uint64 SimHash of every document of `ds`, cached in `cache_dir` by data fingerprint.

    Two passes over each document's first SIGNATURE_TOKENS tokens, in `workers` processes (all
    cores by default): token counts (for the weights), then the signatures.
    """
    path = cache_dir / f"signatures-{derive_key('signatures', ds.fingerprint):016x}.npy"
    if path.exists():
        return np.load(path)
    lengths = ds.document_lengths()  # [D]
    workers = max(1, workers or os.cpu_count() or 1)
    tasks = [(ds, a, lengths[a:b]) for a, b in _document_ranges(lengths, 4 * workers)]
    with ProcessPoolExecutor(min(workers, len(tasks))) if workers > 1 else _InProcess() as pool:
        counts = sum(pool.map(_count_tokens, *zip(*tasks)))  # [V]
        signatures = np.concatenate(list(pool.map(_signatures, *zip(*tasks), [counts] * len(tasks))))
    save_atomic(path, signatures)
    return signatures


class _InProcess:
    """ProcessPoolExecutor's `map` in this process (one worker: no process start-up)."""

    def __enter__(self) -> "_InProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable, *args) -> Iterator:
        return map(fn, *args)


def _document_ranges(lengths: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """About `parts` [a, b) document ranges of equal signature tokens (none empty)."""
    capped = np.minimum(lengths, SIGNATURE_TOKENS).cumsum()
    if not len(capped):
        return []
    bounds = np.searchsorted(capped, np.linspace(0, capped[-1], parts + 1)[1:-1])
    edges = np.unique(np.concatenate([[0], bounds, [len(lengths)]]))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _capped_chunks(ds: ShardDataset, a: int, lengths: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, offsets) of documents a, a + 1, ... (`lengths` of them), each cut to its first
    SIGNATURE_TOKENS, about _CHUNK_TOKENS at a time: documents are contiguous in the data order."""
    capped = np.minimum(lengths, SIGNATURE_TOKENS)
    i = 0
    while i < len(lengths):
        j = i + max(1, int(np.searchsorted(np.cumsum(capped[i:]), _CHUNK_TOKENS, "right")))
        start, _ = ds.document_span(a + i)
        tokens = ds.tokens(start, start + int(lengths[i:j].sum()))
        n = lengths[i:j]
        within = np.arange(len(tokens)) - np.repeat(np.cumsum(n) - n, n)  # [T] offset in its document
        yield tokens[within < SIGNATURE_TOKENS], np.concatenate([[0], np.cumsum(capped[i:j])])
        i = j


def _count_tokens(ds: ShardDataset, a: int, lengths: np.ndarray) -> np.ndarray:
    """Occurrences of each id among the signature tokens of documents a, a + 1, ... (len(lengths) of them): [V] int64."""
    counts = np.zeros(ds.vocab_size, np.int64)
    for tokens, _ in _capped_chunks(ds, a, lengths):
        counts += np.bincount(tokens, minlength=ds.vocab_size)
    return counts


def _signatures(ds: ShardDataset, a: int, lengths: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Signatures of documents a, a + 1, ...: [len(lengths)] uint64 (each worker builds the same projection)."""
    projection = signature_projection(counts)  # [V, 64]
    return np.concatenate([content_signatures(t, o, projection) for t, o in _capped_chunks(ds, a, lengths)])
