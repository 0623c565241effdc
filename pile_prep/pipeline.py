"""How `pile-prep tokenize` spreads its work: each input decompressed once, chunks to free workers.

R reader processes (R = min(this task's inputs, W); reader r takes inputs r, r + R, ...)
decompress and cut their inputs into chunks (pile_prep/inputs.py) and put each chunk of the
task's share that is not already done into one bounded queue; W tokenizer workers each take
the next chunk, whichever input it comes from, and write its shard. Chunk bytes go from a
reader to a worker through the queue's pipe, never through the main process, which collects
records and progress. Readers and workers are forked from the main process, so a worker starts
with the tokenizer already loaded (a spawned one would spend ~0.5 s of CPU importing and loading
the vocabulary). A shard depends only on its chunk, so the output is the same for any W,
R or order of work (docs/FORMAT.md).

Memory: at most Q = W chunks wait in the queue; each reader holds one chunk being cut and one
being handed over, each worker one being tokenized: at most (Q + 2R + W) x shard_bytes of input
text, <= 4W x shard_bytes (64 MiB shards: 256 MiB per worker).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pile_prep.inputs import Chunk, InputError, chunk_checksum, input_chunks, iter_records
from pile_prep.shards import MAX_BAD_LINES_LISTED, ShardWriter, shard_is_done, shard_name
from pile_prep.tasks import Share

_POLL_S = 0.1  # how often a blocked reader or an idle worker looks at the stop flag
FIELD_HINT = "if the text is under another key, name it with --text-field"


class WorkerDied(Exception):
    """A reader or worker process ended without a word (killed, or out of memory)."""


@dataclass(frozen=True)
class Settings:
    """What readers and workers need of TokenizeOptions."""

    output: Path
    text_field: str
    shard_bytes: int
    skip_bad_lines: bool


def reader_inputs(shares: dict[int, Share], inputs: list[Path], workers: int) -> list[list[tuple[int, Path, Share]]]:
    """Each reader's (input index, path, share)s: R = min(inputs, workers), dealt round-robin."""
    items = [(i, inputs[i], s) for i, s in shares.items()]
    readers = max(1, min(len(items), workers))
    return [items[r::readers] for r in range(readers)]


@contextlib.contextmanager
def started(settings: Settings, tok, shares: dict[int, Share], inputs: list[Path], workers: int):
    """Fork readers and workers (each worker inherits `tok`: no import or tokenizer load per
    process); yield an iterator of their messages in the order they come:
    ("record", record, resumed), ("progress", input, end, tokens, text bytes), ("rss", MiB: a
    worker's peak resident memory beyond what it shared with the main process when forked),
    and at most one ("failed", exception) (after which everything stops after its current shard).
    Enter it before starting any Python thread (a progress bar's monitor): the children run only
    this module's code, so no lock of another thread can be held in them (numpy's idle BLAS
    threads handle fork themselves). Fork: Linux and macOS. On leaving, every process has ended.
    """
    ctx = multiprocessing.get_context("fork")
    # Only readers put on `work` and only workers on `results`: the main process runs no queue
    # feeder thread, which at exit could race it and leave a semaphore to the resource tracker.
    work, results, stop, read = ctx.Queue(max(1, workers)), ctx.Queue(), ctx.Event(), ctx.Event()
    parent = os.getpid()
    readers = [ctx.Process(target=_reader, args=(job, settings, work, results, stop, parent), daemon=True)
               for job in reader_inputs(shares, inputs, workers)]  # fmt: skip
    tokenizers = [ctx.Process(target=_worker, args=(settings, tok, work, results, stop, read, parent), daemon=True)
                  for _ in range(workers)]  # fmt: skip
    forked: list = []
    try:
        with warnings.catch_warnings():  # Python >= 3.12 warns of any thread, BLAS's included
            warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
            for p in readers + tokenizers:
                p.start()
                forked.append(p)
        yield _messages(readers, tokenizers, results, stop, read)
    except BaseException:
        stop.set()
        for p in forked:
            p.terminate()
        raise
    finally:
        if stop.is_set():
            for p in forked[: len(readers)]:  # readers (a reader writes nothing a rerun needs)
                p.join(timeout=1)
                if p.is_alive():
                    p.terminate()
        for p in forked:
            p.join(timeout=60)


def _messages(readers, tokenizers, results, stop, read) -> Iterator[tuple]:
    processes = readers + tokenizers
    reading, running, failed = len(readers), len(tokenizers), False
    queued = made = 0  # chunks readers queued, shards workers made
    while reading or running:
        try:
            message = results.get(timeout=0.2)
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead and not failed:  # (a process that failed has said so first)
                failed = True
                stop.set()
                yield ("failed", WorkerDied(f"exit code {dead[0].exitcode}"))
            if failed and all(t.exitcode is not None for t in tokenizers):
                break  # no worker left (one was killed?): a reader may wait on chunks nobody takes
            continue
        kind = message[0]
        if kind == "reader done":
            reading -= 1
            queued += message[1]
            if reading == 0:  # every chunk is in the queue's pipe: workers end when it is empty
                read.set()
        elif kind == "worker done":
            running -= 1
            yield ("rss", message[1])
            if failed and not running:  # a reader may wait on chunks nobody will take
                break
        elif kind == "failed":
            if not failed:
                failed = True
                yield message
        else:
            made += kind == "record" and not message[2]
            yield message
    if not failed and made != queued:  # never a silent gap: a lost chunk fails the run
        yield ("failed", WorkerDied(f"{queued} chunks were queued but {made} shards made"))


def _reader(job, settings: Settings, work, results, stop, parent: int) -> None:
    _die_with(parent)
    queued = 0
    try:
        for input_index, path, share in job:
            for chunk in input_chunks(input_index, path, settings.shard_bytes, settings.text_field):
                if stop.is_set():
                    break
                if not share.takes(chunk.chunk_index):
                    continue
                if chunk.error is not None and not settings.skip_bad_lines:
                    raise InputError(chunk.path, chunk.last_line + 1, chunk.error)
                name = shard_name(chunk.input_index, chunk.chunk_index)
                done = shard_is_done(settings.output, name)
                if done is not None and same_input(done, chunk):
                    results.put(("record", done, True))
                    results.put(("progress", chunk.input_index, chunk.progress, 0, 0))
                    continue
                if done is not None:  # a record of other input bytes is stale: redo the shard
                    (settings.output / f"{name}.json").unlink()
                while not _put(work, chunk):
                    if stop.is_set():
                        break
                else:
                    queued += 1
            if stop.is_set():
                break
    except BaseException as e:  # noqa: BLE001 (the main process raises it)
        stop.set()
        results.put(("failed", e))
    finally:
        if stop.is_set():
            work.cancel_join_thread()  # what is still buffered will not be taken: do not wait
        else:
            # Every chunk put is in the pipe before "done" (a queue's put only buffers): once all
            # readers are done, an empty pipe means no chunk is left.
            work.close()
            work.join_thread()
        results.put(("reader done", queued))


def _put(work, chunk: Chunk) -> bool:
    try:
        work.put(chunk, timeout=_POLL_S)
        return True
    except queue.Full:
        return False


def _worker(settings: Settings, tok, work, results, stop, read, parent: int) -> None:
    _die_with(parent)
    forked = resident_mb("VmRSS")  # the main process's pages, shared until written
    try:
        while not stop.is_set():  # another process failed: stop between shards
            try:
                chunk = work.get(timeout=_POLL_S)
            except queue.Empty:  # (or another worker held the queue's lock)
                if read.is_set() and work.empty():
                    break
                continue
            record = tokenize_chunk(tok, chunk, settings.output, settings.text_field, settings.skip_bad_lines)
            results.put(("record", record, False))
            text_bytes = len(chunk.lines) if chunk.rows is None and record["tokens"] else 0
            results.put(("progress", chunk.input_index, chunk.progress, record["tokens"], text_bytes))
    except BaseException as e:  # noqa: BLE001
        stop.set()
        results.put(("failed", e))
    finally:
        results.put(("worker done", resident_mb("VmHWM") - forked))


def _die_with(parent: int) -> None:
    """Exit when the main process dies (kill -9 included): no orphan keeps running."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def same_input(record: dict, chunk: Chunk) -> bool:
    """Whether a finished shard was made from exactly this chunk's lines and bytes."""
    span = (chunk.first_line, chunk.last_line)
    if (record["first_line"], record["last_line"]) != span:
        return False
    return record.get("input_checksum") == chunk_checksum(chunk)


def no_field(reason: str, text_field: str) -> bool:
    return reason.startswith(f"no {text_field!r} field")


def tokenize_chunk(tok, chunk: Chunk, output: Path, text_field: str, skip_bad: bool) -> dict:
    """Write the shard of one chunk; its record."""
    writer = ShardWriter(output, shard_name(chunk.input_index, chunk.chunk_index))
    skipped: list[list] = []
    bad: list[dict] = []
    first = chunk.chunk_index == 0  # no record of the input seen yet
    try:  # any failure: abort, so that no temp file of this shard stays
        for rec in iter_records(chunk, text_field):
            if rec.blank:
                skipped.append([rec.line, "blank"])
                continue
            if rec.error is not None:
                if not skip_bad:
                    hint = FIELD_HINT if first and no_field(rec.error, text_field) else None
                    raise InputError(chunk.path, rec.line, rec.error, hint)
                skipped.append([rec.line, "bad"])
                bad.append({"file": chunk.path, "line": rec.line, "reason": rec.error})
                continue
            first = False
            if rec.text == "":
                skipped.append([rec.line, "empty"])
                continue
            for piece in tok.encode_pieces(rec.text):
                writer.write_tokens(piece)
            writer.end_document(tok.eos_id, rec.source)
        if chunk.error is not None:
            skipped.append([chunk.last_line + 1, "bad"])
            bad.append({"file": chunk.path, "line": chunk.last_line + 1, "reason": chunk.error})
    except BaseException:
        writer.abort()
        raise
    return writer.commit(
        {
            "input": chunk.input_index,
            "chunk": chunk.chunk_index,
            "first_line": chunk.first_line,
            "last_line": chunk.last_line,
            "input_checksum": chunk_checksum(chunk),
            "skipped_lines": skipped,
            "bad_lines": bad[:MAX_BAD_LINES_LISTED],
        }
    )


def resident_mb(key: str) -> float:
    """This process's resident memory from /proc/self/status: "VmRSS" now, "VmHWM" its peak
    (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
