"""How close `pile-prep tokenize` runs to the speed of the tokenizer itself.

Builds a Pile-format corpus from real text found on this machine (Python sources and the
Markdown/reST/text documentation of the installed Python: code and English prose, a few hundred
MB), then measures in one run:
  (a) the raw tokenizer alone (tiktoken `encode_ordinary`), one core, text already in memory;
  (b) `pile-prep tokenize --workers 1`, end to end (decompress, parse, NFC, tokenize, write);
  (c) `pile-prep tokenize --workers <all cores>`.
Targets: b/a >= 0.85 and c/(cores*a) >= 0.85. Also prints the peak RSS of a worker.

    python benchmarks/bench_tokenize.py [--mb 200] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200, help="MB of text to tokenize")
    parser.add_argument("--shard-mb", type=int, default=8,
                        help="shard size; small enough that every core gets many chunks, as on the Pile")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_tokenize-"))
    work.mkdir(parents=True, exist_ok=True)

    docs = real_documents(int(args.mb * 1e6))
    text_bytes = sum(len(t.encode()) for t, _ in docs)
    inputs = write_corpus(docs, work)
    print(f"corpus: {len(docs):,} documents, {text_bytes / 1e6:.0f} MB of text, {len(inputs)} files")

    tok = load_tokenizer()
    enc = tok._enc  # the raw tiktoken Encoding: the limit we compare against
    texts = [t for t, _ in docs]
    del docs
    t0 = time.perf_counter()
    n_tokens = sum(len(enc.encode_ordinary(t)) for t in texts)
    raw = n_tokens / (time.perf_counter() - t0)
    del texts
    print(f"(a) raw tiktoken, 1 core, in memory: {raw / 1e6:.2f} M tokens/s ({n_tokens:,} tokens)")

    cores = usable_cores()
    rates = {}
    for workers in (1, cores):
        s = tokenize(TokenizeOptions(inputs=[str(p) for p in inputs], output=work / f"out-{workers}",
                                     workers=workers, overwrite=True, progress=False,
                                     shard_bytes=args.shard_mb << 20))  # fmt: skip
        rates[workers] = s.tokens_this_run / s.seconds
        print(f"pile-prep tokenize --workers {workers}: {rates[workers] / 1e6:.2f} M tokens/s, "
              f"{s.seconds:.1f} s, peak worker RSS {s.peak_worker_rss_mb:.0f} MiB")
    b, c = rates[1] / raw, rates[cores] / (cores * raw)
    print(f"\nratio (b)/(a) = {b:.2f} (target >= 0.85)")
    print(f"ratio (c)/({cores} x (a)) = {c:.2f} (target >= 0.85)")
    sys.exit(0)


if __name__ == "__main__":
    main()
