"""Small synthetic Pile-format corpora, generated here (no third-party text is copied).

`write_sample_corpus` (`pile-prep sample`, the built-in default input): words made from
syllables, each source its own word-level Markov chain, so a model trained on it has real
structure to learn. Text also carries code, numbers, CJK, emoji and whitespace runs so that the
tokenizer's harder cases are exercised.

`write_domain_corpus` (`pile-prep sample --kind domains`): the router research proxy, K hidden
domains over one shared word set, where an MoE provably has something to specialise on
(docs/MOE.md#the-domains-proxy). K domains, V words, b successors per word and domain, q the
probability that a document ends after a word.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from pile_prep.packing import (
    SIGNATURE_TOKENS,
    content_signatures,
    document_order,
    segment_continuity,
    signature_projection,
)

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
        paths.append(_write_jsonl_zst(directory / name, lines))
    return paths


def _write_jsonl_zst(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data))
    return path


# --- the domains proxy ----------------------------------------------------------------------------

# 128 common English words, each ONE Qwen2.5 token with its leading space (tested), so a document
# of n words is exactly n tokens + EOS under Qwen2.5 as under the corpus's own word tokenizer.
DOMAIN_WORDS = tuple("""
the of and to in is was for on as with by at from his her an be not are this that or have had
but one all which were when there can more its time new two some would who may first been out if
has into other up only also most over about these many so after than made any such them years
three year used called between state world during city under where both while well later then
known before part four since school through each five group like because including however team
high being national people around him against early last second government several film area use
family century name series season long won war way work south north based best began did life
""".split())  # fmt: skip
DOMAIN_TOKENIZER = "tokenizer.json"  # written next to the corpus: one id per word, then EOS
VAL_STREAM = 1 << 16  # the val file's random stream: the same val set for any number of train files


@dataclass(frozen=True)
class DomainCorpus:
    """K hidden domains, each a sparse Markov chain over the same V words.

    A document picks a domain d uniformly, a first word uniformly, then repeatedly ends with
    probability q = 1 / mean_words or moves to one of the b successors that d gives the current
    word (uniformly). Every domain uses every word, so no single word reveals the domain; the
    transitions do (a random word pair fits another domain with probability b / V).
    """

    domains: int = 8  # K
    words: int = 128  # V (at most len(DOMAIN_WORDS))
    successors: int = 2  # b
    # 1 / q; document lengths are geometric from 1. 256 words: 16 segments of a 16-token segment
    # router, so most segments are routed by a segment of their own document.
    mean_words: float = 256.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.words <= len(DOMAIN_WORDS):
            raise ValueError(f"words must be in [1, {len(DOMAIN_WORDS)}], got {self.words}")
        if not 1 <= self.successors <= self.words:
            raise ValueError(f"successors must be in [1, words={self.words}], got {self.successors}")
        if self.domains < 1 or self.mean_words < 1:
            raise ValueError(f"domains and mean_words must be >= 1, got {self.domains}, {self.mean_words}")

    @property
    def stop(self) -> float:
        return 1.0 / self.mean_words  # q

    @property
    def names(self) -> list[str]:
        """pile_set_name of each domain."""
        return [f"domain_{k:02d}" for k in range(self.domains)]

    def chains(self) -> np.ndarray:
        """Successor word ids [K, V, b]: b distinct words per (domain, word), from `seed`."""
        rng = np.random.default_rng([self.seed, 0])
        k, v, b = self.domains, self.words, self.successors
        return np.argsort(rng.random((k, v, v)), axis=-1)[..., :b]

    def entropy_rate(self) -> float:
        """Best loss per token (nats, EOS included) when each document's domain is known.

        A first word costs ln V; every later token (a successor or EOS) costs
        h = H(q) + (1 - q) ln b; a document has 1/q words + 1 EOS on average, so the rate is
        (ln V + h / q) / (1 / q + 1).
        """
        q, b, v = self.stop, self.successors, self.words
        h_q = -(q * math.log(q) + (1 - q) * math.log(1 - q)) if q < 1 else 0.0
        h = h_q + (1 - q) * math.log(b)
        return (math.log(v) + h / q) / (1 / q + 1)

    def documents(self, count: int, stream: int) -> list[tuple[int, list[int]]]:
        """`count` documents (domain, word ids) from random stream `stream` (one per file)."""
        rng = np.random.default_rng([self.seed, 1, stream])
        chains, q, docs = self.chains(), self.stop, []
        for _ in range(count):
            d = int(rng.integers(self.domains))
            w = int(rng.integers(self.words))
            words = [w]
            while rng.random() >= q:
                w = int(chains[d, w, rng.integers(self.successors)])
                words.append(w)
            docs.append((d, words))
        return docs

    def bayes_loss(self, docs: list[tuple[int, list[int]]]) -> float:
        """Loss per token (nats, EOS included) of the Bayes-optimal predictor on `docs`.

        It knows the chains but not the domain: it keeps the posterior over the K domains from
        the document's words so far (starting uniform at each document), which is the best any
        model can do that sees the whole document (a window that starts mid-document sees less).
        """
        chains, q, b = self.chains(), self.stop, self.successors
        total, tokens = 0.0, 0
        for _, words in docs:
            posterior = np.full(self.domains, 1.0 / self.domains)  # [K]
            total += math.log(self.words)  # the first word: uniform
            for prev, word in zip(words, words[1:]):
                fits = (chains[:, prev, :] == word).any(axis=1)  # [K] domains with this transition
                p = float(posterior @ fits) * (1 - q) / b
                total -= math.log(p)
                posterior = posterior * fits / float(posterior @ fits)
            total -= math.log(q)  # EOS: the same probability in every domain
            tokens += len(words) + 1
        return total / tokens


def write_domain_tokenizer(path: Path, words: int) -> Path:
    """A word-level tokenizer.json (`pile-prep tokenize --tokenizer PATH`): word i (with its
    leading space) is id i, <|endoftext|> is id V. The model's vocabulary shrinks from Qwen's
    151,936 ids to V + 1, so the MLP/MoE, not the output layer, is most of a tiny model's FLOPs."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from pile_prep.tokenizer import EOS_TOKEN, QWEN_PATTERN

    vocab = {"Ġ" + w: i for i, w in enumerate(DOMAIN_WORDS[:words])}  # Ġ: byte-level form of " "
    vocab[EOS_TOKEN] = words
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    tok.save(str(path))
    return path


def domain_val_documents(corpus: DomainCorpus, docs_per_file: int):
    """The documents of `write_domain_corpus`'s val.jsonl.zst: a tenth as many as a train file."""
    return corpus.documents(max(1, docs_per_file // 10), VAL_STREAM)


def write_domain_corpus(directory: Path, corpus: DomainCorpus, num_files: int = 1,
                        docs_per_file: int = 4000) -> list[Path]:  # fmt: skip
    """Write `00.jsonl.zst`.., `val.jsonl.zst` (a tenth as many documents; Pile layout,
    `meta.pile_set_name` = the domain) and the word tokenizer `tokenizer.json`; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    files = [(f"{i:02d}.jsonl.zst", corpus.documents(docs_per_file, i)) for i in range(num_files)]
    files.append(("val.jsonl.zst", domain_val_documents(corpus, docs_per_file)))
    paths = []
    for name, documents in files:
        lines = [json.dumps({"text": "".join(" " + DOMAIN_WORDS[w] for w in words),
                             "meta": {"pile_set_name": corpus.names[d]}})
                 for d, words in documents]  # fmt: skip
        paths.append(_write_jsonl_zst(directory / name, lines))
    paths.append(write_domain_tokenizer(directory / DOMAIN_TOKENIZER, corpus.words))
    return paths


def packing_continuity(docs: list[tuple[int, list[int]]], words: int, seq_len: int,
                       segment_len: int) -> dict[str, tuple[float, float]]:  # fmt: skip
    """{packing: (same document, same domain)}: the shares of `segment_continuity` when the
    documents (domain, word ids; word i is token i, EOS is `words`) are packed by each packing."""
    domains = np.array([d for d, _ in docs])  # [D]
    tokens = [np.array(ws + [words]) for _, ws in docs]  # each document with its EOS
    lengths = np.array([len(t) for t in tokens])  # [D]
    flat = np.concatenate(tokens)  # [T]
    capped = [t[:SIGNATURE_TOKENS] for t in tokens]
    projection = signature_projection(np.bincount(np.concatenate(capped), minlength=words + 1))
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in capped])])
    signatures = content_signatures(np.concatenate(capped), offsets, projection)
    out = {}
    for packing in ("stream", "by_source", "similarity"):
        order = np.arange(len(docs)) if packing == "stream" else document_order(packing, domains, signatures, 0)
        doc_ids = np.repeat(order, lengths[order])  # [T] in packed order
        spans = [len(flat)]
        if packing == "by_source":
            spans = np.bincount(domains, weights=lengths, minlength=int(domains.max()) + 1).astype(np.int64)
            spans = spans[spans > 0]
        out[packing] = segment_continuity(doc_ids, domains[doc_ids], np.asarray(spans), seq_len, segment_len)
    return out
