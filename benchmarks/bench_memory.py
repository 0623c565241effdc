"""Peak memory per rank of one training step, measured vs `ioe-train plan`'s prediction.

    python benchmarks/bench_memory.py [--ranks 2] [--micro-batches 1 2] [--seq-len 2048]

The shipped 0.5B MoE config scaled to 2 layers at full width (D 896, H 4864, V 151,936), fp32
on CPU, gloo ranks (one thread each), through the trainer's own build / parallelize /
materialize / optimizer. Each row is a fresh set of processes: AdamW's states are created first,
then the peak resident set (VmHWM, reset via /proc/self/clear_refs) of one forward + backward +
optimizer step is read per rank, minus the resident set before the model was built.

Rows: top-k and IoE with the fused chunked output + cross-entropy ("fused", what the trainer
runs), and top-k with the full [B, S, V] logits and F.cross_entropy ("logits", the trainer before
the change) for the before/after. Linux only (/proc).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from ioe_train.config import load_config
from ioe_train.loss import token_ce_sum
from ioe_train.model import build_model
from ioe_train.optim import build_optimizer
from ioe_train.parallelize import parallelize
from ioe_train.plan import GIB, memory_per_rank
from ioe_train.train import materialize

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen2_5_0_5b_moe_pile_pretrain_fsdp.yaml"


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _overrides(router: str, micro_batch: int, seq_len: int) -> list[str]:
    return ["model.num_layers=2", f"model.moe.router={router}", "parallel.mixed_precision=fp32",
            "parallel.activation_checkpointing=none", f"micro_batch_size={micro_batch}", "grad_accum_steps=1",
            f"data.seq_len={seq_len}", "data.train_dirs=[unused]", "eval.interval=0", "device=cpu"]  # fmt: skip


def _rank(rank: int, world: int, port: int, router: str, micro_batch: int, seq_len: int, path: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(CONFIG, _overrides(router, micro_batch, seq_len))
    device = torch.device("cpu")
    base = _status_kib("VmRSS")
    with torch.device("meta"):
        model = build_model(cfg.model)
    parallelize(model, cfg.parallel, init_device_mesh("cpu", (world,)), device)
    materialize(model, cfg, device)
    optimizer = build_optimizer(model, cfg.optim, device)
    for p in model.parameters():  # AdamW's states exist in every step after the first
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 151_643, (micro_batch, seq_len + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if path == "fused":
        ce, router_loss, aux_loss = model(x, y)
    else:
        logits, router_loss, aux_loss = model(x)
        ce = token_ce_sum(logits, y)
        del logits
    (ce / y.numel() + router_loss + 0.01 * aux_loss).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out.put((rank, (_status_kib("VmHWM") - base) / 2**20))
    dist.destroy_process_group()


def measure(router: str, micro_batch: int, seq_len: int, path: str, world: int) -> float:
    """The largest per-rank peak (GiB) over the ranks of one step."""
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, router, micro_batch, seq_len, path, out))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"{router} mb {micro_batch} {path}: a rank failed")
    return max(out.get()[1] for _ in range(world))


def predicted(router: str, micro_batch: int, seq_len: int, world: int) -> float:
    cfg = load_config(CONFIG, _overrides(router, micro_batch, seq_len))
    with torch.device("meta"):
        model = build_model(cfg.model)
    return memory_per_rank(cfg, model, world, 4, micro_batch)["peak"] / GIB


@click.command()
@click.option("--ranks", default=2, show_default=True)
@click.option("--micro-batches", multiple=True, type=int, default=(1, 2), show_default=True)
@click.option("--seq-len", default=2048, show_default=True)
def main(ranks: int, micro_batches: tuple[int, ...], seq_len: int) -> None:
    rows = [(r, b, "fused") for b in micro_batches for r in ("topk", "ioe")]
    rows += [("topk", b, "logits") for b in micro_batches]
    print(f"2 layers at Qwen2.5-0.5B width, S {seq_len}, fp32, {ranks} gloo ranks; GiB per rank")
    print("| router | micro-batch | output + loss | measured | predicted | predicted / measured |")
    print("|---|---|---|---|---|---|")
    peaks = {}
    for router, b, path in rows:
        got = measure(router, b, seq_len, path, ranks)
        peaks[router, b, path] = got
        if path == "fused":  # the planner models the trainer's path only
            want = predicted(router, b, seq_len, ranks)
            print(f"| {router} | {b} | {path} | {got:.2f} | {want:.2f} | {want / got:.2f} |", flush=True)
        else:
            print(f"| {router} | {b} | {path} | {got:.2f} | – | – |", flush=True)
    for b in micro_batches:
        print(f"micro-batch {b}: ioe / topk peak {peaks['ioe', b, 'fused'] / peaks['topk', b, 'fused']:.2f} "
              f"(target <= 1.5); fused / logits (top-k) "
              f"{peaks['topk', b, 'fused'] / peaks['topk', b, 'logits']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
