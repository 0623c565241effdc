"""`ioe-train launch`: validate the config, then run the torchrun command that trains it.

Single node: `torchrun --standalone --nproc-per-node N`. Several nodes: the same command on every
node with `--nnodes N --rdzv-endpoint HOST:PORT` (torchrun's c10d rendezvous; no node rank needed;
see scripts/slurm_multinode.sbatch).

With seeds, the same config runs once per seed, in turn, each with `seed=N data.seed=N` in
`output_dir/seed_N`; every check runs before the first. A run whose final/model.pt is at its last
step is skipped, so rerunning the command resumes where it stopped.
"""

from __future__ import annotations

import os
import pickle
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ioe_train.config import ConfigError, TrainConfig, load_config
from ioe_train.data import check_mixture
from ioe_train.lock import check_run_dir_free


@dataclass
class LaunchOptions:
    config: Path
    overrides: list[str] = field(default_factory=list)
    nproc_per_node: int = 0  # 0: one per visible GPU, or 1 on CPU
    nnodes: str = "1"  # a count or "MIN:MAX" (elastic)
    rdzv_endpoint: str | None = None  # HOST:PORT of the c10d rendezvous (needed when nnodes != 1)
    rdzv_id: str = "ioe-train"  # the job's id, equal on every node
    dry_run: bool = False
    seeds: list[int] = field(default_factory=list)  # one run per seed in output_dir/seed_N; []: one run


def parse_seeds(text: str) -> list[int]:
    """"0,1,2", "0-2" or "0-2,5" -> [0, 1, 2(, 5)]; ValueError on anything else or a repeated seed."""
    seeds: list[int] = []
    for part in text.split(","):
        bounds = part.strip().split("-")
        if len(bounds) > 2 or not all(b.isdigit() for b in bounds) or int(bounds[-1]) < int(bounds[0]):
            raise ValueError(f"{part.strip()!r} is not a seed (N) or a range (N-M, N <= M)")
        seeds += range(int(bounds[0]), int(bounds[-1]) + 1)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{text!r}: a seed is repeated")
    return seeds


def seed_overrides(output_dir: str, seed: int) -> list[str]:
    """What `--seeds` appends to the overrides of seed N's run."""
    return [f"seed={seed}", f"data.seed={seed}", f"output_dir={Path(output_dir) / f'seed_{seed}'}"]


def check_data(cfg: TrainConfig) -> None:
    """Check the shards against the config from their manifests (no token data read): a bad path,
    a mixture name the data lacks or a model vocabulary below the tokenizer's fails here in one
    line, not inside 16 ranks."""
    if cfg.data.source != "memmap":
        return
    from pile_prep.reader import ShardDataset, ShardError

    found = {}
    for key, dirs in (("data.train_dirs", cfg.data.train_dirs), ("data.val_dirs", cfg.data.val_dirs)):
        if dirs:
            try:
                found[key] = ShardDataset(dirs, partial=cfg.data.partial)
            except ShardError as e:
                raise ConfigError(f"{key}: {e}") from None
    check_mixture(cfg.data, found["data.train_dirs"].source_names)
    vocab = cfg.model.arch().vocab_size
    for key, ds in found.items():
        if vocab < ds.vocab_size:
            raise ConfigError(f"model.vocab_size: {vocab} < the vocabulary of {key}' tokenizer "
                              f"({ds.vocab_size}): its ids would index past the embedding")  # fmt: skip


def missing_data(cfg: TrainConfig) -> list[str]:
    """`key: path` of every shard directory the config names that does not exist."""
    if cfg.data.source != "memmap":
        return []
    named = (("data.train_dirs", cfg.data.train_dirs), ("data.val_dirs", cfg.data.val_dirs))
    return [f"{key}: {d}" for key, dirs in named for d in dirs if not Path(d).is_dir()]


def nproc_per_node(opts: LaunchOptions) -> int:
    return opts.nproc_per_node or max(1, torch.cuda.device_count())


def torchrun_command(opts: LaunchOptions, overrides: list[str]) -> list[str]:
    nproc = nproc_per_node(opts)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if opts.nnodes == "1" and opts.rdzv_endpoint is None:
        cmd.append("--standalone")  # a local rendezvous on a free port
    else:
        if opts.rdzv_endpoint is None:
            raise ConfigError(f"--nnodes {opts.nnodes} needs --rdzv-endpoint HOST:PORT")
        cmd += [f"--nnodes={opts.nnodes}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={opts.rdzv_endpoint}", f"--rdzv-id={opts.rdzv_id}"]  # fmt: skip
    return cmd + ["-m", "ioe_train.train", str(opts.config), *overrides]


# CPU runs allocate the [B*S, 151936] logits and their gradient anew every step. glibc serves
# blocks that large with mmap and unmaps them on free, so every step page-faults ~100s of MB back
# in: keeping them in the heap made the tiny CPU config 2.5x faster (0.2k -> 0.5k tokens/s).
_CPU_MALLOC = "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295"


def torchrun_env(cfg: TrainConfig, nproc: int) -> dict[str, str]:
    """Environment the ranks need beyond ours (only what the user has not set already)."""
    env = {}
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if on_cpu and sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        env["GLIBC_TUNABLES"] = _CPU_MALLOC
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"  # torchrun's own default, which it would print a banner about
    return env


def final_step(output_dir: Path) -> int | None:
    """The step of output_dir/final/model.pt (None without one); memory-mapped, no weights read."""
    path = output_dir / "final" / "model.pt"
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except pickle.UnpicklingError:  # an older export (a dataclass inside): rerun, which re-exports
        return None


def launch(opts: LaunchOptions) -> int:
    """Validate, then run torchrun once, or once per seed in turn (or print the commands and, for
    one run, the resolved config); the exit code of the first failing run, else 0."""
    cfg = load_config(opts.config, opts.overrides)
    for key in ("seed", "data.seed"):
        if opts.seeds and any(o.startswith(f"{key}=") for o in opts.overrides):
            raise ConfigError(f"{key}: set per run by --seeds; drop the override")
    missing = missing_data(cfg) if opts.dry_run else []
    if missing:  # a preview of a config for data that lives elsewhere (a cluster's file system)
        print(f"dry run: not checked against the data, not found here: {'; '.join(missing)}", file=sys.stderr)
    else:
        check_data(cfg)
    overrides = [opts.overrides + seed_overrides(cfg.output_dir, s) for s in opts.seeds] or [opts.overrides]
    runs = [(load_config(opts.config, o), torchrun_command(opts, o)) for o in overrides]
    if "--standalone" in runs[0][1]:  # several nodes' launchers start at different times: rank 0 decides
        for run_cfg, _ in runs:
            check_run_dir_free(Path(run_cfg.output_dir))
    env = torchrun_env(cfg, nproc_per_node(opts))
    for run_cfg, cmd in runs:
        name = f"seed {run_cfg.seed}" if opts.seeds else run_cfg.output_dir
        if final_step(Path(run_cfg.output_dir)) == run_cfg.steps:
            print(f"{name}: finished ({run_cfg.output_dir}/final/model.pt is at step {run_cfg.steps}); skipped")
        elif opts.dry_run:
            print(shlex.join([f"{k}={v}" for k, v in env.items()] + cmd))
        else:
            code = subprocess.call(cmd, env={**os.environ, **env})
            if code:
                if opts.seeds:
                    print(f"seed {run_cfg.seed} failed (exit code {code}); rerun the command to resume",
                          file=sys.stderr)  # fmt: skip
                return code
    if opts.dry_run and not opts.seeds:
        print(cfg.to_yaml(), end="")
    return 0
