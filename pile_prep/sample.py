"""A small synthetic Pile-format corpus, generated here: the built-in default input.

No third-party text is copied: words are made from syllables, and each source has its own
word-level Markov chain, so a model trained on it has real structure to learn (its loss falls
well below the uniform baseline). Text also carries code, numbers, CJK, emoji and whitespace
runs so that the tokenizer's harder cases are exercised.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import zstandard

SOURCES = ("Pile-CC", "PubMed Central", "Github", "ArXiv", "Wikipedia (en)", "StackExchange")
_SYLLABLES = "ka lo mi ne ru sa ti vo pe da gri tor ven qui lum sha bex".split()
_EXTRAS = ["東京", "数据", "模型", "🙂", "🚀", "café", "naïve", "Ω", "\t", "    ", "<|endoftext|>"]


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 3))) for _ in range(n)]


def _chain(rng: random.Random, words: list[str]) -> dict[str, list[str]]:
    # Each word is followed by one of 3 successors: a strongly predictable language.
    return {w: rng.sample(words, 3) for w in words}


def _document(rng: random.Random, source: str, chain: dict[str, list[str]]) -> str:
    if source == "Github":
        name = rng.choice(list(chain))
        body = "\n".join(f"    {name}_{i} = {rng.randint(0, 999)}  # {rng.choice(list(chain))}"
                         for i in range(rng.randint(2, 12)))  # fmt: skip
        return f"def {name}(x):\n{body}\n    return x\n"
    word = rng.choice(list(chain))
    sentences = []
    for _ in range(rng.randint(1, 8)):
        words = []
        for _ in range(rng.randint(4, 20)):
            words.append(word)
            word = rng.choice(chain[word])
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), rng.choice(_EXTRAS))
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 10**6)))
        sentences.append(" ".join(words).capitalize() + ".")
    return (" " if rng.random() < 0.5 else "\n\n").join(sentences)


def write_sample_corpus(
    directory: Path, num_files: int = 2, docs_per_file: int = 2000, seed: int = 0
) -> list[Path]:
    """Write `00.jsonl.zst`.. and `val.jsonl.zst` (Pile layout); returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    vocab = _words(rng, 400)
    chains = {s: _chain(rng, vocab) for s in SOURCES}
    names = [f"{i:02d}.jsonl.zst" for i in range(num_files)] + ["val.jsonl.zst"]
    paths = []
    for name in names:
        n = docs_per_file if name != "val.jsonl.zst" else max(1, docs_per_file // 10)
        lines = []
        for _ in range(n):
            source = rng.choice(SOURCES)
            record = {"text": _document(rng, source, chains[source]),
                      "meta": {"pile_set_name": source}}  # fmt: skip
            lines.append(json.dumps(record, ensure_ascii=False))
        path = directory / name
        path.write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(("\n".join(lines) + "\n").encode()))
        paths.append(path)
    return paths
