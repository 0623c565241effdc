"""The Slurm / MI250X launch scripts: syntax, and the command they build (Slurm and ioe-train stubbed)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["scripts/rocm_env.sh", "scripts/launch_mi250x_fsdp_pretrain.sh", "scripts/slurm_multinode.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    subprocess.run(["bash", "-n", ROOT / script], check=True)


def sbatch(tmp_path: Path, gcds: int, *args: str) -> subprocess.CompletedProcess:
    """Run the sbatch file as Slurm would on a 2-node job whose srun shows `gcds` GCDs per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stubs = {
        "scontrol": 'printf "gpu-a\\ngpu-b\\n"',
        # srun: drop its options; Slurm sets the per-node visibility (also CUDA_VISIBLE_DEVICES)
        "srun": 'while [[ $1 == -* ]]; do shift; done\n'
                f'export ROCR_VISIBLE_DEVICES={",".join(map(str, range(gcds)))} CUDA_VISIBLE_DEVICES=0,1\n'
                'exec "$@"',
        # ioe-train: show what the ranks would inherit, then the real CLI
        "ioe-train": 'echo "env OMP=$OMP_NUM_THREADS ROCR=$ROCR_VISIBLE_DEVICES CUDA=${CUDA_VISIBLE_DEVICES-unset}'
                     ' HIP=${HIP_VISIBLE_DEVICES-unset} IB_DISABLE=${NCCL_IB_DISABLE-unset}"\n'
                     f'exec {sys.executable} -c "from ioe_train.cli import main; main()" "$@"',
    }  # fmt: skip
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "128",
           "SLURM_SUBMIT_DIR": str(ROOT), "HIP_VISIBLE_DEVICES": "3"}  # fmt: skip
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run(["bash", ROOT / "scripts/slurm_multinode.sbatch", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_sbatch_builds_a_two_node_hsdp_torchrun_with_the_rocm_environment(shards, tmp_path):
    config = ROOT / "configs" / "tiny_cpu.yaml"
    data = [f"data.train_dirs=[{shards[0]}]", f"data.val_dirs=[{shards[1]}]"]
    done = sbatch(tmp_path, 16, str(config), *data, "--dry-run")
    assert done.returncode == 0, done.stderr
    env, command, resolved = done.stdout.split("\n", 2)
    assert env == "env OMP=8 ROCR=" + ",".join(map(str, range(16))) + " CUDA=unset HIP=unset IB_DISABLE=unset"
    command = shlex.split(command)
    assert command[command.index("torch.distributed.run") + 1 :] == [
        "--nproc-per-node=16", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-a:29500",
        "--rdzv-id=4242", "-m", "ioe_train.train", str(config), "parallel.replicate_degree=2", *data]  # fmt: skip
    assert "replicate_degree: 2\n" in resolved


def test_sbatch_refuses_fewer_gcds_than_ranks_in_one_line(tmp_path):
    done = sbatch(tmp_path, 8, "config.yaml")
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr == ("error: ROCR_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 shows 8 GCDs to 16 ranks per node; "
                           "request one GCD per rank (sbatch --gpus-per-node=16)\n")  # fmt: skip
