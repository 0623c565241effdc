"""CPU throughput of the tiny configs: MoE vs its dense twin at equal active parameters, and the
memmap data loader's rate vs what the trainer consumes. Ratios are measured in the same run.

    python benchmarks/bench_train.py [--steps 10] [--data SHARD_DIR]

One process, world size 1 (gloo), configs/tiny_cpu.yaml and configs/tiny_cpu_dense.yaml.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from pathlib import Path

import click
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from ioe_train.config import load_config
from ioe_train.data import MemmapLoader
from ioe_train.model import build_model, count_params
from ioe_train.optim import build_optimizer
from ioe_train.parallelize import parallelize
from ioe_train.train import materialize, train_step
from pile_prep.sample import write_sample_corpus
from pile_prep.tokenize import TokenizeOptions, tokenize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def trainer_tokens_per_s(config: Path, data: Path, steps: int, tmp: Path) -> tuple[float, int]:
    cfg = load_config(config, [f"data.train_dirs=[{data}]", "data.val_dirs=[]", "eval.interval=0"])
    device = torch.device("cpu")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(cfg.model)
    _, active = count_params(model)
    parallelize(model, cfg.parallel, init_device_mesh("cpu", (1,)), device)
    materialize(model, cfg, device)  # the trainer's own: no random op on a CPU DTensor
    optimizer = build_optimizer(model, cfg.optim, device)
    batches = iter(MemmapLoader(cfg.data, cfg.micro_batch_size, 0, 1, tmp))
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            start = time.perf_counter()
        train_step(model, batches, cfg, device, want_experts=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tokens = steps * cfg.grad_accum_steps * cfg.micro_batch_size * cfg.data.seq_len
    return tokens / (time.perf_counter() - start), active


def loader_tokens_per_s(config: Path, data: Path, tmp: Path, batches: int = 2000) -> float:
    cfg = load_config(config, [f"data.train_dirs=[{data}]", "data.val_dirs=[]", "eval.interval=0"])
    loader = MemmapLoader(cfg.data, cfg.micro_batch_size, 0, 1, tmp)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * cfg.micro_batch_size * cfg.data.seq_len / (time.perf_counter() - start)


@click.command()
@click.option("--steps", default=10, show_default=True, help="Timed optimizer steps per model.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="A `pile-prep tokenize` output dir; default: the sample corpus, tokenized here.")
def main(steps: int, data: Path | None) -> None:
    torch.set_num_threads(1)  # one rank's share of a 2-core machine running 2 ranks
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if data is None:
            paths = write_sample_corpus(tmp / "raw", num_files=2, docs_per_file=300)
            data = tmp / "train"
            tokenize(TokenizeOptions(inputs=[str(p) for p in paths[:2]], output=data, workers=1, progress=False))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            moe, moe_active = trainer_tokens_per_s(CONFIGS / "tiny_cpu.yaml", data, steps, tmp)
            dense, dense_active = trainer_tokens_per_s(CONFIGS / "tiny_cpu_dense.yaml", data, steps, tmp)
            loader = loader_tokens_per_s(CONFIGS / "tiny_cpu.yaml", data, tmp)
        finally:
            dist.destroy_process_group()
    print(f"tiny MoE   : {moe:9.0f} tokens/s  ({moe_active / 1e6:.3f}M active params)")
    print(f"tiny dense : {dense:9.0f} tokens/s  ({dense_active / 1e6:.3f}M active params)")
    print(f"MoE / dense throughput at equal active params: {moe / dense:.2f}x")
    print(f"data loader: {loader:9.0f} tokens/s = {loader / moe:.0f}x what the MoE trainer consumes")


if __name__ == "__main__":
    main()
