"""Streaming fallback throughput: blocks/s per rank, against the memmap source and the trainer.

Generates a synthetic Pile-format corpus (~--corpus-mb MB of JSONL, zstd), tokenizes it offline
once, then measures in the same run:
  memmap     windows of S+1 tokens read from np.memmap over the offline stream (the baseline)
  streaming  StreamingTokenDataset: read + tokenize + pack on the fly, for several setups
and prints each rate as a ratio to the memmap rate and to what the trainer consumes
(--trainer-tokens-per-s / S blocks/s per rank). A ratio to the trainer below 1 means streaming
is the bottleneck: use more DataLoader workers or the offline shards.

    python benchmarks/bench_streaming.py --corpus-mb 50 --seq-len 2048 --trainer-tokens-per-s 20000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard
from torch.utils.data import DataLoader

from pile_prep.sample import write_sample_corpus
from pile_prep.streaming import StreamingConfig, StreamingTokenDataset
from pile_prep.tokenize import TokenizeOptions, tokenize
from pile_prep.tokenizer import load_tokenizer


@dataclass
class Rate:
    name: str
    blocks: int
    seconds: float  # steady state: from the first block to the last
    startup: float  # from building the source to its first block

    @property
    def per_s(self) -> float:
        return self.blocks / self.seconds


def make_corpus(directory: Path, corpus_mb: float, num_files: int) -> list[Path]:
    # write_sample_corpus documents average ~380 bytes of JSONL.
    docs = max(1, int(corpus_mb * 1e6 / 380 / num_files))
    return write_sample_corpus(directory, num_files=num_files, docs_per_file=docs)[:num_files]


def offline_stream(files: list[Path], out: Path, workers: int) -> Path:
    tokenize(TokenizeOptions(inputs=[str(f) for f in files], output=out, workers=workers,
                             progress=False))  # fmt: skip
    stream = out / "stream.u32"
    with open(stream, "wb") as f:
        f.writelines(shard.read_bytes() for shard in sorted(out.glob("shard-*.bin")))
    return stream


def time_blocks(name: str, make_iter, max_blocks: int) -> Rate:
    start = time.perf_counter()
    it = iter(make_iter())
    first = None
    n = n_first = 0
    for item in it:
        n += item["input_ids"].shape[0] if item["input_ids"].dim() == 2 else 1  # batch or block
        if first is None:
            first, n_first = time.perf_counter(), n
        if n >= max_blocks:
            break
    end = time.perf_counter()
    assert first is not None, f"{name}: no block (corpus smaller than one block?)"
    # The first item's time is startup; the rate counts the blocks after it.
    return Rate(name, n - n_first, end - first, first - start)


def memmap_windows(path: Path, seq_len: int, repeats: int):
    """The memmap source's work per block: slice S+1 tokens, widen to int64, split."""
    tokens = np.memmap(path, "<u4", "r")
    n = (len(tokens) - 1) // seq_len
    for _ in range(repeats):
        for i in range(n):
            t = torch.from_numpy(tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int64))
            yield {"input_ids": t[:-1], "labels": t[1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--corpus-mb", type=float, default=50.0, help="uncompressed JSONL size")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="DataLoader workers for the multi-worker line")  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=8, help="blocks per batch from workers")
    ap.add_argument("--trainer-tokens-per-s", type=float, default=20_000.0,
                    help="tokens/s one rank's trainer consumes (e.g. 0.5B MoE on one GPU)")  # fmt: skip
    ap.add_argument("--max-blocks", type=int, default=10**9, help="cap per measurement")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    S = args.seq_len

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        files = make_corpus(tmp / "corpus", args.corpus_mb, args.files)
        zst_mb = sum(f.stat().st_size for f in files) / 1e6
        jsonl_mb = sum(zstandard.frame_content_size(f.read_bytes()) for f in files) / 1e6
        stream = offline_stream(files, tmp / "shards", workers=args.workers)
        tokens = stream.stat().st_size // 4
        print(f"corpus: {len(files)} files, {jsonl_mb:.1f} MB JSONL ({zst_mb:.1f} MB zstd), "
              f"{tokens / 1e6:.2f} M tokens, "
              f"{(tokens - 1) // S} blocks of S={S} (setup {time.perf_counter() - t0:.0f} s)")  # fmt: skip

        tok = load_tokenizer()
        cfg = StreamingConfig(data_files=[str(f) for f in files])
        cap = args.max_blocks
        base = time_blocks("memmap (baseline)", lambda: memmap_windows(stream, S, 20), cap)
        rates = [
            time_blocks(
                "streaming, 1 process", lambda: StreamingTokenDataset(cfg, S, 0, 1, tok), cap
            ),
            time_blocks(
                f"streaming, {args.workers} workers, batch {args.batch_size}",
                lambda: DataLoader(
                    StreamingTokenDataset(cfg, S, 0, 1, tok),
                    batch_size=args.batch_size,
                    num_workers=args.workers,
                ),
                cap,
            ),
            # One rank of 8 with more readers than files: stride split, every reader parses all
            # records but tokenizes 1/8 of them. Its blocks/s is per rank.
            time_blocks(
                "streaming, rank 0 of 8 (stride)",
                lambda: StreamingTokenDataset(cfg, S, 0, 8, tok),
                cap,
            ),
        ]

    need = args.trainer_tokens_per_s / S
    print(
        f"trainer consumes {args.trainer_tokens_per_s:,.0f} tokens/s = {need:.2f} blocks/s per rank"
    )
    print(f"{'source':34s} {'blocks/s':>10s} {'Mtok/s':>8s} {'startup s':>9s} "
          f"{'vs memmap':>10s} {'vs trainer':>10s}")  # fmt: skip
    for r in [base, *rates]:
        print(f"{r.name:34s} {r.per_s:10.1f} {r.per_s * S / 1e6:8.2f} {r.startup:9.2f} "
              f"{r.per_s / base.per_s:10.4f} {r.per_s / need:10.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
