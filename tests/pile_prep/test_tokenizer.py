"""Both tokenizer backends give Qwen2.5's ids, and agree with each other."""

from __future__ import annotations

import json
import unicodedata

import pytest
import tiktoken

from pile_prep.tokenizer import (
    QWEN_PATTERN,
    TokenizerError,
    load_tokenizer,
    nfc,
    qwen_ranks,
)

from .qwen_files import write_tokenizer_json, write_vocab_merges

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock; WE'LL see!",
    "def f(x):\n\tif x > 0:\n        return x ** 2  # square\n    return None\r\n",
    "東京の天気は晴れです。机器学习模型需要大量数据。한국어 텍스트",
    "emoji 🙂🚀👩‍👩‍👧 and symbols ∑∫Ω ≠ ≤",
    "whitespace   runs\n\n\n\t\t  \u00a0 \u3000 end   ",
    "a literal <|endoftext|> and <|im_start|>user<|im_end|> are text",
    "cafe\u0301 becomes café under NFC",
    "x" * 5000,
    "",
]


@pytest.fixture(scope="module")
def tiktoken_tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """vocab.json + merges.txt made from the same ranks, as a byte-level BPE user would have."""
    return write_vocab_merges(tmp_path_factory.mktemp("qwen_hf"))


def test_known_qwen_ids(tiktoken_tok):
    assert tiktoken_tok.encode("Hello world") == [9707, 1879]
    assert tiktoken_tok.eos_id == 151643
    assert tiktoken_tok.vocab_size == 151665  # 151,643 ranks + 22 special tokens
    assert tiktoken_tok.token_bytes(151643) == b"<|endoftext|>"


def test_special_strings_are_text(tiktoken_tok):
    ids = tiktoken_tok.encode("before <|endoftext|> after")
    assert tiktoken_tok.eos_id not in ids
    assert max(ids) < 151643
    assert tiktoken_tok.decode(ids) == "before <|endoftext|> after"


@pytest.mark.parametrize("text", TEXTS)
def test_matches_plain_tiktoken_after_nfc(tiktoken_tok, text):
    enc = tiktoken.Encoding("ref", pat_str=QWEN_PATTERN, mergeable_ranks=qwen_ranks(), special_tokens={})
    assert tiktoken_tok.encode(text) == enc.encode_ordinary(unicodedata.normalize("NFC", text))
    assert tiktoken_tok.decode(tiktoken_tok.encode(text)) == nfc(text)


def test_hf_vocab_merges_equal_tiktoken(tiktoken_tok, hf_dir):
    hf = load_tokenizer(str(hf_dir))
    assert hf.fingerprint == tiktoken_tok.fingerprint
    assert (hf.eos_id, hf.vocab_size) == (tiktoken_tok.eos_id, tiktoken_tok.vocab_size)
    for text in TEXTS:
        assert hf.encode(text) == tiktoken_tok.encode(text), text
        assert hf.decode(hf.encode(text)) == nfc(text)


# Qwen2.5's tokenizer.json marks these 8 of its 22 added tokens "special": false.
ADDED_TOKEN_TEXTS = [
    "a <tool_call>{\"name\": 1}</tool_call> call",
    "<|fim_prefix|>def f(<|fim_suffix|>)<|fim_middle|>x<|fim_pad|>",
    "<|repo_name|>r<|file_sep|>a.py <|endoftext|><|im_start|>user<|im_end|>",
]


@pytest.fixture(scope="module")
def real_tokenizer_json(hf_dir, tmp_path_factory):
    """A tokenizer.json laid out as Qwen2.5's: BPE + 22 added tokens with the real flags."""
    path = write_tokenizer_json(hf_dir, tmp_path_factory.mktemp("qwen_json") / "tokenizer.json")
    flags = {t["content"]: (t["id"], t["special"]) for t in json.loads(path.read_text())["added_tokens"]}
    assert flags["<tool_call>"] == (151657, False) and flags["<|im_start|>"] == (151644, True)
    assert sum(not special for _, special in flags.values()) == 8 and len(flags) == 22
    return path


def test_hf_tokenizer_json_with_real_flags_equals_tiktoken(tiktoken_tok, real_tokenizer_json):
    from_json = load_tokenizer(str(real_tokenizer_json))
    assert from_json.fingerprint == tiktoken_tok.fingerprint
    assert (from_json.eos_id, from_json.vocab_size) == (151643, 151665)
    assert from_json.token_bytes(151657) == b"<tool_call>"
    for text in TEXTS + ADDED_TOKEN_TEXTS:
        ids = from_json.encode(text)
        assert ids == tiktoken_tok.encode(text), text
        assert max(ids, default=0) < 151643
        assert from_json.decode(ids) == nfc(text)


def test_fingerprint_covers_added_token_treatment(tiktoken_tok):
    import hashlib

    # The same table and pattern hashed without the treatment (as pile-prep <= 0.1 did, whose
    # HF backend encoded <tool_call> as 151657) is another fingerprint.
    h = hashlib.sha256(QWEN_PATTERN.encode())
    for i in range(tiktoken_tok.vocab_size):
        token = tiktoken_tok.token_bytes(i)
        h.update(len(token).to_bytes(4, "little") + token)
    assert tiktoken_tok.fingerprint != "sha256:" + h.hexdigest()


def test_long_document_pieces_give_identical_ids(tiktoken_tok, monkeypatch):
    import pile_prep.tokenizer as tokmod

    # Indented code, blank lines with trailing spaces, CRLF, combining marks after newlines.
    text = "".join(
        f"Line {i}: naïve café {i * 7}\n  \n" + ("Ω" if i % 3 else "")
        + f"    if x:\r\n\t  return {i}  \n\n\u0301 ) (\n" + ("\n   \n" * (i % 4))
        for i in range(3000)
    )  # fmt: skip
    whole = tiktoken_tok.encode(text)
    monkeypatch.setattr(tokmod, "_PIECE_CHARS", 1000)
    pieces = list(tiktoken_tok.encode_pieces(text))
    assert len(pieces) > 50
    assert [i for p in pieces for i in p] == whole
    # Lazily: the writer has the first piece's ids before the next piece is even encoded.
    calls = []
    encode = tiktoken_tok._enc.encode_to_numpy
    monkeypatch.setattr(tiktoken_tok._enc, "encode_to_numpy", lambda *a, **k: calls.append(1) or encode(*a, **k))
    first = next(iter(tiktoken_tok.encode_pieces(text)))
    assert len(calls) == 1 and first.tolist() == pieces[0].tolist()


def test_bad_tokenizer_spec_is_clear(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt9'"):
        load_tokenizer("gpt9")
    with pytest.raises(TokenizerError, match="expected tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_random_texts_pieces_give_identical_ids(tiktoken_tok, monkeypatch):
    import random

    import pile_prep.tokenizer as tokmod

    fragments = ["\n", "\r\n", " ", "  ", "\t", "\u3000", "\u00a0", "\x0c", "word", "Word", "'s",
                 "42", ".", ")", "#", "é", "e\u0301", "\u0301", "東京", "🙂", "\n\n", " \n "]  # fmt: skip
    rng = random.Random(0)
    texts = ["".join(rng.choices(fragments, k=600)) for _ in range(300)]
    whole = [tiktoken_tok.encode(t) for t in texts]
    monkeypatch.setattr(tokmod, "_PIECE_CHARS", 40)
    assert sum(len(list(tiktoken_tok.encode_pieces(t))) for t in texts) > 3000
    assert [tiktoken_tok.encode(t) for t in texts] == whole


def test_qwen_shaped_files_encode_with_tiktoken(tiktoken_tok, hf_dir, real_tokenizer_json):
    for path in (hf_dir, real_tokenizer_json, real_tokenizer_json.parent):
        tok = load_tokenizer(str(path))
        assert tok.engine == "tiktoken", path
        assert tok.fingerprint == tiktoken_tok.fingerprint and tok.vocab_size == 151665
        for text in TEXTS + ADDED_TOKEN_TEXTS:
            ids = tok.encode(text)
            assert ids == tiktoken_tok.encode(text), text
            assert ids == tok._tok.encode(nfc(text), add_special_tokens=False).ids  # `tokenizers`' own
            assert all(type(i) is int for i in ids)


@pytest.mark.parametrize("change", ["normalizer", "regex", "merge order", "dropout"])
def test_files_tiktoken_cannot_express_keep_tokenizers(real_tokenizer_json, tmp_path, change):
    spec = json.loads(real_tokenizer_json.read_text())
    if change == "normalizer":
        spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
    elif change == "regex":
        spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    elif change == "merge order":  # the last merge first: merges no longer in the ids' order
        merges = spec["model"]["merges"]
        merges.insert(0, merges.pop())
    else:
        spec["model"]["dropout"] = 0.5
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    tok = load_tokenizer(str(path))
    assert tok.engine == "tokenizers"
    text = "The theory of THE thermal"
    assert tok.encode(text) == tok._tok.encode(nfc(text), add_special_tokens=False).ids or change == "dropout"
