"""Checkpoint/resume through real `ioe-train launch` runs: torchrun, 2 gloo ranks, kill -9."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from ioe_train.checkpoint import Checkpointer
from ioe_train.cli import main
from ioe_train.config import ConfigError, load_config
from ioe_train.lock import check_run_dir_free, lock_run_dir, run_dir_lock
from ioe_train.model import build_model
from ioe_train.optim import build_optimizer
from tests.ioe_train.conftest import launch_command, run_launch


def losses(out: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/total"], r["grad_norm"]) for r in records if "loss/total" in r]


def job_pids(root: int) -> list[int]:
    """`root` and all its descendants. torchrun starts each rank in its own session, so killing
    the launcher's process group would leave the ranks running: walk the parent links instead."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    pids, todo = [], [root]
    while todo:
        pids.append(todo.pop())
        todo += children.get(pids[-1], [])
    return pids


def is_dead(pid: int) -> bool:
    try:  # a zombie has no memory and no open files left, only its exit status
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_kill_9_of_every_process_during_an_async_save_and_resume_reproduce_the_loss_curve_bitwise(
        shards, tiny_run, tmp_path, monkeypatch):  # fmt: skip
    train_dir, _ = shards
    whole, _ = tiny_run  # checkpoints written synchronously
    killed = tmp_path / "killed"
    cmd = launch_command(train_dir, killed, "checkpoint.async_save=true")
    with open(tmp_path / "killed.log", "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    ckpts = killed / "checkpoints"

    def wait_for(path: Path) -> None:
        deadline = time.monotonic() + 240
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.005)

    wait_for(ckpts / "step_000002")
    pids = job_pids(proc.pid)
    assert len(pids) >= 4, pids  # launcher, torchrun, 2 ranks

    # A second job on the same output_dir is refused at once, naming the live holder (rank 0).
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("a second job started"))
    second = CliRunner().invoke(main, ["launch", *cmd[4:]])
    assert second.exit_code == 1, second.output
    holder = int(second.output.split(", pid ")[1].split(")")[0])
    assert f"is in use by another run (host {os.uname().nodename}, pid {holder})" in second.output
    assert holder in pids and holder not in (proc.pid, pids[1])

    wait_for(ckpts / "step_000004.tmp")  # the save of step 4 has begun; training goes on meanwhile
    for pid in pids:  # launcher, torchrun and every rank: no orphan may write on
        os.kill(pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 30  # SIGKILL is delivered at once but exiting takes a moment
    while not all(is_dead(pid) for pid in pids):
        assert time.monotonic() < deadline, [pid for pid in pids if not is_dead(pid)]
        time.sleep(0.01)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004.tmp"]
    assert not (killed / "final").exists()

    run_launch(cmd, tmp_path / "resumed.log")
    assert "resumed at step" in (tmp_path / "resumed.log").read_text()
    assert losses(killed) == losses(whole)  # every step, bit for bit
    assert [s for s, _, _ in losses(whole)] == list(range(1, 9))

    # keep-last-2, atomic names only (the last async save completed before exit); the export
    # loads into an unsharded model, equal across runs
    for out in whole, killed:
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000006", "step_000008"]
    a = torch.load(whole / "final" / "model.pt", weights_only=False)
    b = torch.load(killed / "final" / "model.pt", weights_only=False)
    assert a["step"] == 8 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    model = build_model(load_config(whole / "config.yaml").model)
    model.load_state_dict(a["model"])


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_held_run_dir_is_refused_naming_the_holder(tmp_path, one_process_group):
    out = tmp_path / "run"
    held = lock_run_dir(out)  # this process plays the live first job (flock: per open file)
    holder = f"{out} is in use by another run (host {os.uname().nodename}, pid {os.getpid()})"
    with pytest.raises(ConfigError, match=re.escape(holder)):
        with run_dir_lock(out, rank=0):
            pytest.fail("a second holder got the lock")
    with pytest.raises(ConfigError, match=re.escape(holder)):
        check_run_dir_free(out)  # the launcher's check
    held.close()  # as the OS does when the holder dies
    check_run_dir_free(out)
    with run_dir_lock(out, rank=0):
        assert (out / "run.lock").read_text() == f"host {os.uname().nodename}, pid {os.getpid()}\n"


class _RunsCode:
    """A pickle that calls os.mkdir(marker) when loaded: what a tampered checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("planted", ["train_state.pt", "rank_00000.pt", ".metadata"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(tiny_run, tmp_path, one_process_group, planted):
    whole, _ = tiny_run
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=2, rank=0, world_size=1)
    shutil.copytree(whole / "checkpoints" / "step_000008", ckpt.path(8))
    marker = tmp_path / "code_ran"
    with open(ckpt.path(8) / planted, "wb") as f:
        (pickle.dump if planted == ".metadata" else torch.save)(_RunsCode(marker), f)
    cfg = load_config(whole / "config.yaml")
    model = build_model(cfg.model)
    with pytest.raises(ConfigError, match=r"step_000008\S* holds objects other than tensors.*posix.mkdir"):
        ckpt.load(8, model, build_optimizer(model, cfg.optim, torch.device("cpu")))
    assert not marker.exists()
