"""One prepared accelerator check: kernel parity, the real training step, learning, environment.

    python benchmarks/gpu_check.py                        # on a GPU: about 7 minutes (--budget-s)
    python benchmarks/gpu_check.py --device cpu --quick   # tiny shapes on CPU, seconds (its test)

Writes gpu_check.json and gpu_check.md to --out (default: $OUT when set, else runs/gpu_check),
rewritten after every row so a run cut short keeps what it finished. Sections (docs/GPU.md):
1. parity: the MoE layer in bf16, "grouped" (torch._grouped_mm) vs "loop" vs a float64 reference
   of the same bf16 values: output, input gradient, every weight gradient; top-2 of 8, D 896,
   H 2432, 8192 tokens; once balanced, once with experts that get no tokens (their weight
   gradients must be exactly zero). A failing "grouped" that `auto` would pick is a failure.
2. train: the trainer's own step (build_model -> parallelize -> materialize -> build_optimizer ->
   train_step) at world size 1 on configs/qwen2_5_0_5b_moe_pile_pretrain_fsdp.yaml (FSDP2, bf16
   params / fp32 reduce on GPU): dense, top-2 MoE, IoE x micro-batch x AC x compile; tokens/s,
   MFU, peak memory, or why not (OOM, error, skipped for time). Most important rows first.
3. learn: configs/tiny_cpu.yaml on the sample corpus made here: bf16 loss falling over the steps,
   and bf16 vs fp32 loss curves over the first steps.
4. environment: device, torch, CUDA/ROCm, NCCL, package versions, the exact command.
An exception in one row is recorded, never fatal. Exit code 1 when a check failed.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import click
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from ioe_train.config import ConfigError, TrainConfig, load_config
from ioe_train.data import build_train_loader
from ioe_train.devices import peak_flops
from ioe_train.metrics import memory_gib
from ioe_train.model import build_model, count_params
from ioe_train.moe import MoE, MoEConfig, expert_path
from ioe_train.moe import experts as experts_module
from ioe_train.optim import build_optimizer, build_scheduler
from ioe_train.parallelize import parallelize
from ioe_train.plan import flops_per_token
from ioe_train.train import materialize, select_device, train_step
from pile_prep.sample import write_sample_corpus

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
REAL_CONFIG = CONFIGS / "qwen2_5_0_5b_moe_pile_pretrain_fsdp.yaml"
# bf16 operands: ||out - ref|| / ||ref|| lands between 1e-3 and 1e-2; NaN never passes.
PARITY_TOL = 1e-2
# model kind -> (full preset, quick preset, overrides)
MODELS = {
    "moe": ("qwen2_5_moe", "tiny_moe", ["model.moe.router=topk"]),
    "dense": ("qwen2_5_dense", "tiny_dense", []),
    "ioe": ("qwen2_5_moe", "tiny_moe", ["model.moe.router=ioe"]),
}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; FULL for an accelerator, QUICK for the CPU dry run."""

    tokens: int  # parity: T tokens through one MoE layer
    dim: int  # D
    hidden: int  # H of one expert
    seq_len: int  # train rows
    micro_batches: tuple[int, ...]
    ac: tuple[str, ...]  # activation checkpointing modes
    compile: tuple[bool, ...]
    warmup_steps: int  # untimed steps per row (the first compiles)
    timed_steps: int
    corpus_docs: int  # documents per sample-corpus file
    learn_steps: int
    learn_seq_len: int
    learn_batch: int
    compare_steps: int  # bf16 vs fp32 over this many first steps
    budget_s: float  # the whole run; train rows past it are skipped with a note
    timing_reps: int  # parity: fwd+bwd timings per path


FULL = Plan(tokens=8192, dim=896, hidden=2432, seq_len=2048, micro_batches=(1, 2, 4), ac=("none", "selective"),
            compile=(False, True), warmup_steps=2, timed_steps=6, corpus_docs=200, learn_steps=150,
            learn_seq_len=256, learn_batch=8, compare_steps=20, budget_s=420, timing_reps=10)  # fmt: skip
# Qwen's 151,936-row output layer is most of a tiny model's CPU time (~0.2 s a step at 64 tokens):
# few steps, and "selective" only (AC "none" runs in the learn section).
QUICK = Plan(tokens=256, dim=64, hidden=128, seq_len=64, micro_batches=(1,), ac=("selective",), compile=(False,),
             warmup_steps=1, timed_steps=1, corpus_docs=60, learn_steps=10, learn_seq_len=32, learn_batch=2,
             compare_steps=3, budget_s=300, timing_reps=1)  # fmt: skip


class Report:
    """The results so far; `save` rewrites the JSON and the Markdown."""

    def __init__(self, out: Path):
        self.out = out
        self.data: dict = {"environment": {}, "parity": [], "train": [], "learn": {}, "failures": [], "notes": []}

    def fail(self, what: str) -> None:
        print(f"FAIL: {what}", flush=True)
        self.data["failures"].append(what)

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=1)), ("gpu_check.md", markdown(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --- 4. environment -------------------------------------------------------------------------------


def environment(device: torch.device, argv: list[str]) -> dict:
    env = {
        "command": shlex.join([Path(sys.executable).name, *argv]),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": torch.version.hip,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "expert_path_auto_bf16": expert_path(device, torch.bfloat16),
        "grouped_mm_failures_table": [list(e) for e in experts_module.GROUPED_MM_FAILURES],
        "peak_bf16_flops": peak_flops(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=list(torch.cuda.get_device_capability(device)),
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   gcn_arch=getattr(props, "gcnArchName", None), cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.version.cuda else None)  # fmt: skip
    else:
        env["device_name"] = platform.processor() or platform.machine()
    for package in ("torchtune", "torchao", "omegaconf", "numpy", "triton"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    try:
        env["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None  # the device's copy of the tree has no .git
    return env


# --- 1. kernel parity -----------------------------------------------------------------------------


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp(min=1e-300)).item()


def parity_case(plan: Plan, device: torch.device, dead: tuple[int, ...], seed: int) -> dict:
    """grouped and loop in bf16 vs loop in float64 on the same bf16 values; `dead` experts get no tokens."""
    torch.manual_seed(seed)
    e, k, d = 8, 2, plan.dim
    base = MoE(d, MoEConfig(num_experts=e, top_k=k, expert_hidden_dim=plan.hidden, grouped_mm="loop"))
    for p in base.parameters():
        nn.init.normal_(p, std=0.02)
    x = torch.randn(1, plan.tokens, d)  # [1, T, D]
    if dead:  # every token has feature 0 >= 2 and the dead experts' logits get -5 per unit of it
        x[..., 0] = x[..., 0].abs() + 2
        with torch.no_grad():
            base.router.gate.weight[list(dead), 0] = -5.0
    x = x.to(device, torch.bfloat16)
    dy = torch.randn_like(x)  # a random upstream gradient, not ones
    runs = {}
    for path, dtype in (("grouped", torch.bfloat16), ("loop", torch.bfloat16), ("reference", torch.float64)):
        moe = MoE(d, replace(base.cfg, grouped_mm="loop" if path == "reference" else path))
        moe.load_state_dict({n: t.to(torch.bfloat16) for n, t in base.state_dict().items()})  # bf16 values
        moe.to(device, dtype)
        ms = None
        if path != "reference":  # timed first: the checked pass then runs on recycled allocator blocks,
            # where unwritten output rows hold old values (pytorch#193633: NaN from backward #2 on)
            ms = time_fwd_bwd(moe, x.detach().clone().requires_grad_(True), dy, device, plan.timing_reps)
            moe.zero_grad(set_to_none=True)
        xi = x.detach().clone().to(dtype).requires_grad_(True)  # a fresh leaf per path
        routed = moe.forward_with_stats(xi)
        routed.out.backward(dy.to(dtype))
        grads = {"input": xi.grad, **{n: p.grad for n, p in moe.named_parameters()}}
        runs[path] = (routed.out.detach(), grads, routed.tokens_per_expert.tolist(), ms)
    ref_out, ref_grads, ref_counts, _ = runs["reference"]
    case = {"case": f"{len(dead)} experts without tokens" if dead else "balanced", "tokens": plan.tokens,
            "dim": d, "hidden": plan.hidden, "experts": e, "top_k": k, "tokens_per_expert": ref_counts,
            "paths": {}}  # fmt: skip
    for path in ("grouped", "loop"):
        out, grads, counts, ms = runs[path]
        errors = {"output": rel_err(out, ref_out), **{n: rel_err(g, ref_grads[n]) for n, g in grads.items()}}
        finite = all(torch.isfinite(t).all().item() for t in (out, *grads.values()))
        dead_nonzero = sum(int((grads[n][list(dead)] != 0).sum()) for n in ("experts.w_gate_up", "experts.w_down"))
        ok = finite and counts == ref_counts and dead_nonzero == 0 and max(errors.values()) <= PARITY_TOL
        case["paths"][path] = {"ok": ok, "finite": finite, "same_routing": counts == ref_counts,
                               "dead_expert_nonzero_grads": dead_nonzero, "rel_err": errors,
                               "fwd_bwd_ms": ms}  # fmt: skip
    go, lo = case["paths"]["grouped"]["rel_err"], case["paths"]["loop"]["rel_err"]
    case["grouped_vs_loop_max_rel_err_ratio"] = max(go[n] / max(lo[n], 1e-12) for n in go)
    return case


def time_fwd_bwd(moe: MoE, x: torch.Tensor, dy: torch.Tensor, device: torch.device, reps: int) -> float:
    """Median fwd+bwd milliseconds after one warm-up."""
    times = []
    for rep in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        moe(x)[0].backward(dy)
        sync(device)
        if rep:
            times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def run_parity(plan: Plan, device: torch.device, report: Report) -> None:
    for dead, seed in (((), 0), ((5, 6, 7), 1)):
        label = f"parity ({len(dead)} dead experts)"
        try:
            case = parity_case(plan, device, dead, seed)
        except Exception as e:  # a kernel that raises is a finding, not the end of the run
            traceback.print_exc()
            case = {"case": label, "error": first_line(e), "paths": {}}
            report.fail(f"{label}: {case['error']}")
        report.data["parity"].append(case)
        for path, r in case["paths"].items():
            print(f"{label} {path}: ok={r['ok']} max rel err {max(r['rel_err'].values()):.2e} "
                  f"dead-expert nonzero grads {r['dead_expert_nonzero_grads']} {r['fwd_bwd_ms']:.2f} ms", flush=True)
            if not r["ok"]:
                report.fail(f"{label}: {path} path fails parity")
        free_memory(device)
        report.save()
    grouped_bad = any(not c["paths"].get("grouped", {"ok": False})["ok"] for c in report.data["parity"])
    if grouped_bad and expert_path(device, torch.bfloat16) == "grouped":
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type  # as grouped_mm_failed
        minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
        report.fail(f"auto picks 'grouped' here but it fails parity: add ({name!r}, {minor!r}) to "
                    "ioe_train/moe/experts.py GROUPED_MM_FAILURES")  # fmt: skip


# --- 2. training step of the real architecture ----------------------------------------------------


@dataclass(frozen=True)
class Row:
    model: str  # a key of MODELS
    micro_batch: int
    ac: str  # activation checkpointing
    compile: bool

    def priority(self) -> tuple:
        """Compile off first; within it MoE/dense at micro-batch <= 2, then IoE, then the largest."""
        core = self.model in ("moe", "dense")
        return (self.compile, self.micro_batch > 2, not core, self.micro_batch, self.model != "moe", self.ac)


def row_overrides(row: Row, plan: Plan, quick: bool, data: Path, tmp: Path, device: torch.device,
                  num_layers: int | None) -> list[str]:  # fmt: skip
    """`a.b=value` overrides of REAL_CONFIG for one row (recorded with it: the row's exact config)."""
    full, tiny, extra = MODELS[row.model]
    overrides = [f"model.name={tiny if quick else full}", *extra, f"data.train_dirs=[{data}]", "data.val_dirs=[]",
                 "data.num_workers=0", f"data.seq_len={plan.seq_len}", f"micro_batch_size={row.micro_batch}",
                 "grad_accum_steps=1", "eval.interval=0", f"parallel.activation_checkpointing={row.ac}",
                 f"parallel.compile={str(row.compile).lower()}", f"device={device.type}", f"output_dir={tmp}",
                 f"model.max_seq_len={max(plan.seq_len, plan.learn_seq_len)}"]  # fmt: skip
    if num_layers:
        overrides.append(f"model.num_layers={num_layers}")
    return overrides


def build(cfg: TrainConfig, device: torch.device, mesh) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """The trainer's own construction: meta build, parallelize, materialize, optimizer."""
    torch.manual_seed(cfg.seed)
    with torch.device("meta"):
        model = build_model(cfg.model)
    _, active = count_params(model)
    parallelize(model, cfg.parallel, mesh, device)
    materialize(model, cfg, device)
    return model, build_optimizer(model, cfg.optim, device), active


def step(model, optimizer, batches, cfg: TrainConfig, device: torch.device):
    r = train_step(model, batches, cfg, device, want_experts=False)
    if r.finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return r


def measure_row(row: Row, cfg: TrainConfig, plan: Plan, device: torch.device, mesh, tmp: Path) -> dict:
    start = time.perf_counter()
    model, optimizer, active = build(cfg, device, mesh)
    batches = iter(build_train_loader(cfg.data, cfg.micro_batch_size, 0, 1, tmp / "index",
                                      pin_memory=device.type == "cuda"))  # as the trainer's
    built = time.perf_counter()
    results = [step(model, optimizer, batches, cfg, device) for _ in range(plan.warmup_steps)]
    sync(device)
    warm = time.perf_counter()
    results += [step(model, optimizer, batches, cfg, device) for _ in range(plan.timed_steps)]
    sync(device)
    elapsed = time.perf_counter() - warm
    tokens_per_s = plan.timed_steps * row.micro_batch * plan.seq_len / elapsed
    arch = model.arch
    peak = peak_flops(device)
    mfu = flops_per_token(model, plan.seq_len) * tokens_per_s / peak if peak else None
    return {"status": "ok", "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_gib": memory_gib(device),
            "step_ms": 1e3 * elapsed / plan.timed_steps, "build_s": built - start, "warmup_s": warm - built,
            "layers": arch.num_layers, "active_params": active, "losses": [r.ce for r in results],
            "finite": all(r.finite for r in results)}  # fmt: skip


def run_train(plan: Plan, quick: bool, device: torch.device, mesh, data: Path, tmp: Path, deadline: float,
              num_layers: int | None, report: Report) -> None:  # fmt: skip
    rows = sorted((Row(m, b, ac, c) for m in MODELS for b in plan.micro_batches for ac in plan.ac
                   for c in plan.compile), key=Row.priority)  # fmt: skip
    oom: set[tuple] = set()
    last_s = {False: 5.0 if quick else 20.0, True: 120.0}  # a row's wall time, until one is measured
    for row in rows:
        overrides = row_overrides(row, plan, quick, data, tmp, device, num_layers)
        result = {"model": row.model, "micro_batch": row.micro_batch, "ac": row.ac, "compile": row.compile,
                  "seq_len": plan.seq_len, "overrides": overrides}  # fmt: skip
        family = (row.model, row.ac, row.compile)
        started = time.perf_counter()
        if any(f == family and b < row.micro_batch for f, b in oom):
            result.update(status="skipped", note="a smaller micro-batch ran out of memory")
        elif time.time() + 1.2 * last_s[row.compile] > deadline:
            result.update(status="skipped", note="time budget (--budget-s) spent")
        else:
            try:
                result.update(measure_row(row, load_config(REAL_CONFIG, overrides), plan, device, mesh, tmp))
                last_s[row.compile] = time.perf_counter() - started
                if not result["finite"]:
                    report.fail(f"train {row}: non-finite loss or grad norm")
            except torch.cuda.OutOfMemoryError as e:
                result.update(status="oom", note=first_line(e)[:160])
                oom.add((family, row.micro_batch))
            except Exception as e:
                traceback.print_exc()
                result.update(status="error", note=first_line(e))
                report.fail(f"train {row}: {result['note']}")
        result["wall_s"] = time.perf_counter() - started
        free_memory(device)
        if row.compile:
            torch._dynamo.reset()  # drop the compiled blocks' caches (and the memory they pin)
        report.data["train"].append(result)
        report.save()
        print(f"train {row.model} mb {row.micro_batch} ac {row.ac} compile {row.compile}: {result['status']} "
              + (f"{result['tokens_per_s']:.0f} tok/s" if result["status"] == "ok" else result.get("note", "")),
              flush=True)  # fmt: skip


def make_corpus(tmp: Path, docs: int) -> Path:
    """The sample corpus, tokenized by `pile-prep tokenize` in a child process: its tokenizer
    workers then start from pile_prep's light imports, not from this script's (~5 s each)."""
    paths = write_sample_corpus(tmp / "raw", num_files=2, docs_per_file=docs)
    data = tmp / "train"
    cmd = [sys.executable, "-m", "pile_prep.cli", "tokenize", *map(str, paths[:2]), "-o", str(data), "-j", "1", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return data


# --- 3. learning ---------------------------------------------------------------------------------


def learn_curve(precision: str, steps: int, plan: Plan, device: torch.device, mesh, data: Path, tmp: Path,
                deadline: float) -> list[float]:  # fmt: skip
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", [
        f"data.train_dirs=[{data}]", "data.val_dirs=[]", "eval.interval=0", f"data.seq_len={plan.learn_seq_len}",
        f"micro_batch_size={plan.learn_batch}", f"steps={plan.learn_steps}", f"device={device.type}",
        f"parallel.mixed_precision={precision}", f"output_dir={tmp}"])  # fmt: skip
    model, optimizer, _ = build(cfg, device, mesh)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    batches = iter(build_train_loader(cfg.data, cfg.micro_batch_size, 0, 1, tmp / "index",
                                      pin_memory=device.type == "cuda"))  # as the trainer's
    losses = []
    for _ in range(steps):
        losses.append(step(model, optimizer, batches, cfg, device).ce)
        scheduler.step()
        if time.time() > deadline:
            break
    return losses


def run_learn(plan: Plan, device: torch.device, mesh, data: Path, tmp: Path, deadline: float,
              report: Report) -> None:  # fmt: skip
    learn = report.data["learn"]
    learn.update(config="configs/tiny_cpu.yaml", seq_len=plan.learn_seq_len, micro_batch=plan.learn_batch)
    try:
        start = time.perf_counter()
        bf16 = learn_curve("bf16", plan.learn_steps, plan, device, mesh, data, tmp, deadline)
        learn["seconds_bf16"] = time.perf_counter() - start
        fp32 = learn_curve("fp32", plan.compare_steps, plan, device, mesh, data, tmp, deadline)
    except Exception as e:
        traceback.print_exc()
        learn["error"] = first_line(e)
        report.fail(f"learn: {learn['error']}")
        report.save()
        return
    n = min(plan.compare_steps, len(fp32), len(bf16))
    tail = bf16[-max(1, len(bf16) // 10):]
    diffs = [abs(a - b) for a, b in zip(bf16[:n], fp32[:n])]
    # Falling: the last tenth's mean at least 1 nat under step 1's loss (ln 151,936 = 11.9 at init).
    learn.update(steps=len(bf16), loss_bf16=bf16, loss_fp32=fp32, first=bf16[0], last_mean=sum(tail) / len(tail),
                 falling=sum(tail) / len(tail) < bf16[0] - 1.0, compare_steps=n,
                 max_abs_diff_bf16_fp32=max(diffs), close=max(diffs) <= 0.1)  # fmt: skip
    print(f"learn: bf16 {bf16[0]:.3f} -> {learn['last_mean']:.3f} over {len(bf16)} steps; bf16 vs fp32 max |diff| "
          f"{max(diffs):.4f} over {n} steps", flush=True)  # fmt: skip
    if len(bf16) < plan.learn_steps or len(fp32) < plan.compare_steps:
        learn["falling"] = learn["close"] = None  # too few steps to judge
        report.data["notes"].append(f"learn: cut short by --budget-s after {len(bf16)} bf16 / {len(fp32)} fp32 "
                                    "steps; not judged")  # fmt: skip
    elif not learn["falling"]:
        report.fail(f"learn: bf16 loss not falling ({learn['first']:.3f} -> {learn['last_mean']:.3f})")
    if learn["close"] is False:
        report.fail(f"learn: bf16 and fp32 losses differ by {max(diffs):.3f} within {n} steps")
    report.save()


# --- report ---------------------------------------------------------------------------------------


def fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = ["# gpu_check results", "", f"`{env.get('command', '')}`", ""]
    lines += ["## Environment", "", "| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in env.items() if k != "command"]
    lines += ["", "## 1. Kernel parity (bf16 vs float64 reference of the same values)", "",
              "| case | path | ok | max rel err | output | input grad | w_gate_up grad | w_down grad | gate grad "
              "| dead-expert nonzero grads | fwd+bwd ms |", "| --- " * 11 + "|"]  # fmt: skip
    for c in data["parity"]:
        if "error" in c:
            lines.append(f"| {c['case']} | - | error: {c['error']} |" + " |" * 8)
        for path, r in c["paths"].items():
            e = r["rel_err"]
            lines.append(f"| {c['case']} | {path} | {r['ok']} | {max(e.values()):.2e} | {e['output']:.2e} | "
                         f"{e['input']:.2e} | {e['experts.w_gate_up']:.2e} | {e['experts.w_down']:.2e} | "
                         f"{e['router.gate.weight']:.2e} | {r['dead_expert_nonzero_grads']} | {r['fwd_bwd_ms']:.2f} |")
    lines += ["", "## 2. Training step (world size 1, the trainer's own code)", "",
              "| model | micro-batch | AC | compile | status | tokens/s | MFU | peak GiB | step ms | warm-up s "
              "| note |", "| --- " * 11 + "|"]  # fmt: skip
    for r in data["train"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        lines.append(f"| {r['model']} | {r['micro_batch']} | {r['ac']} | {r['compile']} | {r['status']} | "
                     f"{fmt(r.get('tokens_per_s'), '.0f')} | {mfu} | {fmt(r.get('peak_gib'), '.1f')} | "
                     f"{fmt(r.get('step_ms'), '.0f')} | {fmt(r.get('warmup_s'), '.1f')} | {r.get('note', '')} |")
    learn = data["learn"]
    lines += ["", "## 3. Learning (configs/tiny_cpu.yaml on the sample corpus)", ""]
    if "error" in learn:
        lines.append(f"error: {learn['error']}")
    elif "steps" in learn:
        marks = sorted({0, 9, 24, 49, 99, learn["steps"] - 1} & set(range(learn["steps"])))
        lines += [f"bf16 loss over {learn['steps']} steps: " + ", ".join(
            f"step {i + 1} {learn['loss_bf16'][i]:.3f}" for i in marks) + f" (falling: {learn['falling']})",
            f"bf16 vs fp32 over the first {learn['compare_steps']} steps: max |diff| "
            f"{learn['max_abs_diff_bf16_fp32']:.4f} (close: {learn['close']})"]  # fmt: skip
    lines += ["", "## Verdict", ""]
    lines += [f"- FAIL: {f}" for f in data["failures"]] or ["- every check passed"]
    lines += [f"- note: {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


# --- the command ----------------------------------------------------------------------------------


def run_check(device_choice: str, quick: bool, out: Path, budget_s: float | None, sections: tuple[str, ...],
              num_layers: int | None, seq_len: int | None, argv: list[str]) -> Report:  # fmt: skip
    """Run the chosen sections; the report is saved after every row."""
    start = time.time()
    plan = QUICK if quick else FULL
    plan = replace(plan, budget_s=budget_s or plan.budget_s, seq_len=seq_len or plan.seq_len)
    deadline = start + plan.budget_s
    device = select_device(device_choice, 0)
    report = Report(out)
    report.data["environment"] = environment(device, argv)
    report.data["plan"] = plan.__dict__
    if device.type == "cpu" and not quick:
        report.data["notes"].append("full shapes on CPU: a smoke test of the code paths, not a measurement")
    if device.type == "cpu":
        report.data["notes"].append("CPU peak memory is the process's peak resident set so far, not per row")
    report.save()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh(device.type, (1,))
        seconds = report.data["section_seconds"] = {}
        if "parity" in sections:
            t = time.time()
            run_parity(plan, device, report)
            seconds["parity"] = time.time() - t
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            if {"train", "learn"} & set(sections):
                t = time.time()
                try:
                    data = make_corpus(tmp, plan.corpus_docs)
                except (OSError, RuntimeError) as e:
                    report.fail(f"sample corpus: {first_line(e)}; learn and train not run")
                    sections = ("parity",)
                seconds["corpus"] = time.time() - t
            if "learn" in sections:
                t = time.time()
                run_learn(plan, device, mesh, data, tmp, deadline, report)
                free_memory(device)
                seconds["learn"] = time.time() - t
            if "train" in sections:
                t = time.time()
                run_train(plan, quick, device, mesh, data, tmp, deadline, num_layers, report)
                seconds["train"] = time.time() - t
    finally:
        dist.destroy_process_group()
    report.data["seconds"] = time.time() - start
    report.save()
    return report


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device", "device_choice", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True)
@click.option("--quick", is_flag=True, help="Tiny shapes and few rows (the CPU dry run; seconds).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: $OUT when set, else runs/gpu_check].")
@click.option("--budget-s", type=float, default=None, help="Seconds for the whole run [default: 420; quick 300].")
@click.option("--sections", default="parity,learn,train", show_default=True, help="Comma-separated subset.")
@click.option("--num-layers", type=int, default=None, help="Fewer layers than the preset's 24 (say so in results).")
@click.option("--seq-len", type=int, default=None, help="Train rows' sequence length [default: 2048; quick 64].")
def main(device_choice: str, quick: bool, out: Path | None, budget_s: float | None, sections: str,
         num_layers: int | None, seq_len: int | None) -> None:  # fmt: skip
    """Kernel parity, the real training step, learning and the environment, in one JSON + Markdown."""
    chosen = tuple(s.strip() for s in sections.split(",") if s.strip())
    unknown = set(chosen) - {"parity", "learn", "train"}
    if unknown:
        raise click.BadParameter(f"unknown section(s) {sorted(unknown)}", param_hint="--sections")
    out = out or Path(os.environ.get("OUT") or REPO / "runs" / "gpu_check")
    try:
        report = run_check(device_choice, quick, out, budget_s, chosen, num_layers, seq_len, sys.argv)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    print("\n" + markdown(report.data), flush=True)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report.data['seconds']:.0f} s")
    sys.exit(1 if report.data["failures"] else 0)


if __name__ == "__main__":
    main()
