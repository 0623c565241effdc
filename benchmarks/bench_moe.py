"""Forward+backward time of the MoE layer against a dense SwiGLU of the same active FLOPs and a
naive loop-over-experts MoE, all measured in one run.

    python benchmarks/bench_moe.py            # CPU (fp32), then CUDA (bf16) if available

T tokens, D model dim, E experts, K experts per token. Defaults: T = 8192, D = 896 (Qwen2.5-0.5B),
dense hidden 4864, top-2 of 8 experts of hidden 2432: the MoE and the dense MLP do the same
matmul FLOPs per token. The router starts random, so routing is close to balanced.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ioe_train.moe import MoE, MoEConfig, expert_path, swiglu_mlp
from ioe_train.moe.experts import swiglu


@dataclass
class Shape:
    tokens: int
    dim: int
    dense_hidden: int
    num_experts: int
    top_k: int


def mixtral_loop(moe: MoE, x: Tensor) -> Tensor:
    """The usual baseline: per expert, find its tokens in the unsorted batch, run, index_add back."""
    b, s, d = x.shape
    x = x.reshape(b * s, d)  # [T, D]
    _, _, weights, indices = moe.router.route(x)  # [T, K], [T, K]
    out = torch.zeros_like(x)
    for e in range(moe.cfg.num_experts):
        token, slot = torch.where(indices == e)
        y = swiglu(x[token] @ moe.experts.w_gate_up[e]) @ moe.experts.w_down[e]
        out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
    return out.view(b, s, d)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fns: dict[str, Callable[[], Tensor]], device: torch.device, reps: int) -> dict[str, float]:
    """Min over `reps` of fwd+bwd seconds per function, interleaved so load drifts hit all alike."""
    best = {name: float("inf") for name in fns}
    for rep in range(reps + 1):  # rep 0 warms up
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            out = fn()
            out.backward(torch.ones_like(out))
            sync(device)
            if rep:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench(shape: Shape, device: torch.device, dtype: torch.dtype, reps: int) -> None:
    torch.manual_seed(0)
    d = shape.dim
    expert_hidden = shape.dense_hidden // shape.top_k
    dense = swiglu_mlp(d, shape.dense_hidden)
    moes = {
        path: MoE(
            d,
            MoEConfig(
                num_experts=shape.num_experts, top_k=shape.top_k, expert_hidden_dim=expert_hidden, grouped_mm=path
            ),
        )
        for path in ("grouped", "loop")
    }
    for module in (dense, *moes.values()):
        for p in module.parameters():
            nn.init.normal_(p, std=0.02)
        module.to(device=device, dtype=dtype)
    x = torch.randn(1, shape.tokens, d, device=device, dtype=dtype, requires_grad=True)  # [1, T, D]

    def moe_fn(moe: MoE) -> Callable[[], Tensor]:
        def run() -> Tensor:
            out, router_loss, aux_loss = moe(x)
            return out + (router_loss + aux_loss).to(out.dtype)

        return run

    fns = {
        f"dense SwiGLU (hidden {shape.dense_hidden})": lambda: dense(x),
        "MoE grouped": moe_fn(moes["grouped"]),
        "MoE loop (sorted, per expert)": moe_fn(moes["loop"]),
        "naive loop (Mixtral-style)": lambda: mixtral_loop(moes["grouped"], x),
    }
    times = time_fwd_bwd(fns, device, reps)
    auto = expert_path(device, dtype)
    measured = "grouped" if times["MoE grouped"] <= times["MoE loop (sorted, per expert)"] else "loop"
    dense_t = times[next(iter(fns))]
    naive_t = times["naive loop (Mixtral-style)"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n{name}, {dtype}, T={shape.tokens} D={d} top-{shape.top_k} of {shape.num_experts}, "
        f"expert hidden {expert_hidden}; fwd+bwd, min of {reps}"
    )
    print(f"{'':32s} {'ms':>9s} {'/dense':>8s} {'/naive':>8s}")
    for label, t in times.items():
        print(f"{label:32s} {1e3 * t:9.1f} {t / dense_t:8.2f} {t / naive_t:8.2f}")
    print(f"auto picks {auto!r}; faster here: {measured!r}" + ("" if auto == measured else "  <-- table disagrees"))
    auto_t = times["MoE grouped" if auto == "grouped" else "MoE loop (sorted, per expert)"]
    print(f"MoE (auto) / dense = {auto_t / dense_t:.2f} (target <= 1.3), MoE (auto) / naive = {auto_t / naive_t:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--dense-hidden", type=int, default=4864)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cpu-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = Shape(args.tokens, args.dim, args.dense_hidden, args.experts, args.top_k)
    bench(shape, torch.device("cpu"), getattr(torch, args.cpu_dtype), args.reps)
    if torch.cuda.is_available():
        bench(shape, torch.device("cuda"), torch.bfloat16, 10 * args.reps)


if __name__ == "__main__":
    main()
