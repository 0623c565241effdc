"""`pile-prep inspect`: what is in a shard dataset, readable in seconds.

The summary reads manifests and index files only (document lengths are differences of the
index offsets); token data is touched only for the documents asked to be decoded, and the
tokenizer is loaded only then.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pile_prep.reader import ShardDataset

_BLOCKS = " ▏▎▍▌▋▊▉█"  # eighths of a character cell
_BAR_WIDTH = 40
_LINE_WIDTH = 100


def summarize(ds: ShardDataset) -> dict[str, Any]:
    """The dataset's facts as plain JSON-able values."""
    lengths = ds.document_lengths()  # [N] tokens per document, EOS included
    stats = {"mean": 0.0, "median": 0.0, "p99": 0.0, "min": 0, "max": 0}
    if len(lengths):
        stats = {
            "mean": float(lengths.mean()),
            "median": float(np.median(lengths)),
            "p99": float(np.percentile(lengths, 99)),
            "min": int(lengths.min()),
            "max": int(lengths.max()),
        }
    sources = [
        {
            "name": name,
            "tokens": t["tokens"],
            "documents": t["documents"],
            "share": t["tokens"] / ds.num_tokens if ds.num_tokens else 0.0,
            "mean_tokens": t["tokens"] / t["documents"] if t["documents"] else 0.0,
        }
        for name, t in sorted(ds.source_totals.items(), key=lambda kv: (-kv[1]["tokens"], kv[0]))
    ]
    return {
        "dirs": [str(d) for d in ds.dirs],
        "shards": ds.num_shards,
        "tokens": ds.num_tokens,
        "documents": ds.num_documents,
        "bytes": 4 * ds.num_tokens,
        "fingerprint": ds.fingerprint,
        "tokenizer": ds.tokenizer,
        "skipped_empty": sum(m["totals"].get("skipped_empty", 0) for m in ds.manifests),
        "blank_lines": sum(m["totals"].get("blank_lines", 0) for m in ds.manifests),
        "bad_lines": sum(m["totals"].get("bad_lines", 0) for m in ds.manifests),
        "tokens_per_document": stats,
        "sources": sources,
        "histogram": length_histogram(lengths),
    }


def length_histogram(lengths: np.ndarray) -> list[dict[str, int]]:
    """Documents per power-of-two length bin [2^k, 2^(k+1)), from the shortest to the longest."""
    if not len(lengths):
        return []
    k = np.floor(np.log2(lengths)).astype(np.int64)  # lengths >= 1: each holds its EOS
    counts = np.bincount(k)
    lo = int(k.min())
    return [{"min": 2**b, "max": 2 ** (b + 1) - 1, "documents": int(counts[b])}
            for b in range(lo, len(counts))]  # fmt: skip


def _bar(fraction: float, width: int = _BAR_WIDTH) -> str:
    eighths = round(fraction * width * 8)
    return "█" * (eighths // 8) + (_BLOCKS[eighths % 8] if eighths % 8 else "")


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_summary(facts: dict[str, Any]) -> str:
    t, s = facts["tokenizer"], facts["tokens_per_document"]
    lines = [
        f"{', '.join(facts['dirs'])}",
        f"  {facts['shards']:,} shards, {facts['tokens']:,} tokens ({_count(facts['tokens'])}, "
        f"{_count(facts['bytes'])}B), {facts['documents']:,} documents",
        f"  tokens/document: mean {s['mean']:,.1f}, median {s['median']:,.0f}, "
        f"p99 {s['p99']:,.0f}, max {s['max']:,}",
        f"  tokenizer {t['name']}: vocab size {t['vocab_size']:,}, EOS {t['eos_id']}, "
        f"{t['fingerprint'][:23]}…",
        f"  skipped at tokenize: {facts['skipped_empty']:,} empty documents, "
        f"{facts['blank_lines']:,} blank lines, {facts['bad_lines']:,} bad lines",
        f"  data fingerprint {facts['fingerprint']}",
        "",
    ]
    width = max([len("Source")] + [len(r["name"]) for r in facts["sources"]])
    lines.append(f"  {'Source':<{width}} {'Tokens':>15} {'Docs':>12} {'Share':>7} {'Tok/doc':>10}")
    lines.append("  " + "─" * (width + 48))
    for r in facts["sources"]:
        lines.append(f"  {r['name']:<{width}} {r['tokens']:>15,} {r['documents']:>12,} "
                     f"{100 * r['share']:>6.2f}% {r['mean_tokens']:>10,.1f}")  # fmt: skip
    lines.append("  " + "─" * (width + 48))
    mean = facts["tokens"] / facts["documents"] if facts["documents"] else 0.0
    lines.append(f"  {'Total':<{width}} {facts['tokens']:>15,} {facts['documents']:>12,} "
                 f"{100.0 if facts['tokens'] else 0.0:>6.2f}% {mean:>10,.1f}")  # fmt: skip
    if facts["histogram"]:
        lines += ["", "  Document length (tokens, EOS included)"]
        top = max(b["documents"] for b in facts["histogram"])
        for b in facts["histogram"]:
            share = b["documents"] / facts["documents"]
            label = f"{b['min']:,}–{b['max']:,}"
            lines.append(f"  {label:>17} │{_bar(b['documents'] / top):<{_BAR_WIDTH}} "
                         f"{b['documents']:>10,} {100 * share:5.1f}%")  # fmt: skip
    return "\n".join(lines)


def document_facts(
    ds: ShardDataset, tok: Any, indices: Sequence[int], show_tokens: bool = False
) -> list[dict[str, Any]]:
    """Documents `indices` decoded: index, source, tokens, text, and (id, piece) pairs if asked."""
    docs = []
    for i in indices:
        ids = ds.document(i)
        doc = {"index": i, "source": ds.document_source(i), "tokens": len(ids),
               "text": tok.decode(ids.tolist())}  # fmt: skip
        if show_tokens:
            doc["pieces"] = [[int(t), tok.token_bytes(int(t)).decode("utf-8", errors="replace")]
                             for t in ids]  # fmt: skip
        docs.append(doc)
    return docs


def format_documents(docs: list[dict[str, Any]]) -> str:
    out = []
    for d in docs:
        head = f"── document {d['index']:,} · {d['source']} · {d['tokens']:,} tokens "
        out += [head + "─" * max(0, _LINE_WIDTH - len(head)), d["text"]]
        if "pieces" in d:
            out.append("")
            line = ""
            for t, piece in d["pieces"]:
                pair = f"{t} {piece!r}"
                if line and len(line) + 2 + len(pair) > _LINE_WIDTH:
                    out.append(line)
                    line = ""
                line = f"{line}  {pair}" if line else pair
            out.append(line)
        out.append("")
    return "\n".join(out)


def inspect_report(
    dirs: str | Path | Sequence[str | Path],
    decode: int = 0,
    docs: Sequence[int] = (),
    show_tokens: bool = False,
    tokenizer: str | None = None,
    as_json: bool = False,
    partial: bool = False,
) -> str:
    """What `pile-prep inspect` prints: the summary, then the first `decode` documents and `docs`.

    Raises ShardError (unreadable dataset or wrong tokenizer) or IndexError (no such document).
    """
    ds = ShardDataset(dirs, partial=partial)
    facts = summarize(ds)
    if show_tokens and not decode and not docs:
        decode = 1  # --tokens alone: show the first document
    indices = list(range(min(decode, ds.num_documents))) + list(docs)
    indices = [ds.document_index(i) for i in indices]  # IndexError before the tokenizer loads
    decoded = []
    if indices:
        decoded = document_facts(ds, ds.load_tokenizer(tokenizer), indices, show_tokens)
    if as_json:
        return json.dumps({**facts, "decoded": decoded} if decoded else facts, indent=1,
                          ensure_ascii=False)  # fmt: skip
    text = format_summary(facts)
    return text + ("\n\n" + format_documents(decoded) if decoded else "")
