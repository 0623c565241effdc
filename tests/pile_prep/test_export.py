"""pile-prep export megatron: read back by megatron-core's own IndexedDataset, token for token."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

from pile_prep.cli import main as cli
from pile_prep.export import ExportError, export_megatron
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
    CliRunner().invoke(cli, ["export", "megatron", *map(str, dirs), "-o", str(tmp_path / "m"), "--overwrite"])
    assert [(tmp_path / f"m.{ext}").read_bytes() for ext in ("bin", "idx")] == first
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(cli, ["export", "megatron", str(dirs[0]), "-o", str(tmp_path / "file" / "m")])
    assert result.exit_code == 1 and result.output.startswith("Error: cannot write ")
    assert result.output.count("\n") == 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory, sample_corpus):
    out = tmp_path_factory.mktemp("export") / "shards"
    tokenize(TokenizeOptions(inputs=[str(sample_corpus[0])], output=out, workers=1,
                             shard_bytes=30_000, progress=False))  # fmt: skip
    return out


def test_export_makes_parents_and_refuses_an_existing_prefix(shards, tmp_path):
    prefix = tmp_path / "new" / "deeper" / "m"
    assert export_megatron([shards], prefix).documents == ShardDataset(shards).num_documents
    first = prefix.with_suffix(".bin").read_bytes()
    with pytest.raises(ExportError, match=r"m.bin and .*m.idx exist\(s\): pass --overwrite"):
        export_megatron([shards], prefix)
    prefix.with_suffix(".bin").write_bytes(b"old")
    result = CliRunner().invoke(cli, ["export", "megatron", str(shards), "-o", str(prefix)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert prefix.with_suffix(".bin").read_bytes() == b"old"
    export_megatron([shards], prefix, overwrite=True)
    assert prefix.with_suffix(".bin").read_bytes() == first


def test_export_leaves_no_temp_file_on_any_failure(shards, tmp_path, monkeypatch):
    import pile_prep.export as export

    def interrupted(ds, out):
        out.write(b"x" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_write_idx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_megatron([shards], tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_on_a_read_only_target_is_one_line(shards, tmp_path, monkeypatch):
    # What a read-only mount does: every write and every unlink fails with EROFS.
    import errno
    import pathlib

    import pile_prep.export as export

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    monkeypatch.setattr(export.os, "replace", erofs)
    monkeypatch.setattr(pathlib.Path, "unlink", erofs)
    result = CliRunner().invoke(cli, ["export", "megatron", str(shards), "-o", str(tmp_path / "m")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: cannot write ") and "Read-only file system" in result.output
    assert result.output.count("\n") == 1


def test_next_export_removes_a_killed_exports_temp_files(shards, tmp_path):
    import fcntl

    dead = [tmp_path / "m.bin.tmp-4194305", tmp_path / "m.idx.tmp-4194305"]  # kill -9 debris
    for p in dead:
        p.write_bytes(b"half an export")
    live = tmp_path / "m.bin.tmp-1"  # a running export's: it holds the lock
    live.write_bytes(b"being written")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        export_megatron([shards], tmp_path / "m")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.bin.tmp-1", "m.idx"]
