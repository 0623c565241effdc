"""`pile-prep tokenize` as a whole process against a plain script, and what the main process costs.

On the same real-text corpus (see bench_tokenize.py), in one run:
  (p) a plain single-process script: read the .jsonl.zst files, parse each line's JSON, NFC,
      tiktoken `encode_to_numpy` (no writing), as a subprocess;
  (t) `pile-prep tokenize --workers 1 -q` as a subprocess (main process + its one worker).
Both timed whole process against whole process: wall and CPU (user + sys of the process tree),
start-up included. Target: (p) / (t) wall >= 0.9.
Also: the main process's CPU per GB of text beyond its start-up (readers decompress and cut the
inputs, so the main process does not bound reading), and the peak RSS of the main process and a
worker's peak memory beyond the pages it shares with it, at 2 workers, and how the time to cut one huge line grows with its length.

    python benchmarks/bench_tokenize_process.py [--mb 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_tokenize import real_documents, write_corpus

PLAIN = """
import io, json, sys, zstandard
from pile_prep.tokenizer import QWEN_PATTERN, nfc, qwen_ranks
import tiktoken
enc = tiktoken.Encoding("q", pat_str=QWEN_PATTERN, mergeable_ranks=qwen_ranks(), special_tokens={})
n = 0
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f), 1 << 20):
            if line.strip():
                text = nfc(json.loads(line)["text"])  # (skips NFC-normalised text)
                n += len(enc.encode_to_numpy(text, disallowed_special=()))
print(n)
"""

# The CLI in a process that reports its own peak RSS (VmHWM) when it ends.
CLI_WITH_RSS = """
import sys
from pile_prep.cli import main
import resource
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("main peak RSS MiB", int(line.split()[1]) / 1024)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("main CPU s", usage.ru_utime + usage.ru_stime)
"""


def timed(args: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the process and its descendants, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=64, help="MB of text")
    parser.add_argument("--repeats", type=int, default=2, help="best of N (this machine is noisy)")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--huge-mb", type=float, default=300, help="MB of the one-line input")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_tokenize_process-"))
    work.mkdir(parents=True, exist_ok=True)
    docs = real_documents(int(args.mb * 1e6))
    gb = sum(len(t.encode()) for t, _ in docs) / 1e9
    inputs = [str(p) for p in write_corpus(docs, work, files=3)]
    del docs
    print(f"corpus: {gb * 1e3:.0f} MB of text in {len(inputs)} .jsonl.zst files; best of {args.repeats}")

    best: dict[str, tuple[float, float]] = {}
    tokens = {}
    for _ in range(args.repeats):  # interleaved, so that a slow phase of the machine hits both
        wall, cpu, out = timed([sys.executable, "-c", PLAIN, *inputs])
        tokens["p"] = int(out.split()[-1])
        best["p"] = min(best.get("p", (1e9, 1e9)), (wall, cpu))
        cli = [sys.executable, "-m", "pile_prep.cli", "tokenize", *inputs, "-q", "--overwrite"]
        wall, cpu, out = timed([*cli, "-j", "1", "-o", str(work / "out-1")])
        words = out.split()
        tokens["t"] = int(words[0].replace(",", "")) - int(words[2].replace(",", ""))  # less EOS
        best["t"] = min(best.get("t", (1e9, 1e9)), (wall, cpu))
    (pw, pc), (tw, tc) = best["p"], best["t"]
    assert tokens["p"] == tokens["t"], tokens  # the same work: every token, once
    print(f"(p) plain script:                  {pw:6.2f} s wall, {pc:6.2f} s CPU ({tokens['p']:,} tokens)")
    print(f"(t) pile-prep tokenize --workers 1: {tw:6.2f} s wall, {tc:6.2f} s CPU")
    print(f"(p) / (t) wall = {pw / tw:.2f}, CPU = {pc / tc:.2f}   (target >= 0.9)")

    # The main process reads no input (workers cut their own): its CPU is start-up (tokenizer
    # load for the fingerprint, input hashes) plus bookkeeping per shard.
    def main_run(paths: list[str], out: str) -> tuple[float, float, float, str]:
        wall, _, text = timed([sys.executable, "-c", CLI_WITH_RSS, "tokenize", *paths, "-q",
                               "--overwrite", "-j", "2", "-o", out])  # fmt: skip
        cpu = float(text.split("main CPU s ")[1].split()[0])
        return wall, cpu, float(text.split("main peak RSS MiB ")[1].split()[0]), text

    tiny = work / "tiny.jsonl"
    tiny.write_text('{"text": "one short document"}\n')
    _, startup_cpu, _, _ = main_run([str(tiny)], str(work / "out-tiny"))
    wall, cpu, main_rss, text = main_run(inputs, str(work / "out-2"))
    worker_rss = float(text.split("peak worker memory ")[1].split()[0])
    per_gb = max(cpu - startup_cpu, 1e-3) / gb
    worker_gb_s = gb / tc  # one worker: nearly all of --workers 1's CPU
    print(f"main process: {cpu:.2f} s CPU of which {startup_cpu:.2f} s start-up: {per_gb:.2f} s CPU "
          f"per GB of text beyond start-up; at {worker_gb_s * 1e3:.1f} MB/s per worker it keeps up "
          f"with ~{1 / per_gb / worker_gb_s:.0f} workers (reader processes decompress and cut the inputs)")
    print(f"2 workers: {wall:.1f} s wall; peak RSS main {main_rss:.0f} MiB, worker {worker_rss:.0f} MiB beyond it "
          f"(64 MiB chunks)")
    huge_line_ratio(work, args.huge_mb)


def huge_line_ratio(work: Path, mb: float) -> None:
    """Cutting one line of 2N MB against one of N MB: ~2 when linear, ~4 when quadratic."""
    from pile_prep.inputs import input_chunks

    seconds = {}
    for size in (mb / 2, mb):
        path = work / "huge.jsonl"
        path.write_bytes(b'{"text": "' + b"x" * int(size * 1e6) + b'"}\n')
        best = float("inf")
        for _ in range(3):  # best of 3: one cut of a few hundred MB is short and this machine noisy
            t0 = time.perf_counter()
            for _ in input_chunks(0, path, 64 << 20, "text"):
                pass
            best = min(best, time.perf_counter() - t0)
        seconds[size] = best
        path.unlink()
    print(f"cutting one line of {mb / 2:.0f} / {mb:.0f} MB: {seconds[mb / 2]:.2f} / {seconds[mb]:.2f} s; "
          f"ratio {seconds[mb] / seconds[mb / 2]:.2f} (linear ~2, quadratic ~4; best of 3)")


if __name__ == "__main__":
    main()
