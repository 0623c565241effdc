"""Streaming fallback: train straight from raw Pile-format files, tokenized and packed on the fly.

Another reader feeding the same steps as `pile-prep tokenize`: JSONL records (local, or a hub
dataset's data files through fsspec) are cut and parsed by `pile_prep.inputs.read_records`, the
offline reader's own code, so a malformed line gets the same decision; Parquet is read by
Hugging Face `datasets` streaming. The same tokenizer turns each non-empty text into its ids plus one
EOS, and `BlockPacker` cuts the stream into blocks of S+1 tokens with stride S. With one reader
and no shuffle the stream is the offline shards' stream, token for token (docs/STREAMING.md).

Readers: every (rank, DataLoader worker) pair is one reader, `reader = rank * W + worker` of
`R = world_size * W`. Files are dealt out whole while there are enough of them; the remainder
(all files when there are fewer files than readers) is shared by record stride. Each record of
each file belongs to exactly one reader, so within an epoch no document is read twice or missed.

Resume: a reader's position is the document holding the first token of its next block and that
token's offset in the document. `StatefulDataLoader` (torchdata) collects every worker's
position with each batch; `make_streaming_loader` builds one.

`datasets` and `torchdata` are imported only inside the functions that use them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pile_prep.inputs import JSONL_SUFFIXES, expand_inputs
from pile_prep.packing import BlockPacker, document_tokens
from pile_prep.tokenizer import DEFAULT_TOKENIZER, Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from torchdata.stateful_dataloader import StatefulDataLoader

STATE_VERSION = 1
_BATCH_ROWS = 1024  # records per Arrow batch pulled from `datasets`


class StreamingError(ValueError):
    """A streaming setup or input that cannot work; the message names the field or file."""


@dataclass
class StreamingConfig:
    data_files: list[str] = field(default_factory=list)  # local paths/dirs/globs, or hub patterns
    hub_dataset: str | None = None  # hub id (or a local dataset dir); None: data_files are local
    split: str = "train"  # split of the hub dataset (local files are all read)
    text_field: str = "text"  # record field holding the document text
    tokenizer: str = DEFAULT_TOKENIZER  # "qwen2.5" or a path to HF tokenizer files
    shuffle_buffer: int = 0  # documents held for shuffling; 0: exact offline order
    seed: int = 0  # file order and shuffle buffer seed (with the epoch)


class Document(NamedTuple):
    file: str
    record: int  # 0-based index of the record in its file (empty records count)
    tokens: list[np.ndarray]  # the text's token pieces, then [EOS]


class _Key(NamedTuple):
    """Where a document sits in a reader's stream: enough to restart there."""

    doc: int  # position in the reader's document sequence (after shuffling)
    item: int  # index into the reader's work list
    record: int  # record index in that file
    stride_base: int  # records of the shared files before this one (the stride's phase)


@dataclass(frozen=True)
class _Work:
    path: str
    shared: bool  # True: split with the other readers by record stride


def resolve_files(cfg: StreamingConfig) -> list[str]:
    """The input files in stream order: `pile-prep tokenize`'s order for local inputs."""
    if cfg.hub_dataset is None:
        if not cfg.data_files:
            raise StreamingError("data_files: no input files (and no hub_dataset)")
        return [str(p) for p in expand_inputs(list(cfg.data_files))]
    import datasets

    patterns = {cfg.split: list(cfg.data_files)} if cfg.data_files else None
    builder = datasets.load_dataset_builder(cfg.hub_dataset, data_files=patterns)
    found = builder.config.data_files or {}
    if cfg.split not in found or not found[cfg.split]:
        raise StreamingError(
            f"split: {cfg.hub_dataset!r} has no data files for split {cfg.split!r} "
            f"(splits: {', '.join(map(str, found)) or 'none'})"
        )
    files = [str(f) for f in found[cfg.split]]
    for f in files:
        _builder(f)  # refuse an unreadable file now, not in a worker hours later
    return files


def reader_files(files: list[str], reader: int, readers: int) -> list[_Work]:
    """Reader `reader`'s work: whole files r, r+R, .. of the first floor(F/R)*R, then the
    remaining F mod R files shared by stride (all F files shared when F < R)."""
    whole = len(files) // readers * readers
    return [_Work(p, False) for p in files[reader:whole:readers]] + [
        _Work(p, True) for p in files[whole:]
    ]


class StreamingWarning(UserWarning):
    """A streaming setup that works but wastes reading (more readers than files)."""


def read_amplification(files: int, readers: int) -> float:
    """Input bytes read in total per input byte, for `files` files of equal size.

    A file dealt out whole is read once; each of the F mod R shared files is read by every one
    of the R readers (each parses all its records to keep every R-th).
    """
    whole = files // readers * readers
    return (whole + readers * (files - whole)) / files


def amplification_warning(files: int, world_size: int, num_workers: int) -> str | None:
    """The warning for readers that outnumber (or do not divide) the files, else None."""
    readers = world_size * max(1, num_workers)
    shared = files % readers
    if shared == 0:
        return None
    amplification = read_amplification(files, readers)
    enough = -(-files // readers) * readers
    return (f"streaming: {files} input files for {readers} readers ({world_size} ranks x "
            f"{max(1, num_workers)} DataLoader workers): {shared} files are decompressed and "
            f"parsed by every reader, {amplification:.1f}x the reading of the inputs; with a "
            f"multiple of {readers} files (e.g. {enough}) each is read once: re-cut them into "
            f"{enough} files (docs/STREAMING.md, 'Fewer files than readers')")  # fmt: skip


def _builder(path: str) -> str:
    """The `datasets` packaged builder that reads `path`."""
    if path.endswith(".parquet"):
        return "parquet"
    if ".json" in Path(path).name:  # .jsonl, .jsonl.zst, .json.gz, ...: the builder decompresses
        return "json"
    raise StreamingError(f"{path}: not a JSON Lines or Parquet file")


def _jsonl_texts(path: str, text_field: str, skip: int) -> Iterator[str]:
    """The text of every record of one JSONL file from record `skip` on, read and parsed by
    `pile-prep tokenize`'s own code: one rule for a malformed line (`parse_line`)."""
    from pile_prep.inputs import InputError, read_records

    opener = open
    if "://" in path:  # a hub dataset's file (hf://...): fsspec, which `datasets` brings
        import fsspec

        def opener(p: str, mode: str):
            return fsspec.open(p, mode).open()

    hint = "(pile-prep tokenize --skip-bad-lines can skip bad lines)"
    try:
        for record, rec in enumerate(read_records(path, text_field, opener)):
            if record < skip:
                continue
            if rec.error is not None:
                raise StreamingError(f"{path}, record {record + 1} (line {rec.line}): {rec.error} {hint}")
            yield rec.text
    except InputError as e:
        raise StreamingError(f"{e} {hint}") from None


def _texts(path: str, text_field: str, skip: int) -> Iterator[str]:
    """The text of every record of one file from record `skip` on: JSONL by `_jsonl_texts`,
    Parquet through `datasets`."""
    if path.endswith(JSONL_SUFFIXES):
        yield from _jsonl_texts(path, text_field, skip)
        return
    import datasets

    ds = datasets.load_dataset(_builder(path), data_files=[path], split="train", streaming=True)
    if ds.features is not None:
        if text_field not in ds.features:
            raise StreamingError(
                f"{path}: no field {text_field!r} (fields: {', '.join(ds.features)})"
            )
        ds = ds.select_columns([text_field])
    if skip:
        ds = ds.skip(skip)
    record = skip
    # .iter() reads in this process; iter(ds) would split files across DataLoader workers again.
    batches = ds.iter(batch_size=_BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # pyarrow / datasets raise their own types on a malformed file
            raise StreamingError(
                f"{path}: cannot read record {record + 1} or one of the next: {e} "
                "(pile-prep tokenize --skip-bad-lines can skip bad lines)"
            ) from e
        if text_field not in batch:
            raise StreamingError(f"{path}: no field {text_field!r} (fields: {', '.join(batch)})")
        for text in batch[text_field]:
            if not isinstance(text, str):
                what = "null" if text is None else type(text).__name__
                raise StreamingError(
                    f"{path}, record {record + 1}: {text_field!r} is {what}, "
                    "not a string (pile-prep tokenize --skip-bad-lines can skip such records)"
                )
            yield text
            record += 1


def _shuffled(items: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A deterministic buffer shuffle: each item leaves from a random slot of `size`."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = item
    for i in rng.permutation(len(buf)):
        yield buf[i]


class StreamingTokenDataset(IterableDataset):
    """Blocks {"input_ids": [S], "labels": [S]} (int64) of this rank's share of the stream.

    Iterate it in the main process or in DataLoader workers; each worker is its own reader.
    `state_dict()` / `load_state_dict()` hold this process's reader position: with workers,
    resume through `make_streaming_loader` (a StatefulDataLoader gathers the workers' states).
    """

    def __init__(self, cfg: StreamingConfig, seq_len: int, rank: int, world_size: int,
                 tokenizer: Tokenizer | None = None):  # fmt: skip
        """`tokenizer`: `load_tokenizer(cfg.tokenizer)` if already loaded (saves ~0.5 s per
        process); else loaded on first use. Forked workers inherit it, spawned ones load it."""
        if seq_len < 1:
            raise StreamingError(f"seq_len must be positive, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise StreamingError(f"rank {rank} is not in [0, world_size={world_size})")
        if cfg.shuffle_buffer < 0:
            raise StreamingError(f"shuffle_buffer must be >= 0, got {cfg.shuffle_buffer}")
        self.cfg, self.seq_len, self.rank, self.world_size = cfg, seq_len, rank, world_size
        self.files = resolve_files(cfg)  # resolved once here, so workers need no listing
        self.epoch = 0
        self._resume: dict[str, Any] | None = None  # loaded state, used by the next __iter__
        self._progress: dict[str, Any] | None = None  # the running iterator's position
        self._tokenizer = tokenizer

    # --- epochs and state ----------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start of a new pass: reshuffles file order and buffer when shuffle_buffer > 0."""
        if epoch != self.epoch:  # a position saved in another epoch does not apply
            self._resume = self._progress = None
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """This process's reader position: where the next block starts."""
        if self._progress is not None:
            return copy.deepcopy(self._progress)
        if self._resume is not None:
            return copy.deepcopy(self._resume)
        return self._state(None, None, 0, None)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise StreamingError(f"streaming state version {state.get('version')!r} is not "
                                 f"{STATE_VERSION}")  # fmt: skip
        for key in ("files", "shuffle_buffer", "seed", "seq_len"):
            mine = self._state(None, None, 0, None)[key]
            if state[key] != mine:
                raise StreamingError(
                    f"state was saved with {key}={state[key]!r}, this dataset has {mine!r}"
                )
        self.epoch = state["epoch"]
        self._resume = copy.deepcopy(state)
        self._progress = None

    def _state(self, reader: int | None, readers: int | None, blocks: int,
               position: dict[str, int] | None) -> dict[str, Any]:  # fmt: skip
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "reader": reader,
            "readers": readers,
            "files": len(self.files),
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "seed": self.cfg.seed,
            "seq_len": self.seq_len,
            "blocks": blocks,  # blocks this reader has yielded this epoch
            "position": position,  # None: the start of the epoch
        }

    # --- the reader ----------------------------------------------------------------------------

    def _reader(self) -> tuple[int, int]:
        """(this process's reader index, number of readers)."""
        info = get_worker_info()
        if info is None:
            return self.rank, self.world_size
        # A forked worker must not reuse the parent's fsspec event loop (remote files hang);
        # `datasets` does the same when it is iterated in a worker itself.
        import fsspec.asyn

        fsspec.asyn.reset_lock()
        return self.rank * info.num_workers + info.id, self.world_size * info.num_workers

    def _work(self, reader: int, readers: int) -> list[_Work]:
        files = self.files
        if self.cfg.shuffle_buffer:  # same permutation on every reader: the split stays exact
            rng = np.random.default_rng([self.cfg.seed, self.epoch])
            files = [files[i] for i in rng.permutation(len(files))]
        return reader_files(files, reader, readers)

    def _records(self, work: list[_Work], reader: int, readers: int, item: int, record: int,
                 stride_base: int) -> Iterator[tuple[_Key, str]]:  # fmt: skip
        """(key, text) of this reader's non-empty records, from (item, record) on, in order."""
        for i in range(item, len(work)):
            w = work[i]
            first = record if i == item else 0
            j = first - 1
            for j, text in enumerate(_texts(w.path, self.cfg.text_field, first), first):
                if w.shared and (stride_base + j) % readers != reader:
                    continue
                if text == "":  # not a document (pile-prep tokenize skips it too)
                    continue
                yield _Key(-1, i, j, stride_base), text
            if w.shared:
                stride_base += j + 1

    def _documents(self, reader: int, readers: int,
                   position: dict[str, int] | None) -> Iterator[tuple[_Key, str]]:  # fmt: skip
        """The reader's document sequence (shuffled if asked), from `position`'s document on."""
        work = self._work(reader, readers)
        p = position or {"doc": 0, "item": 0, "record": 0, "stride_base": 0}
        if self.cfg.shuffle_buffer:
            # The buffer is not saved: replay from the start, skipping `doc` documents untokenized.
            rng = np.random.default_rng([self.cfg.seed, self.epoch, reader])
            records = _shuffled(self._records(work, reader, readers, 0, 0, 0),
                                self.cfg.shuffle_buffer, rng)  # fmt: skip
            for n, (key, text) in enumerate(records):
                if n >= p["doc"]:
                    yield key._replace(doc=n), text
        else:  # start reading at the document itself
            records = self._records(work, reader, readers, p["item"], p["record"], p["stride_base"])
            for n, (key, text) in enumerate(records, p["doc"]):
                yield key._replace(doc=n), text

    def iter_documents(self) -> Iterator[Document]:
        """This process's reader's documents from the start of the epoch, tokenized (no blocks)."""
        reader, readers = self._reader()
        tok = self._load_tokenizer()
        work = self._work(reader, readers)
        for key, text in self._documents(reader, readers, None):
            yield Document(work[key.item].path, key.record,
                           document_tokens(tok.encode_pieces(text), tok.eos_id))  # fmt: skip

    def _load_tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:  # once per process: workers load their own
            self._tokenizer = load_tokenizer(self.cfg.tokenizer)
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokenizer"] = None  # workers load their own instead of unpickling one
        return state

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        reader, readers = self._reader()
        resume, self._resume = self._resume, None
        blocks, position = 0, None
        if resume is not None and resume["position"] is not None:
            if (resume["reader"], resume["readers"]) != (reader, readers):
                raise StreamingError(
                    f"state of reader {resume['reader']} of {resume['readers']} loaded into reader "
                    f"{reader} of {readers}: resume with the same world_size and num_workers"
                )
            blocks, position = resume["blocks"], resume["position"]
        self._progress = self._state(reader, readers, blocks, position)
        tok = self._load_tokenizer()
        packer: BlockPacker[_Key] = BlockPacker(self.seq_len)
        skip = position["offset"] if position is not None else 0
        for key, text in self._documents(reader, readers, position):
            pieces = document_tokens(tok.encode_pieces(text), tok.eos_id)
            if skip:  # the first document: its first `offset` tokens were in earlier blocks
                pieces = [np.concatenate(pieces)[skip:]]
                skip = 0
            for piece in pieces:
                for block, (nxt, offset) in packer.push(piece, key):
                    blocks += 1
                    self._progress = self._state(reader, readers, blocks, {
                        "doc": nxt.doc, "item": nxt.item, "record": nxt.record,
                        "stride_base": nxt.stride_base, "offset": offset,
                    })  # fmt: skip
                    t = torch.from_numpy(block)  # [S+1]
                    yield {"input_ids": t[:-1], "labels": t[1:]}
        # The last partial block (< S+1 tokens of this reader's stream) is dropped.


def make_streaming_loader(
    cfg: StreamingConfig,
    seq_len: int,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int = 0,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
    tokenizer: Tokenizer | None = None,
) -> StatefulDataLoader:
    """A resumable loader of [batch_size, seq_len] batches: `torchdata`'s StatefulDataLoader.

    Save `loader.state_dict()` in the checkpoint; after `loader.load_state_dict(sd)` on a loader
    built with the same arguments, iteration continues with the next unseen batch. Each worker
    batches its own blocks; batches come from workers in turn.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset = StreamingTokenDataset(cfg, seq_len, rank, world_size, tokenizer)
    message = amplification_warning(len(dataset.files), world_size, num_workers)
    if message is not None and rank == 0:  # once per job, not once per rank
        warnings.warn(message, StreamingWarning, stacklevel=2)
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, which torch now deprecates: nothing the user can act on.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
            pin_memory=pin_memory,
        )
