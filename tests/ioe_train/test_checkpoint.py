"""Checkpoint/resume through real `ioe-train launch` runs: torchrun, 2 gloo ranks, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ioe_train.config import load_config
from ioe_train.model import build_model

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def command(train_dir: Path, out: Path) -> list[str]:
    overrides = [f"data.train_dirs=[{train_dir}]", "data.val_dirs=[]", "eval.interval=0", "data.seq_len=16",
                 "micro_batch_size=2", "steps=8", "checkpoint.interval=2", "checkpoint.keep_last=2",
                 "logging.interval=1", "logging.expert_interval=0", f"output_dir={out}"]  # fmt: skip
    launch = [sys.executable, "-c", "from ioe_train.cli import main; main()", "launch", str(CONFIG)]
    return launch + overrides + ["--nproc-per-node", "2"]


def losses(out: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/total"], r["grad_norm"]) for r in records if "loss/total" in r]


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=300, check=True)


def test_kill_9_and_resume_reproduces_the_loss_curve_bitwise(shards, tmp_path):
    train_dir, _ = shards
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run(command(train_dir, whole), tmp_path / "whole.log")

    with open(tmp_path / "killed.log", "w") as f:
        proc = subprocess.Popen(command(train_dir, killed), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step_000004").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, mid-run
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "final").exists()

    run(command(train_dir, killed), tmp_path / "resumed.log")
    assert "resumed at step" in (tmp_path / "resumed.log").read_text()
    assert losses(killed) == losses(whole)  # every step, bit for bit
    assert [s for s, _, _ in losses(whole)] == list(range(1, 9))

    # keep-last-2, atomic names only; the export loads into an unsharded model, equal across runs
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["step_000006", "step_000008"]
    a = torch.load(whole / "final" / "model.pt", weights_only=False)
    b = torch.load(killed / "final" / "model.pt", weights_only=False)
    assert a["step"] == 8 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    model = build_model(load_config(whole / "config.yaml").model)
    model.load_state_dict(a["model"])
