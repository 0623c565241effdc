"""Tokenized sample shards that the trainer tests read (made once per session)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pile_prep.sample import write_sample_corpus
from pile_prep.tokenize import TokenizeOptions, tokenize


def make_shards(root: Path, docs_per_file: int = 300) -> tuple[Path, Path]:
    """(train, val) shard directories of the synthetic sample corpus; train has several shards."""
    paths = write_sample_corpus(root / "raw", num_files=2, docs_per_file=docs_per_file, seed=0)
    train, val = root / "train", root / "val"
    tokenize(TokenizeOptions(inputs=[str(p) for p in paths[:2]], output=train, workers=1,
                             shard_bytes=1 << 16, progress=False))  # fmt: skip
    tokenize(TokenizeOptions(inputs=[str(paths[2])], output=val, workers=1, progress=False))
    return train, val


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="session")
def domain_shards(tmp_path_factory) -> tuple[Path, Path]:
    """(train, val) shard dirs of the domains proxy, word tokenizer (tests/ioe_train/proxy.py)."""
    from tests.ioe_train.proxy import make_domain_shards

    return make_domain_shards(tmp_path_factory.mktemp("domains"))


@pytest.fixture(scope="session")
def domain_windows(domain_shards) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) windows [N, 65] of the domains proxy."""
    from tests.ioe_train.proxy import windows

    return windows(domain_shards[0]), windows(domain_shards[1])


CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def launch_command(train_dir: Path, out: Path, *extra: str) -> list[str]:
    """`ioe-train launch` of 8 tiny steps on 2 CPU ranks, checkpointing every 2 steps."""
    overrides = [f"data.train_dirs=[{train_dir}]", "data.val_dirs=[]", "eval.interval=0", "data.seq_len=16",
                 "micro_batch_size=2", "steps=8", "checkpoint.interval=2", "checkpoint.keep_last=2",
                 "logging.interval=1", "logging.expert_interval=0", f"output_dir={out}", *extra]  # fmt: skip
    launch = [sys.executable, "-c", "from ioe_train.cli import main; main()", "launch", str(CONFIG)]
    return launch + overrides + ["--nproc-per-node", "2"]


def run_launch(cmd: list[str], log: Path) -> str:
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=300, check=True)
    return log.read_text()


@pytest.fixture(scope="session")
def tiny_run(shards, tmp_path_factory) -> tuple[Path, str]:
    """(output_dir, console output) of one uninterrupted `launch_command` run."""
    root = tmp_path_factory.mktemp("tiny_run")
    return root / "out", run_launch(launch_command(shards[0], root / "out"), root / "console.log")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add sync cost (and thrash when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
