from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ioe_train.cli import main
from ioe_train.launch import _CPU_MALLOC

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def data_overrides(shards) -> list[str]:
    train, val = shards
    return [f"data.train_dirs=[{train}]", f"data.val_dirs=[{val}]"]


def test_dry_run_prints_the_torchrun_command_and_resolved_config(shards, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("dry run spawned a process"))
    args = ["launch", str(CONFIG), *data_overrides(shards), "steps=7", "--nproc-per-node", "2", "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    command, resolved = result.output.split("\n", 1)
    # CPU ranks keep big blocks in glibc's heap (ioe_train/launch.py: 2.5x faster steps).
    assert shlex.split(command) == [f"GLIBC_TUNABLES={_CPU_MALLOC}", sys.executable, "-m",
                                    "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                                    "-m", "ioe_train.train", str(CONFIG), *data_overrides(shards),
                                    "steps=7"]  # fmt: skip
    assert "steps: 7\n" in resolved and "name: tiny_moe" in resolved


def test_dry_run_previews_a_config_whose_data_is_elsewhere(shards, tmp_path):
    shipped = CONFIG.parent / "qwen2_5_0_5b_moe_pile_pretrain_fsdp.yaml"
    args = ["launch", str(shipped), f"data.val_dirs=[{shards[1]},{tmp_path / 'val'}]", "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert ("not found here: data.train_dirs: /data/pile/tokens/train; "
            f"data.val_dirs: {tmp_path / 'val'}\n") in result.output  # fmt: skip
    assert "name: qwen2_5_moe" in result.output
    # without --dry-run the same config is refused before anything starts
    result = CliRunner().invoke(main, args[:-1])
    assert result.exit_code == 1 and "data.train_dirs: /data/pile/tokens/train: no such directory" in result.output


def test_multi_node_uses_c10d_rendezvous(shards):
    args = ["launch", str(CONFIG), *data_overrides(shards), "--nproc-per-node", "8", "--nnodes", "2",
            "--rdzv-endpoint", "node0:29500", "--rdzv-id", "job42", "--dry-run"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    command = shlex.split(result.output.split("\n", 1)[0])
    command = command[command.index("torch.distributed.run") - 2 :]
    assert command[3:8] == ["--nproc-per-node=8", "--nnodes=2", "--rdzv-backend=c10d",
                            "--rdzv-endpoint=node0:29500", "--rdzv-id=job42"]  # fmt: skip
    no_endpoint = ["launch", str(CONFIG), *data_overrides(shards), "--nnodes", "2", "--dry-run"]
    result = CliRunner().invoke(main, no_endpoint)
    assert result.exit_code != 0 and "needs --rdzv-endpoint" in result.output


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["optim.lr=fast"], "optim.lr: Value 'fast'"),
     (["data.train_dirs=[/nonexistent]"], "data.train_dirs: /nonexistent: no such directory"),
     (["on_nonfinite=ignore"], "on_nonfinite: 'ignore' is not one of"),
     (["data.mixture={Books3: 2.0}"], "data.mixture.Books3: not a pile_set_name of data.train_dirs (they hold ArXiv,"),
     (["model.vocab_size=151000"], "model.vocab_size: 151000 < the vocabulary of data.train_dirs' tokenizer (151665)"),
     (["data.seq_len=1024"], "data.seq_len: 1024 exceeds model.max_seq_len=512")],
)  # fmt: skip
def test_bad_config_fails_before_any_process_starts(shards, monkeypatch, overrides, message):
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("launched a bad config"))
    result = CliRunner().invoke(main, ["launch", str(CONFIG), *data_overrides(shards), *overrides])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1  # one line
    assert message in result.output


def test_launch_prints_only_its_own_lines_and_torchruns_banner(tiny_run):
    _, console = tiny_run  # `ioe-train launch` of the tiny config, 8 steps on 2 ranks
    ours = re.compile(r"tiny_moe: .* parameters, .*|step \d/8 \| .*|exported .* to .*")
    banner = re.compile(r"\**|Setting OMP_NUM_THREADS environment variable for each process .*")
    lines = console.splitlines()
    assert [line for line in lines if not ours.fullmatch(line) and not banner.fullmatch(line)] == []
    assert sum(line.startswith("step ") for line in lines) == 8 + 4  # losses, checkpoints
