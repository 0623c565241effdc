"""pile-prep export megatron: read back by megatron-core's own IndexedDataset, token for token."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from pile_prep.cli import main as cli
from pile_prep.reader import ShardDataset
from pile_prep.tokenize import TokenizeOptions, tokenize


@pytest.mark.filterwarnings("ignore::UserWarning")  # megatron-core: "Transformer Engine ... not installed"
def test_megatron_reads_every_document_of_the_shards(sample_corpus, special_input, tmp_path):
    indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    dirs = [tmp_path / "a", tmp_path / "b"]  # two directories, read as one dataset
    for inputs, out in ((sample_corpus, dirs[0]), ([special_input], dirs[1])):
        tokenize(TokenizeOptions(inputs=[str(p) for p in inputs], output=out, workers=1,
                                 shard_bytes=30_000, progress=False))  # fmt: skip
    result = CliRunner().invoke(cli, ["export", "megatron", *map(str, dirs), "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    shards = ShardDataset(dirs)
    assert shards.num_shards > 3
    megatron = indexed_dataset.IndexedDataset(str(tmp_path / "m"))
    assert len(megatron) == shards.num_documents
    assert megatron.get_document_indices().tolist() == list(range(shards.num_documents + 1))
    for i, (tokens, _) in enumerate(shards.iter_documents()):
        got = megatron[i]
        assert got.dtype == np.int32 and got[-1] == shards.eos_id
        assert np.array_equal(got, tokens), i
    # Byte-identical for the same shards; a failed export leaves nothing behind.
    first = [(tmp_path / f"m.{ext}").read_bytes() for ext in ("bin", "idx")]
    CliRunner().invoke(cli, ["export", "megatron", *map(str, dirs), "-o", str(tmp_path / "m")])
    assert [(tmp_path / f"m.{ext}").read_bytes() for ext in ("bin", "idx")] == first
    result = CliRunner().invoke(cli, ["export", "megatron", str(dirs[0]), "-o", str(tmp_path / "no" / "m")])
    assert result.exit_code == 1 and result.output.startswith("Error: cannot write ")
    assert result.output.count("\n") == 1
