"""How close `pile-prep tokenize` runs to the speed of the tokenizer itself.

Builds a Pile-format corpus from real text found on this machine (Python sources and the
Markdown/reST/text documentation of the installed Python: code and English prose, a few hundred
MB), then measures in one run:
  (a) the raw tokenizer alone (tiktoken `encode_to_numpy`, the call pile-prep makes), one core,
      text already in memory;
  (b) `pile-prep tokenize --workers 1`, end to end (decompress, parse, NFC, tokenize, write);
  (c) `pile-prep tokenize --workers <all cores>`.
Targets: b/a >= 0.85 and c/(cores*a) >= 0.85. Also prints a worker's peak memory (beyond the pages it shares with the main process), and
  (a') the raw tokenizer in one process per core at once: the parallel limit of the machine.

    python benchmarks/bench_tokenize.py [--mb 200] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sysconfig
import tempfile
import time
from pathlib import Path

import zstandard

from pile_prep.tokenize import TokenizeOptions, tokenize, usable_cores
from pile_prep.tokenizer import load_tokenizer

_SUFFIXES = {".py": "Github", ".md": "docs", ".rst": "docs", ".txt": "docs"}


def real_documents(limit_bytes: int) -> list[tuple[str, str]]:
    """(text, source) of real files under the Python installation, up to `limit_bytes`."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    docs, size = [], 0
    for root in roots:
        for path in sorted(root.rglob("*")):
            source = _SUFFIXES.get(path.suffix)
            if source is None or not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            docs.append((text, source))
            size += len(text.encode())
            if size >= limit_bytes:
                return docs
    return docs


def write_corpus(docs: list[tuple[str, str]], directory: Path, files: int = 4) -> list[Path]:
    paths = []
    per_file = (len(docs) + files - 1) // files
    for i in range(files):
        lines = [json.dumps({"text": t, "meta": {"pile_set_name": s}})
                 for t, s in docs[i * per_file : (i + 1) * per_file]]  # fmt: skip
        path = directory / f"{i:02d}.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor(level=3, threads=-1).compress(
            ("\n".join(lines) + "\n").encode()))  # fmt: skip
        paths.append(path)
    return paths


def _raw_rate(texts: list[str]) -> tuple[int, float]:
    enc = load_tokenizer()._enc  # the raw tiktoken Encoding: the limit we compare against
    t0 = time.perf_counter()
    # The same call pile-prep makes (as fast as encode_ordinary or faster: no list of ints).
    n = sum(len(enc.encode_to_numpy(t, disallowed_special=())) for t in texts)
    return n, time.perf_counter() - t0


def raw_parallel_rate(texts: list[str], processes: int) -> float:
    """Raw tiktoken in `processes` processes at once: what this machine's cores really give."""
    shares = [texts[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(_raw_rate, [["warm up"]] * processes)
        t0 = time.perf_counter()
        results = pool.map(_raw_rate, shares)
        wall = time.perf_counter() - t0
    return sum(n for n, _ in results) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200, help="MB of text to tokenize")
    parser.add_argument("--repeats", type=int, default=3, help="best of N (this machine is noisy)")
    parser.add_argument("--shard-mb", type=int, default=8,
                        help="shard size; small enough that every core gets many chunks, as on the Pile")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_tokenize-"))
    work.mkdir(parents=True, exist_ok=True)

    docs = real_documents(int(args.mb * 1e6))
    text_bytes = sum(len(t.encode()) for t, _ in docs)
    inputs = write_corpus(docs, work)
    texts = [t for t, _ in docs]
    del docs
    cores = usable_cores()
    print(f"corpus: {len(texts):,} documents, {text_bytes / 1e6:.0f} MB of text, {len(inputs)} files; "
          f"{cores} cores; best of {args.repeats}")

    best: dict[str, float] = {}
    peak_rss = 0.0
    for _ in range(args.repeats):  # interleaved, so that a slow phase of the machine hits all
        n, seconds = _raw_rate(texts)
        best["a"] = max(best.get("a", 0.0), n / seconds)
        best["a_par"] = max(best.get("a_par", 0.0), raw_parallel_rate(texts, cores))
        for key, workers in (("b", 1), ("c", cores)):
            s = tokenize(TokenizeOptions(inputs=[str(p) for p in inputs], output=work / f"out-{key}",
                                         workers=workers, overwrite=True, progress=False,
                                         shard_bytes=args.shard_mb << 20))  # fmt: skip
            best[key] = max(best.get(key, 0.0), s.tokens_this_run / s.seconds)
            peak_rss = max(peak_rss, s.peak_worker_mb)
    a, a_par, b, c = best["a"], best["a_par"], best["b"], best["c"]
    print(f"(a)  raw tiktoken, 1 core, in memory:        {a / 1e6:6.2f} M tokens/s ({n:,} tokens)")
    print(f"(a') raw tiktoken, {cores} processes at once:       {a_par / 1e6:6.2f} M tokens/s")
    print(f"(b)  pile-prep tokenize --workers 1:          {b / 1e6:6.2f} M tokens/s")
    print(f"(c)  pile-prep tokenize --workers {cores}:          {c / 1e6:6.2f} M tokens/s")
    print(f"peak memory of a worker (beyond the pages it shares with the main process): {peak_rss:.0f} MiB")
    print(f"\n(b) / (a)            = {b / a:.2f}   (target >= 0.85)")
    print(f"(c) / ({cores} x (a))      = {c / (cores * a):.2f}   (target >= 0.85)")
    print(f"(c) / (a')           = {c / a_par:.2f}   (what the cores give when all are busy)")
    print(f"(a') / ({cores} x (a))     = {a_par / (cores * a):.2f}   (the machine's own parallel scaling)")


if __name__ == "__main__":
    main()
