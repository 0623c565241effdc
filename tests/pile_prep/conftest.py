"""Small Pile-format inputs that the tests write themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard

from pile_prep.sample import write_sample_corpus

# Texts that exercise the tokenizer's edge cases; "" is an empty document (skipped), "   " is not.
SPECIAL_DOCS = [
    ("Hello world", "Pile-CC"),
    ("", "Pile-CC"),
    ("   \n\t  ", "Github"),
    ("a literal <|endoftext|> and <|im_start|> stay text", "Github"),
    ("東京の天気は晴れです。数据模型 🙂🚀👩‍👩‍👧", "Wikipedia (en)"),
    ("cafe\u0301 is not NFC until normalised", "ArXiv"),
    ("def f(x):\n    return x ** 2  # square\n", "Github"),
]


def write_jsonl_zst(path: Path, records: list[dict] | list[bytes]) -> Path:
    lines = [r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in records]
    path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(b"\n".join(lines) + b"\n"))
    return path


def pile_record(text: str, source: str) -> dict:
    return {"text": text, "meta": {"pile_set_name": source}}


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> list[Path]:
    """Two training files of 400 synthetic documents each (plus val.jsonl.zst)."""
    paths = write_sample_corpus(tmp_path_factory.mktemp("corpus"), num_files=2, docs_per_file=400)
    return paths[:2]


@pytest.fixture
def special_input(tmp_path) -> Path:
    return write_jsonl_zst(tmp_path / "special.jsonl.zst", [pile_record(t, s) for t, s in SPECIAL_DOCS])
