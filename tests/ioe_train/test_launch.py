from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ioe_train.cli import main
from ioe_train.config import load_config
from ioe_train.launch import _CPU_MALLOC
from ioe_train.runs import read_metrics
from tests.ioe_train.conftest import launch_command, run_launch

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def data_overrides(shards) -> list[str]:
    train, val = shards
    return [f"data.train_dirs=[{train}]", f"data.val_dirs=[{val}]"]


def test_dry_run_prints_the_torchrun_command_and_resolved_config(shards, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("dry run spawned a process"))
    args = ["launch", str(CONFIG), *data_overrides(shards), "steps=7", "--nproc-per-node", "2", "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    command, resolved = result.output.split("\n", 1)
    # CPU ranks keep big blocks in glibc's heap (ioe_train/launch.py: 2.5x faster steps).
    assert shlex.split(command) == [f"GLIBC_TUNABLES={_CPU_MALLOC}", "OMP_NUM_THREADS=1", sys.executable, "-m",
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


def test_launch_prints_only_its_own_lines(tiny_run):
    _, console = tiny_run  # `ioe-train launch` of the tiny config, 8 steps on 2 ranks
    ours = re.compile(r"tiny_moe: .* parameters, .*|step \d/8 \| .*|exported .* to .*")
    lines = console.splitlines()
    assert [line for line in lines if not ours.fullmatch(line)] == []  # (no torchrun OMP banner)
    assert sum(line.startswith("step ") for line in lines) == 8 + 4  # losses, checkpoints


def test_seeds_dry_run_prints_one_command_per_seed_after_checking_once(shards, monkeypatch, tmp_path):
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("dry run spawned a process"))
    out = tmp_path / "arm"
    args = ["launch", str(CONFIG), *data_overrides(shards), f"output_dir={out}", "--seeds", "0-1,5", "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    commands = [shlex.split(line) for line in result.output.splitlines()]
    assert [c[c.index("ioe_train.train") + 1 :] for c in commands] == [
        [str(CONFIG), *data_overrides(shards), f"output_dir={out}", f"seed={s}", f"data.seed={s}",
         f"output_dir={out / f'seed_{s}'}"] for s in (0, 1, 5)]  # fmt: skip
    for bad, message in ((["--seeds", "2-1"], "'2-1' is not a seed"), (["--seeds", "0,0"], "a seed is repeated"),
                         (["--seeds", "0,1", "data.seed=3"], "data.seed: set per run by --seeds")):  # fmt: skip
        result = CliRunner().invoke(main, ["launch", str(CONFIG), *data_overrides(shards), *bad, "--dry-run"])
        assert result.exit_code != 0 and message in result.output, result.output


def test_a_failing_seed_stops_the_launch_naming_it(shards, monkeypatch, tmp_path):
    calls = []

    def call(cmd, env):  # seed 1's run fails: seed 2 must not start
        calls.append(cmd[-1])
        return 3 if cmd[-1].endswith("seed_1") else 0

    monkeypatch.setattr(subprocess, "call", call)
    args = ["launch", str(CONFIG), *data_overrides(shards), f"output_dir={tmp_path}", "--seeds", "0-2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3 and "seed 1 failed (exit code 3)" in result.output
    assert calls == [f"output_dir={tmp_path / 'seed_0'}", f"output_dir={tmp_path / 'seed_1'}"]


def test_seeds_train_one_run_each_and_a_rerun_skips_finished_ones(shards, tmp_path):
    cmd = launch_command(shards[0], tmp_path / "arm", "steps=2", "--seeds", "0,1")
    run_launch(cmd, tmp_path / "first.log")
    configs = [load_config(tmp_path / "arm" / f"seed_{s}" / "config.yaml") for s in (0, 1)]
    assert [(c.seed, c.data.seed, c.output_dir) for c in configs] == [
        (s, s, str(tmp_path / "arm" / f"seed_{s}")) for s in (0, 1)]  # fmt: skip
    first_losses = [[r["loss/total"] for r in read_metrics(Path(c.output_dir)) if "loss/total" in r] for c in configs]
    assert len(first_losses[0]) == 2 and first_losses[0] != first_losses[1]
    assert run_launch(cmd, tmp_path / "again.log").splitlines() == [
        f"seed {s}: finished ({tmp_path / 'arm' / f'seed_{s}'}/final/model.pt is at step 2); skipped" for s in (0, 1)]


def test_a_set_missing_tasks_is_refused_unless_data_partial(tmp_path, monkeypatch):
    from ioe_train.data import MemmapLoader
    from pile_prep.sample import write_sample_corpus
    from pile_prep.tokenize import TokenizeOptions, tokenize

    inputs = [str(p) for p in write_sample_corpus(tmp_path / "in", num_files=2, docs_per_file=40, seed=3)]
    tasks = [tmp_path / f"t{t}" for t in range(3)]
    for t, out in enumerate(tasks):
        tokenize(TokenizeOptions(inputs=inputs, output=out, workers=1, shard_bytes=5_000, num_tasks=3,
                                 task_index=t, progress=False))  # fmt: skip
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: 0)
    given = [f"data.train_dirs=[{tasks[0]},{tasks[2]}]", f"data.val_dirs=[{tasks[1]}]"]
    result = CliRunner().invoke(main, ["launch", str(CONFIG), *given])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "data.train_dirs: " in result.output and "task(s) 1 of its 3-task job are not given" in result.output
    assert CliRunner().invoke(main, ["launch", str(CONFIG), *given, "data.partial=true"]).exit_code == 0
    cfg = load_config(CONFIG, [*given, "data.partial=true", "data.seq_len=16"])
    loader = MemmapLoader(cfg.data, 2, 0, 1, tmp_path / "cache")
    assert loader.ds.num_shards == len(list(tasks[0].glob("*.bin"))) + len(list(tasks[2].glob("*.bin")))
