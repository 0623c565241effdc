"""`pile-prep tokenize`: read documents -> tokenize -> write shards, in parallel and resumable."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pile_prep import pipeline
from pile_prep.inputs import InputError, expand_inputs, input_identity
from pile_prep.pipeline import FIELD_HINT, Settings, WorkerDied, no_field
from pile_prep.shards import (
    FORMAT,
    FORMAT_VERSION,
    JOB,
    MANIFEST,
    OutputError,
    is_temp,
    read_json,
    write_json,
)
from pile_prep.tasks import task_shares
from pile_prep.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

DEFAULT_SHARD_BYTES = 64 << 20  # of input text: ~16M tokens, a 64 MB .bin per shard
_MANIFEST_BAD_LINES = 1000


class TokenizeError(Exception):
    """An expected failure (bad input, refused output dir): reported without a traceback."""


@dataclass
class TokenizeOptions:
    inputs: list[str]  # files, directories (the files directly inside) or globs
    output: Path
    workers: int = 0  # 0: all usable cores
    tokenizer: str = DEFAULT_TOKENIZER  # "qwen2.5" or a path to HF tokenizer files
    text_field: str = "text"
    shard_bytes: int = DEFAULT_SHARD_BYTES  # input bytes per shard (part of the output's identity)
    skip_bad_lines: bool = False
    overwrite: bool = False
    num_tasks: int = 1  # split the work across machines (e.g. a Slurm array): pile_prep/tasks.py
    task_index: int = 0
    progress: bool = True
    recursive: bool = False  # directories: also the files in their subdirectories


@dataclass
class TokenizeSummary:
    manifest: dict[str, Any]
    shards_resumed: int  # shards found complete and not redone
    seconds: float
    tokens_this_run: int
    bytes_this_run: int  # input bytes read by shards made in this run
    peak_worker_mb: float = 0.0  # a worker's peak memory beyond the main process's pages it shares
    warnings: list[str] = field(default_factory=list)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- main side ---------------------------------------------------------------------------------


def _job(opts: TokenizeOptions, inputs: list[Path], tokenizer) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "name": tokenizer.name,
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        },
        "text_field": opts.text_field,
        "shard_bytes": opts.shard_bytes,
        "task": {"index": opts.task_index, "count": opts.num_tasks},
        "inputs": [input_identity(p) for p in inputs],
    }


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in new:
        if key == "inputs" and old.get(key) != new[key]:
            old_in = {i["path"]: i for i in old.get("inputs", [])}
            new_in = {i["path"]: i for i in new["inputs"]}
            for p in new_in.keys() - old_in.keys():
                diffs.append(f"new input {p}")
            for p in old_in.keys() - new_in.keys():
                diffs.append(f"input {p} no longer given")
            for p in new_in.keys() & old_in.keys():
                was, now = old_in[p], new_in[p]
                if was["size"] != now["size"]:
                    diffs.append(f"input {p} changed size ({was['size']} -> {now['size']} bytes)")
                elif "head_tail" not in was:
                    diffs.append(f"input {p} recorded by an older pile-prep (no content hash)")
                elif was["head_tail"] != now["head_tail"]:
                    diffs.append(f"input {p} changed (its first or last MiB differ)")
            if not diffs:
                diffs.append("inputs given in a different order")
        elif key == "tokenizer" and old.get(key, {}).get("fingerprint") != new[key]["fingerprint"]:
            was = old.get(key, {})
            diffs.append(f"tokenizer {was.get('name')} ({was.get('fingerprint')}) -> "
                         f"{new[key]['name']} ({new[key]['fingerprint']})")  # fmt: skip
        elif key == "format_version" and old.get(key) != new[key]:
            diffs.append(f"written by another pile-prep (format version {old.get(key)}, this one "
                         f"writes {new[key]})")  # fmt: skip
        elif key not in ("inputs", "tokenizer") and old.get(key) != new[key]:
            diffs.append(f"{key}: {old.get(key)!r} -> {new[key]!r}")
    return diffs


def _remove_stale_shards(output: Path, names: set[str]) -> None:
    """Shard files of chunks that no longer exist (an input edited in place now cuts fewer)."""
    for p in output.glob("shard-*"):
        if not is_temp(p.name) and p.name.split(".")[0] not in names:
            p.unlink()


def _is_ours(path: Path) -> bool:
    n = path.name
    return n in (MANIFEST, JOB) or n.startswith("shard-") or is_temp(n)


def _lock(output: Path) -> int:
    """Lock `output` for this run (released when the fd closes, or the process dies).

    With the lock held no other run writes here, so every temp file found is debris of a dead
    run (a killed worker's half-written `.bin.tmp-PID`), safe to delete.
    """
    if output.exists() and not output.is_dir():
        raise TokenizeError(f"--output {output} is a file, not a directory")
    try:
        output.mkdir(parents=True, exist_ok=True)
        fd = os.open(output, os.O_RDONLY)
    except OSError as e:
        raise TokenizeError(f"cannot use {output} as the output directory: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TokenizeError(f"{output}: another pile-prep tokenize is writing to it") from None
    except OSError:
        pass  # a file system without flock (some Lustre mounts): run one job per directory
    return fd


def _prepare_output(output: Path, job: dict, overwrite: bool) -> None:
    """Resume `output` if it holds this job, else start it (refusing others' work unless told)."""
    job_path = output / JOB
    if job_path.exists() and not overwrite:
        diffs = _differences(read_json(job_path), job)
        if not diffs:
            for p in output.iterdir():
                if is_temp(p.name):
                    p.unlink()
            return
        raise TokenizeError(
            f"{output} holds a tokenization of different inputs ({'; '.join(diffs)}). "
            "Use another --output, or --overwrite to delete it and start again."
        )
    foreign = [p.name for p in output.iterdir() if not _is_ours(p)]
    if foreign and not job_path.exists():  # never write into a directory of something else
        raise TokenizeError(
            f"{output} is not empty and is not a pile-prep output (holds {foreign[0]!r}); "
            "choose an empty or new --output"
        )
    for p in output.iterdir():
        if _is_ours(p):
            p.unlink()
    write_json(job_path, job)


def _manifest(job: dict, records: list[dict]) -> dict[str, Any]:
    sources: dict[str, dict[str, int]] = {}
    bad_lines: list[dict] = []
    for r in records:
        for s in r["sources"]:
            t = sources.setdefault(s["name"], {"tokens": 0, "documents": 0})
            t["tokens"] += s["tokens"]
            t["documents"] += s["documents"]
        bad_lines += r["bad_lines"][: _MANIFEST_BAD_LINES - len(bad_lines)]
    totals = {
        "shards": len(records),
        "tokens": sum(r["tokens"] for r in records),
        "documents": sum(r["documents"] for r in records),
        "skipped_empty": sum(1 for r in records for _, why in r["skipped_lines"] if why == "empty"),
        "blank_lines": sum(1 for r in records for _, why in r["skipped_lines"] if why == "blank"),
        "bad_lines": sum(1 for r in records for _, why in r["skipped_lines"] if why == "bad"),
    }
    return {
        **{k: v for k, v in job.items() if k != "inputs"},
        "dtype": "uint32",
        "byteorder": "little",
        "inputs": job["inputs"],
        "totals": totals,
        "sources": dict(sorted(sources.items())),
        "bad_lines": bad_lines,
        "shards": records,
    }


def _refuse_all_bad(manifest: dict[str, Any], text_field: str) -> None:
    """A run in which every line was bad made no dataset: an error, and no manifest. (An input
    that breaks before its first line is not a bad line of it: it counts as bad, at
    `last_line + 1`, and an empty dataset from it is what --skip-bad-lines asked for.)"""
    t = manifest["totals"]
    breaks = sum(1 for r in manifest["shards"] for line, why in r["skipped_lines"]
                 if why == "bad" and line == r["last_line"] + 1)  # fmt: skip
    if t["bad_lines"] == breaks or t["documents"] or t["skipped_empty"]:
        return
    first = next((b for b in manifest["bad_lines"] if not b["reason"].startswith("corrupt")),
                 manifest["bad_lines"][0])
    hint = "fix the input, or give other inputs"
    if no_field(first["reason"], text_field):
        hint = f"{FIELD_HINT} (and --overwrite, or another --output)"
    raise TokenizeError(
        f"every line was bad ({t['bad_lines']:,} bad lines; the first: {first['file']}, line "
        f"{first['line']}: {first['reason']}); no dataset is written: {hint}"
    )


def tokenize(opts: TokenizeOptions) -> TokenizeSummary:
    """Tokenize `opts.inputs` into shards under `opts.output`; resumes a previous partial run."""
    if not 0 <= opts.task_index < opts.num_tasks:
        raise TokenizeError(f"--task-index {opts.task_index} is not in [0, {opts.num_tasks})")
    if opts.shard_bytes < 1:
        raise TokenizeError("shard size must be positive")
    start = time.perf_counter()
    try:
        inputs = expand_inputs(opts.inputs, opts.recursive)
    except InputError as e:
        raise TokenizeError(str(e)) from e
    tokenizer = load_tokenizer(opts.tokenizer)
    job = _job(opts, inputs, tokenizer)
    output = Path(opts.output)
    lock = _lock(output)
    try:
        try:
            _prepare_output(output, job, opts.overwrite)
        except OSError as e:  # (an OutputError names the file it could not write)
            raise TokenizeError(f"cannot use {output} as the output directory: {e.strerror}") from None
        if (output / MANIFEST).exists():  # same job, already complete
            manifest = read_json(output / MANIFEST)
            return TokenizeSummary(manifest, manifest["totals"]["shards"],
                                   time.perf_counter() - start, 0, 0)  # fmt: skip
        return _run(opts, inputs, job, output, tokenizer, start)
    except OutputError as e:
        raise TokenizeError(f"{e}; {_kept(output)}") from None
    finally:
        os.close(lock)


def _finished(output: Path) -> int:
    return sum(1 for _ in output.glob("shard-*.json"))


def _kept(output: Path) -> str:
    return (f"{_finished(output)} finished shards are kept in {output}: fix the cause (free space?) and rerun "
            "the same command to resume")  # fmt: skip


def _run(opts: TokenizeOptions, inputs: list[Path], job: dict, output: Path, tokenizer, start: float):
    workers = opts.workers or usable_cores()
    records: dict[str, dict] = {}
    resumed = tokens_run = bytes_run = 0
    rss = 0.0
    shares = task_shares(len(inputs), opts.num_tasks, opts.task_index)
    total_bytes = sum(job["inputs"][i]["size"] for i in shares)
    last_progress: dict[int, int] = {}

    def advance(input_index: int, end: int, tokens: int, text_bytes: int) -> None:
        nonlocal tokens_run, bytes_run
        # Progress in input-file bytes (compressed for .zst/.gz); Parquet advances per file.
        # (Chunks of one input finish out of order: the bar takes the furthest.)
        prev = last_progress.get(input_index, 0)
        if end and end > prev:
            bar.update(end - prev)
            last_progress[input_index] = end
        tokens_run += tokens
        bytes_run += text_bytes
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"{tokens_run / elapsed / 1e6:.2f} Mtok/s", refresh=False)

    failure: BaseException | None = None
    settings = Settings(output, opts.text_field, opts.shard_bytes, opts.skip_bad_lines)
    # The processes fork before the bar starts its monitor thread.
    with pipeline.started(settings, tokenizer, shares, inputs, workers) as messages, tqdm(
        total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
        disable=not opts.progress, desc="tokenize", file=sys.stderr,
    ) as bar:  # fmt: skip
        for message in messages:
            kind = message[0]
            if kind == "record":
                records[message[1]["name"]] = message[1]
                resumed += message[2]
            elif kind == "progress":
                advance(*message[1:])
            elif kind == "rss":
                rss = max(rss, message[1])
            else:  # "failed": the others stop after their current shard
                failure = message[1]
    if failure is not None:
        if isinstance(failure, InputError):
            if failure.hint is not None:
                raise TokenizeError(f"{failure}\nThe input's first line has no such key: "
                                    f"{failure.hint} (and --overwrite, or another --output)") from failure  # fmt: skip
            raise TokenizeError(
                f"{failure}\n{_finished(output)} finished shards are kept in {output}: rerun the same "
                "command to resume, with --skip-bad-lines to skip such lines"
            ) from failure
        if isinstance(failure, WorkerDied):
            raise TokenizeError(f"a worker process died (killed, or out of memory?); "
                                f"{_kept(output)}") from None  # fmt: skip
        raise failure

    _remove_stale_shards(output, set(records))
    manifest = _manifest(job, [records[k] for k in sorted(records)])
    _refuse_all_bad(manifest, opts.text_field)
    write_json(output / MANIFEST, manifest)
    return TokenizeSummary(
        manifest=manifest,
        shards_resumed=resumed,
        seconds=time.perf_counter() - start,
        tokens_this_run=tokens_run,
        bytes_this_run=bytes_run,
        peak_worker_mb=rss,
    )
