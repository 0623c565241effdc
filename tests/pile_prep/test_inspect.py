"""inspect on shards made by the tokenize step: the facts, the table, decoding, JSON."""

from __future__ import annotations

import json
import shutil
import unicodedata

import numpy as np
import pytest
import zstandard
from click.testing import CliRunner

from pile_prep.cli import main
from pile_prep.inspect import format_summary, inspect_report, length_histogram, summarize
from pile_prep.reader import ShardDataset, ShardError
from pile_prep.sample import write_sample_corpus
from pile_prep.tokenize import TokenizeOptions, tokenize


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    inputs = write_sample_corpus(root / "in", num_files=1, docs_per_file=300, seed=1)
    out = root / "out"
    tokenize(TokenizeOptions(inputs=[str(inputs[0])], output=out, workers=1,
                             shard_bytes=50_000, progress=False))  # fmt: skip
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(inputs[0].read_bytes())
    return {"out": out, "records": [json.loads(x) for x in raw.decode().splitlines()]}


def test_facts_agree_with_the_documents(made):
    facts = summarize(ShardDataset(made["out"]))
    records = made["records"]
    lengths = np.array([len(d) for d, _ in ShardDataset(made["out"]).iter_documents()])
    assert facts["documents"] == len(records) == 300
    assert facts["tokens"] == lengths.sum() and facts["bytes"] == 4 * lengths.sum()
    assert facts["shards"] == len(list(made["out"].glob("*.bin")))
    s = facts["tokens_per_document"]
    assert (s["mean"], s["median"], s["max"], s["min"]) == (
        lengths.mean(), np.median(lengths), lengths.max(), lengths.min())  # fmt: skip
    assert s["p99"] == pytest.approx(np.percentile(lengths, 99))
    names = [r["meta"]["pile_set_name"] for r in records]
    by_source = {r["name"]: r for r in facts["sources"]}
    assert set(by_source) == set(names)
    for name, row in by_source.items():
        assert row["documents"] == names.count(name)
        assert row["tokens"] == sum(n for n, s in zip(lengths, names, strict=True) if s == name)
        assert row["share"] == pytest.approx(row["tokens"] / facts["tokens"])
    assert [r["tokens"] for r in facts["sources"]] == sorted(by_source[n]["tokens"]
                                                            for n in by_source)[::-1]  # fmt: skip
    assert sum(b["documents"] for b in facts["histogram"]) == 300
    assert facts["tokenizer"]["vocab_size"] == 151665


def test_histogram_bins_are_powers_of_two():
    assert length_histogram(np.array([1, 2, 3, 4, 7, 8, 100])) == [
        {"min": 1, "max": 1, "documents": 1},
        {"min": 2, "max": 3, "documents": 2},
        {"min": 4, "max": 7, "documents": 2},
        {"min": 8, "max": 15, "documents": 1},
        {"min": 16, "max": 31, "documents": 0},
        {"min": 32, "max": 63, "documents": 0},
        {"min": 64, "max": 127, "documents": 1},
    ]
    assert length_histogram(np.array([], np.int64)) == []


def test_summary_reads_only_the_index(made, tmp_path):
    blank = shutil.copytree(made["out"], tmp_path / "blank")
    for b in blank.glob("*.bin"):  # zeroed token data of the right size
        b.write_bytes(bytes(b.stat().st_size))
    assert summarize(ShardDataset(blank)) == summarize(ShardDataset(made["out"])) | {
        "dirs": [str(blank)]
    }


def test_table_and_histogram_text(made):
    facts = summarize(ShardDataset(made["out"]))
    text = format_summary(facts)
    assert f"{facts['tokens']:,} tokens" in text and f"{facts['documents']:,} documents" in text
    for row in facts["sources"]:
        assert f"{row['tokens']:,}" in text and row["name"] in text
    assert "Total" in text and "100.00%" in text
    assert "█" in text and "vocab size 151,665" in text


def test_decode_and_tokens(made):
    text = inspect_report(made["out"], decode=2, docs=[-1], show_tokens=True)
    for i in (0, 1, 299):
        rec = made["records"][i]
        assert f"document {i:,} · {rec['meta']['pile_set_name']}" in text
        assert unicodedata.normalize("NFC", rec["text"]) + "<|endoftext|>" in text
    assert "151643 '<|endoftext|>'" in text
    first = ShardDataset(made["out"]).document(0)
    assert text.count(f"{first[0]} ") >= 1


def test_json(made):
    result = CliRunner().invoke(main, ["inspect", str(made["out"]), "--json", "--doc", "5"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["documents"] == 300 and facts["fingerprint"].startswith("sha256:")
    (doc,) = facts["decoded"]
    rec = made["records"][5]
    assert doc["index"] == 5 and doc["source"] == rec["meta"]["pile_set_name"]
    assert doc["text"] == unicodedata.normalize("NFC", rec["text"]) + "<|endoftext|>"
    assert "pieces" not in doc
    plain = json.loads(CliRunner().invoke(main, ["inspect", str(made["out"]), "--json"]).output)
    assert "decoded" not in plain and plain == {k: v for k, v in facts.items() if k != "decoded"}


def test_errors(made, tmp_path):
    gone = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope")])
    assert gone.exit_code == 1 and "no such directory" in gone.output
    far = CliRunner().invoke(main, ["inspect", str(made["out"]), "--doc", "300"])
    assert far.exit_code == 1 and "document 300 out of range [0, 300)" in far.output
    other = shutil.copytree(made["out"], tmp_path / "other")
    m = json.loads((other / "manifest.json").read_text())
    m["tokenizer"]["name"] = "hf:/models/mine"
    (other / "manifest.json").write_text(json.dumps(m))
    assert "Total" in inspect_report(other)  # the summary needs no tokenizer
    with pytest.raises(ShardError, match="--tokenizer PATH"):
        inspect_report(other, decode=1)
    bad_tokenizer = CliRunner().invoke(main, ["inspect", str(other), "--decode", "1", "--tokenizer",
                                              str(tmp_path / "no-such-tokenizer")])  # fmt: skip
    assert bad_tokenizer.exit_code == 1 and "unknown tokenizer" in bad_tokenizer.output
    assert "Traceback" not in bad_tokenizer.output
