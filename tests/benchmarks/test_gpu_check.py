"""benchmarks/gpu_check.py: its CPU dry run end to end (the command a GPU session runs), and a
wrong grouped kernel turned into the GROUPED_MM_FAILURES entry that keeps `auto` off it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
GRADS = {"output", "input", "experts.w_gate_up", "experts.w_down", "router.gate.weight"}


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_cpu_run_writes_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # A generous budget: on a loaded machine no row may be skipped for time.
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--budget-s", "900", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["environment"]["torch"] == torch.__version__ and data["environment"]["device"] == "cpu"
    assert "--quick" in data["environment"]["command"]
    cases = {c["case"]: c for c in data["parity"]}
    assert set(cases) == {"balanced", "3 experts without tokens"}
    assert cases["3 experts without tokens"]["tokens_per_expert"][5:] == [0.0, 0.0, 0.0]
    for case in cases.values():
        for path in ("grouped", "loop"):
            r = case["paths"][path]
            assert r["ok"] and r["finite"] and r["same_routing"] and r["dead_expert_nonzero_grads"] == 0, (path, r)
            assert set(r["rel_err"]) == GRADS and 0 < max(r["rel_err"].values()) <= 1e-2
    rows = data["train"]
    assert [r["model"] for r in rows] == ["moe", "dense", "ioe"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["finite"] for r in rows), rows
    assert data["learn"]["steps"] == 10 and data["learn"]["falling"] and data["learn"]["close"]
    assert data["failures"] == []

    md = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Environment", "## 1. Kernel parity", "## 2. Training step", "## 3. Learning", "## Verdict"):
        assert heading in md
    assert "| 3 experts without tokens | grouped | True |" in md and "- every check passed" in md


def test_wrong_grouped_kernel_fails_parity_and_names_the_table_entry(tmp_path, monkeypatch, one_thread):
    gpu_check = load_script(monkeypatch)
    real = torch._grouped_mm

    def off_by_one_percent(*args, **kwargs):
        return real(*args, **kwargs) * 1.02

    monkeypatch.setattr(torch, "_grouped_mm", off_by_one_percent)
    report = gpu_check.Report(tmp_path)
    gpu_check.run_parity(gpu_check.QUICK, torch.device("cpu"), report)
    for case in report.data["parity"]:
        assert not case["paths"]["grouped"]["ok"] and case["paths"]["loop"]["ok"]
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert f"add ('cpu', '{minor}') to ioe_train/moe/experts.py GROUPED_MM_FAILURES" in report.data["failures"][-1]
    assert "| balanced | grouped | False |" in (tmp_path / "gpu_check.md").read_text()
