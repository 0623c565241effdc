"""How busy `pile-prep tokenize`'s scheduler keeps 64 and 128 workers (pile_prep/pipeline.py).

The real scheduling code (`pipeline.started`: readers, the bounded chunk queue, workers writing real
shards) runs with a stand-in tokenizer of known cost that burns no CPU: it sleeps
`--us-per-byte` per byte of text and emits one id per 4 bytes. So a 2-core machine can host 128
workers, and the measure is the scheduler's, not the cores'. Cases: 30 equal files (The Pile's
train split) and 1 file (val/test), cut into 15 W chunks in all (15 waves: a perfect scheduler
has no partial last wave).

Efficiency = time the workers spent tokenizing / (W x the time from each worker's first chunk
to the end of the run): 1.0 means no worker was idle once started (no idle waves, no waiting
for a reader); the second figure counts from the first chunk anywhere, so it includes the
workers' start-up (forked: milliseconds each). Also printed: the main process's
CPU per chunk (and so per GB at 64 MiB shards), and a reader's work per GB (decompress, cut and hash: `input_chunks` over
the same files, timed in this process).

With --cpu-ratio MB it instead measures, with the real tokenizer on real text (bench_tokenize.py's
corpus), the total CPU (user + sys of all processes) of `pile-prep tokenize --workers 8` over
`--workers 1` (and of `--workers 2`, one per core here, where 8 workers share 2 cores), on one
input of MB and on 3 inputs of MB/3: reading each input once, the ratio stays near 1 (the workers are forked with the tokenizer loaded: no per-worker start-up to pay).

    python benchmarks/bench_pipeline.py [--workers 64 128] [--us-per-byte 100]
    python benchmarks/bench_pipeline.py --cpu-ratio 64 [--shard-mb 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

import pile_prep.pipeline as pipeline
from pile_prep.inputs import chunk_checksum, input_chunks
from pile_prep.tasks import task_shares



class SleepTokenizer:
    """Costs `s_per_byte` of wall time per byte of text, no CPU; one id per 4 bytes."""

    name, eos_id, vocab_size, fingerprint = "sleep", 1, 2, "sleep"

    def __init__(self, s_per_byte: float, log: Path):
        self.s_per_byte, self.log = s_per_byte, log

    def encode_pieces(self, text: str):
        n = len(text.encode())
        start = time.time()
        time.sleep(n * self.s_per_byte)
        with open(self.log / f"{os.getpid()}.log", "a") as f:  # one file per (forked) worker
            f.write(f"{start} {time.time()}\n")
        yield np.zeros(max(1, n // 4), np.uint32)


def write_files(directory: Path, files: int, chunks: int, chunk_bytes: int) -> list[Path]:
    """`files` .jsonl.zst files of `chunks` chunks each (documents of ~2 kB)."""
    line = json.dumps({"text": "x" * 2000, "meta": {"pile_set_name": "bench"}})
    per_chunk = -(-chunk_bytes // (len(line) + 1))  # a chunk ends at the first line end past chunk_bytes
    paths = []
    for f in range(files):
        text = "\n".join([line] * per_chunk * chunks) + "\n"
        path = directory / f"{f:02d}.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor(level=1).compress(text.encode()))
        paths.append(path)
    return paths


def efficiency(log: Path, workers: int, end: float) -> tuple[float, float]:
    """(busy / (W x (end - each worker's first start)), busy / (W x (end - first start)))."""
    busy, firsts = 0.0, []
    for f in log.glob("*.log"):
        spans = np.loadtxt(f, ndmin=2)
        busy += float((spans[:, 1] - spans[:, 0]).sum())
        firsts.append(spans[:, 0].min())
    firsts += [end] * (workers - len(firsts))  # a worker that never got a chunk: idle all along
    started = sum(end - t for t in firsts)
    return busy / started, busy / (workers * (end - min(firsts)))


def one_case(root: Path, files: int, workers: int, chunk_bytes: int, s_per_byte: float) -> dict:
    case = root / f"f{files}-w{workers}"
    (case / "in").mkdir(parents=True)
    (case / "log").mkdir()
    chunks = -(-15 * workers // files)  # per file: 15 waves of W chunks in all
    inputs = write_files(case / "in", files, chunks, chunk_bytes)
    settings = pipeline.Settings(case / "out", "text", chunk_bytes, False)
    (case / "out").mkdir()
    shares = task_shares(len(inputs), 1, 0)
    tok = SleepTokenizer(s_per_byte, case / "log")
    cpu0, n = time.process_time(), 0
    with pipeline.started(settings, tok, shares, inputs, workers) as messages:
        for message in messages:
            if message[0] == "failed":
                raise message[1]
            n += message[0] == "record"
    end = time.time()
    main_cpu = time.process_time() - cpu0
    text_bytes = sum(len(c.lines) for p in inputs[:1] for c in input_chunks(0, p, chunk_bytes, "text")) * files
    per_worker, overall = efficiency(case / "log", workers, end)
    return {"files": files, "workers": workers, "shards": n, "text_gb": text_bytes / 1e9,
            "efficiency": per_worker, "span_efficiency": overall, "main_cpu_s_per_chunk": main_cpu / n}


def reader_cpu_per_gb(directory: Path, chunk_bytes: int) -> float:
    paths = sorted(directory.glob("f30-*/in/*.jsonl.zst"))[:4]
    t0, n = time.process_time(), 0
    for p in paths:
        for c in input_chunks(0, p, chunk_bytes, "text"):
            chunk_checksum(c)
            n += len(c.lines)
    return (time.process_time() - t0) / (n / 1e9)


def _tokenize_cpu(inputs: list[Path], out: Path, workers: int, shard_mb: float) -> float:
    import subprocess
    import sys

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "pile_prep.cli", "tokenize", *map(str, inputs), "-o", str(out), "-q",
                    "-j", str(workers), "--shard-mb", str(shard_mb), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def cpu_ratio(mb: float, shard_mb: float, repeats: int) -> None:
    from bench_tokenize import real_documents, write_corpus

    root = Path(tempfile.mkdtemp(prefix="bench_pipeline_cpu-"))
    docs = real_documents(int(mb * 1e6))
    for files in (1, 3):
        (root / f"in{files}").mkdir()
        inputs = write_corpus(docs, root / f"in{files}", files=files)
        cpu: dict[int, list[float]] = {1: [], 2: [], 8: []}
        for _ in range(repeats):  # interleaved, so that drifts in the machine's speed hit both
            for w in cpu:
                cpu[w].append(_tokenize_cpu(inputs, root / f"out{files}-{w}", w, shard_mb))
        names = [sorted(p.name for p in (root / f"out{files}-{w}").glob("shard-*")) for w in (1, 8)]
        same = names[0] == names[1] and all((root / f"out{files}-1" / n).read_bytes() ==
                                            (root / f"out{files}-8" / n).read_bytes() for n in names[0])  # fmt: skip
        one, two, eight = (float(np.median(cpu[w])) for w in (1, 2, 8))
        print(f"{files} input(s), {mb:.0f} MB, --shard-mb {shard_mb}: CPU (median of {repeats}) --workers 1 "
              f"{one:.1f} s, 2 {two:.1f} s, 8 {eight:.1f} s: ratio 8 / 1 {eight / one:.3f} (target <= 1.10), "
              f"2 / 1 {two / one:.3f}; identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--us-per-byte", type=float, default=100.0, help="stand-in cost per byte of text")
    parser.add_argument("--chunk-kb", type=int, default=16, help="shard size (input text per chunk)")
    parser.add_argument("--cpu-ratio", type=float, default=0, metavar="MB",
                        help="measure CPU of --workers 8 / 1 with the real tokenizer instead")
    parser.add_argument("--shard-mb", type=float, default=8, help="--cpu-ratio: shard size")
    parser.add_argument("--repeats", type=int, default=3, help="--cpu-ratio: runs of each, median taken")
    args = parser.parse_args()
    if args.cpu_ratio:
        cpu_ratio(args.cpu_ratio, args.shard_mb, args.repeats)
        return
    root = Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    chunk_bytes = args.chunk_kb << 10
    print(f"stand-in: {args.us_per_byte} us per byte ({args.us_per_byte * chunk_bytes / 1e6:.2f} s per "
          f"{args.chunk_kb} kB chunk); 15 waves of W chunks per case")
    rows = []
    for workers in args.workers:
        for files in (30, 1):
            r = one_case(root, files, workers, chunk_bytes, args.us_per_byte * 1e-6)
            rows.append(r)
            print(f"{files:2d} files, {workers:3d} workers: {r['shards']} shards, efficiency {r['efficiency']:.3f} "
                  f"(from each worker's first chunk; from the first chunk anywhere {r['span_efficiency']:.3f}); "
                  f"main process {r['main_cpu_s_per_chunk'] * 1e3:.2f} ms CPU per chunk "
                  f"({r['main_cpu_s_per_chunk'] * (1e9 / (64 << 20)):.3f} s per GB at 64 MiB shards)")
    print(f"reader work (decompress, cut, hash; 1 process): {reader_cpu_per_gb(root, chunk_bytes):.2f} s CPU per GB")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"all readers and workers: {children.ru_utime + children.ru_stime:.1f} s CPU (start-up included)")
    print("\n| case | efficiency |")
    print("|---|---|")
    for r in rows:
        print(f"| {r['files']} file(s), {r['workers']} workers | {r['efficiency']:.2f} |")


if __name__ == "__main__":
    main()
