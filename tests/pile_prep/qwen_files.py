"""Qwen2.5's tokenizer files as a user downloads them, made from the bundled ranks (no download):
vocab.json + merges.txt, and a tokenizer.json with Qwen2.5's real added-token flags. Used by the
tokenizer tests and by benchmarks/bench_tokenizer_files.py."""

from __future__ import annotations

import json
from pathlib import Path

from pile_prep.tokenizer import QWEN2_5_SPECIAL_TOKENS, QWEN_PATTERN, _bytes_to_unicode, qwen_ranks

# Qwen2.5's tokenizer.json marks these 8 of its 22 added tokens "special": false.
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}  # fmt: skip


def write_vocab_merges(directory: Path) -> Path:
    """vocab.json + merges.txt in `directory`: the byte-level BPE of the bundled ranks."""
    ranks = qwen_ranks()
    to_unicode = _bytes_to_unicode()
    show = lambda b: "".join(to_unicode[x] for x in b)  # noqa: E731
    merges = []
    for token, rank in ranks.items():
        splits = [
            (ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
            and max(ranks[token[:i]], ranks[token[i:]]) < rank
        ]  # fmt: skip
        merges += [(rank, left, right) for *_, left, right in sorted(splits)]
    merges.sort(key=lambda m: m[0])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({show(t): r for t, r in ranks.items()}))
    lines = [f"{show(a)} {show(b)}" for _, a, b in merges]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return directory


def write_tokenizer_json(vocab_merges: Path, path: Path) -> Path:
    """A tokenizer.json laid out as Qwen2.5's: BPE + 22 added tokens with the real flags."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(vocab_merges / "vocab.json"), str(vocab_merges / "merges.txt")))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    for t in QWEN2_5_SPECIAL_TOKENS:  # one at a time: ids 151643.. in this order
        special = t not in NOT_SPECIAL
        added = AddedToken(t, special=special, normalized=False)
        tok.add_special_tokens([added]) if special else tok.add_tokens([added])
    tok.save(str(path))
    return path
