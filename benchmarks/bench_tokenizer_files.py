"""`pile-prep tokenize --tokenizer DIR` (a user's Qwen2.5 files) against the built-in `qwen2.5`.

Writes Qwen2.5-shaped files from the bundled ranks (a tokenizer.json with the 22 added tokens,
8 of them not special, as Qwen2.5 ships it; and vocab.json + merges.txt) and a corpus of real
text (bench_tokenize.py's: the installed Python's sources and docs), then measures CPU time
(user + sys of every process: this machine's cores are shared, wall time is noise):
  (e) end to end: `pile-prep tokenize --workers 1` in a subprocess, built-in vs --tokenizer DIR;
  (r) the encoder alone, in this process, on the same texts: built-in, DIR (the engine it picks),
      and DIR forced through `tokenizers` (the engine for files tiktoken cannot express).
Target: built-in CPU / DIR CPU >= 0.8 end to end. Ids are checked equal.

    python benchmarks/bench_tokenizer_files.py [--mb 16] [--work DIR]
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

from pile_prep.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: its tests' Qwen2.5 files
from tests.pile_prep.qwen_files import write_tokenizer_json, write_vocab_merges  # noqa: E402


def write_qwen_files(directory: Path) -> Path:
    """vocab.json + merges.txt and tokenizer.json, made from the bundled ranks."""
    write_vocab_merges(directory)
    write_tokenizer_json(directory, directory / "tokenizer.json")
    return directory


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def end_to_end_cpu(inputs: list[Path], out: Path, tokenizer: str) -> float:
    before = _children_cpu()
    subprocess.run([sys.executable, "-m", "pile_prep.cli", "tokenize", *map(str, inputs), "-o", str(out),
                    "-j", "1", "-q", "--overwrite", "--tokenizer", tokenizer], check=True)  # fmt: skip
    return _children_cpu() - before


def encode_cpu(tok, texts: list[str]) -> tuple[float, list]:
    t0 = time.process_time()
    ids = [list(tok.encode_pieces(t)) for t in texts]
    return time.process_time() - t0, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=16, help="MB of text")
    parser.add_argument("--repeats", type=int, default=2, help="best of N")
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_tokenizer_files-"))
    (work / "in").mkdir(parents=True, exist_ok=True)
    files = write_qwen_files(work / "qwen")
    docs = real_documents(int(args.mb * 1e6))
    texts = [t for t, _ in docs]
    inputs = write_corpus(docs, work / "in", files=2)
    print(f"corpus: {len(texts):,} documents, {sum(len(t.encode()) for t in texts) / 1e6:.0f} MB; best of {args.repeats}")

    builtin, user = load_tokenizer(), load_tokenizer(str(files))
    forced = load_tokenizer(str(files))
    forced._enc, forced.engine = None, "tokenizers"
    print(f"--tokenizer {files}: engine {user.engine}; fingerprint equal: {user.fingerprint == builtin.fingerprint}")
    cpu: dict[str, float] = {}
    for repeat in range(args.repeats):
        for key, tok in (("r builtin", builtin), ("r dir", user), ("r tokenizers", forced)):
            if key == "r tokenizers" and repeat:  # ~10x slower, and not the target: once
                continue
            seconds, ids = encode_cpu(tok, texts)
            cpu[key] = min(cpu.get(key, 1e9), seconds)
            if key == "r builtin":
                reference = [[int(i) for p in doc for i in p] for doc in ids]
            else:
                assert [[int(i) for p in doc for i in p] for doc in ids] == reference, key
        for key, spec in (("e builtin", "qwen2.5"), ("e dir", str(files))):
            cpu[key] = min(cpu.get(key, 1e9), end_to_end_cpu(inputs, work / key.replace(" ", "-"), spec))
    same = all((work / "e-builtin" / p.name).read_bytes() == p.read_bytes()
               for p in (work / "e-dir").glob("shard-*.bin"))  # fmt: skip
    print(f"(r) encoder CPU: built-in {cpu['r builtin']:.2f} s, DIR ({user.engine}) {cpu['r dir']:.2f} s, "
          f"DIR through tokenizers {cpu['r tokenizers']:.2f} s")
    print(f"(e) tokenize --workers 1 CPU (all processes): built-in {cpu['e builtin']:.2f} s, DIR {cpu['e dir']:.2f} s; "
          f"shards byte-identical: {same}")
    print(f"\nbuilt-in / DIR speed, encoder:     {cpu['r builtin'] / cpu['r dir']:.2f}")
    print(f"built-in / DIR speed, end to end:  {cpu['e builtin'] / cpu['e dir']:.2f}   (target >= 0.8)")
    print(f"built-in / tokenizers speed, encoder: {cpu['r builtin'] / cpu['r tokenizers']:.2f}   (the fallback)")


if __name__ == "__main__":
    main()
