"""The training loop, one process per rank (`torchrun ... -m ioe_train.train CONFIG [a.b=value]`).

B micro-batch samples, S seq_len, A gradient-accumulation steps, W ranks, L layers, E experts.
The model is built on the meta device, parallelized (ioe_train.parallelize), materialised on this
rank's device and initialised; then each step runs A forward/backward passes, checks the loss,
clips, updates, and logs, evaluates and checkpoints on their intervals.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ioe_train.checkpoint import Checkpointer, export_model
from ioe_train.config import ConfigError, TrainConfig, load_config
from ioe_train.data import Batch, DataStateError, EvalSet, build_train_loader, prepare_data
from ioe_train.devices import peak_flops
from ioe_train.evaluate import loss_sums, losses_from_sums
from ioe_train.lock import run_dir_lock
from ioe_train.loss import microbatch_loss, total_loss
from ioe_train.metrics import MetricsLogger, format_line, memory_gib
from ioe_train.model import build_model, count_params, document_starts, expert_stats, init_weights
from ioe_train.moe import balances_from_load, update_router_biases
from ioe_train.optim import build_optimizer, build_scheduler, clip_grad_norm
from ioe_train.parallelize import copy_full_tensors, data_parallel_mesh, parallelize
from ioe_train.plan import attention_flops_per_token, model_budget, visible_keys
from ioe_train.upcycle import load_dense, upcycle, upcycle_check


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf and `on_nonfinite` is "stop"."""


@dataclass
class StepResult:
    ce: float  # mean over the step's label tokens, all ranks
    aux: float  # mean over micro-batches and ranks (unweighted)
    router: float
    total: float
    grad_norm: float
    finite: bool
    expert_load: np.ndarray | None  # [L, E] summed over micro-batches and ranks, when asked
    router_entropy: np.ndarray | None  # [L] mean over micro-batches and ranks
    # keys attention visited per label token (plan.visible_keys): S / 2 causal, fewer block-causal
    attention_keys_per_token: float = 0.0


def select_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' but torch sees no CUDA/ROCm device")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def materialize(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """Allocate the sharded (meta) model on `device` and initialise it from `cfg.seed`."""
    model.to_empty(device=device)
    if device.type == "cuda":
        init_weights(model)  # also rebuilds the RoPE cache
        return
    # DTensor's offset-based RNG exists on CUDA/ROCm only: elsewhere every rank draws the same
    # numbers into its own shard, and twin experts (0 and 4 of 8 on 2 ranks) never separate.
    # Initialise one full copy from the seed instead and keep this rank's shard of it: the
    # weights one process would make (and no random op on a CPU DTensor, which torch warns about).
    full = build_model(cfg.model)
    torch.manual_seed(cfg.seed)
    init_weights(full)
    copy_full_tensors(model, full.named_parameters())
    with torch.no_grad():
        for buffer, full_buffer in zip(model.buffers(), full.buffers()):  # the RoPE cache (not sharded)
            buffer.copy_(full_buffer)


def init_from_dense(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """Overwrite the materialised model with `cfg.model.init_from`'s weights (ioe_train.upcycle).

    Every rank reads the dense checkpoint on CPU and builds one full tensor at a time, keeping its
    own shard: no rank ever holds the whole upcycled model (8 copies of the dense MLPs).
    """
    with torch.device("meta"):
        shapes = build_model(cfg.model)
    dense = load_dense(cfg.model.init_from)
    # "exact" with hidden slices: torch.topk's tie-break on this device, for the tokens of one
    # micro-batch, decides which experts get the slices.
    tensors = upcycle(dense, shapes, cfg.model.upcycle, cfg.model.init_noise, cfg.seed, cfg.model.init_from,
                      device, cfg.micro_batch_size * cfg.data.seq_len)  # fmt: skip
    copy_full_tensors(model, tensors)


def train_step(model: nn.Module, batches: Iterator[Batch], cfg: TrainConfig, device: torch.device,
               want_experts: bool) -> StepResult:  # fmt: skip
    """A forward/backward passes, the reductions and clipping; leaves the gradients for the update."""
    a = cfg.grad_accum_steps
    tokens_per_rank_step = a * cfg.micro_batch_size * cfg.data.seq_len
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # ce_sum, aux, router, attention keys
    block_causal = cfg.model.attention == "block_causal"
    load = entropy = None
    for i in range(a):
        batch = next(batches)
        inputs = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        ce_sum, router_loss, aux_loss = model(inputs, labels)  # fused output + CE: no [B, S, V] logits
        loss = microbatch_loss(ce_sum, router_loss, aux_loss, tokens_per_rank_step=tokens_per_rank_step,
                               grad_accum=a, load_balancing_loss_weight=cfg.load_balancing_loss_weight)
        # HSDP: reduce-scatter within the replica every micro-batch, but all-reduce across the
        # replicas (the nodes) once per step, after the last one. A no-op on a 1-D mesh.
        model.set_requires_all_reduce(i == a - 1)
        loss.backward()
        keys = visible_keys(document_starts(inputs, cfg.model.eos_id)) if block_causal else sums.new_zeros(())
        sums += torch.stack([ce_sum.detach(), aux_loss.detach(), router_loss.detach(), keys]).double()
        stats = expert_stats(model) if want_experts else {}
        if stats:
            load = stats["tokens_per_expert"] + (0 if load is None else load)
            entropy = stats["router_entropy"] + (0 if entropy is None else entropy)
    dist.all_reduce(sums)
    world = dist.get_world_size()
    ce = sums[0].item() / (tokens_per_rank_step * world)
    aux, router = sums[1].item() / (a * world), sums[2].item() / (a * world)
    grad_norm = clip_grad_norm([p for p in model.parameters()], cfg.optim.max_grad_norm).item()
    total = total_loss(torch.tensor(ce), torch.tensor(router), torch.tensor(aux),
                       cfg.load_balancing_loss_weight).item()  # fmt: skip
    finite = math.isfinite(total) and math.isfinite(grad_norm)
    if load is not None:
        packed = torch.cat([load.float().flatten(), entropy.float()])
        dist.all_reduce(packed)
        layers = entropy.numel()
        load_np = packed[:-layers].view(layers, -1).cpu().numpy()
        entropy_np = packed[-layers:].cpu().numpy() / (a * world)
    else:
        load_np = entropy_np = None
    keys = sums[3].item() / (tokens_per_rank_step * world) if block_causal else cfg.data.seq_len / 2
    return StepResult(ce, aux, router, total, grad_norm, finite, load_np, entropy_np, keys)


def evaluate(model: nn.Module, eval_set: EvalSet, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Validation loss per label token, overall and per pile_set_name (all ranks' samples)."""
    sums, counts = loss_sums(model, eval_set, cfg.eval.batch_size or cfg.micro_batch_size,
                             cfg.eval.max_batches, device, cfg.eval.per_document)  # fmt: skip
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    return losses_from_sums(sums, counts, eval_set.source_names)


def train(cfg: TrainConfig, rank: int, world_size: int, local_rank: int) -> dict[str, float]:
    """Run (or resume) the training that `cfg` describes on this rank; return the last metrics.

    Needs an initialised default process group of `world_size` ranks.
    """
    ckpt = Checkpointer(Path(cfg.output_dir) / "checkpoints", cfg.checkpoint.keep_last, rank, world_size,
                        async_save=cfg.checkpoint.async_save)  # fmt: skip
    try:
        return _train(cfg, rank, world_size, local_rank, ckpt)
    finally:
        ckpt.close()  # a checkpoint still being written completes, also when training failed


def _train(cfg: TrainConfig, rank: int, world_size: int, local_rank: int, ckpt: Checkpointer) -> dict[str, float]:
    device = select_device(cfg.device, local_rank)
    mesh = data_parallel_mesh(device.type, world_size, cfg.parallel.replicate_degree)
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)

    val_packing = cfg.eval.packing or cfg.data.packing
    if local_rank == 0:  # packing orders and the mixture index: built once per node, loaded by every rank
        prepare_data(cfg.data, val_packing if cfg.eval.interval else None, out / "data_index")
    dist.barrier()
    loader = build_train_loader(cfg.data, cfg.micro_batch_size, rank, world_size, out / "data_index",
                                pin_memory=device.type == "cuda")  # fmt: skip
    with torch.device("meta"):
        model = build_model(cfg.model)
    data_vocab = getattr(getattr(loader, "ds", None), "vocab_size", 0)
    if model.vocab_size < data_vocab:
        raise ConfigError(f"model.vocab_size: {model.vocab_size} < the data's tokenizer vocabulary "
                          f"{data_vocab}; use 151936 (Qwen2.5)")  # fmt: skip
    total_params, active_params = count_params(model)
    parallelize(model, cfg.parallel, mesh, device)
    materialize(model, cfg, device)
    # Per-rank RNG from here on (router jitter, dropout): ranks must not draw the same noise.
    torch.manual_seed(cfg.seed + rank)
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)

    step, skipped = 0, 0
    done = ckpt.steps()
    if done and not cfg.checkpoint.resume:
        raise ConfigError(f"checkpoint.resume: false, but {ckpt.path(done[-1])} exists: a fresh run "
                          "there would delete its own new checkpoints among the old ones. Use a new "
                          "output_dir, or checkpoint.resume=true")  # fmt: skip
    if cfg.model.init_from and not done:  # a resumed run restores its own weights instead
        init_from_dense(model, cfg, device)
    if done:
        state, data_state = ckpt.load(done[-1], model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(data_state)
        step, skipped = state["step"], state["skipped_steps"]
    tokens_per_step = world_size * cfg.grad_accum_steps * cfg.micro_batch_size * cfg.data.seq_len
    wandb = asdict(cfg.logging.wandb) if cfg.logging.wandb.project else None
    log = MetricsLogger(out, rank, cfg.logging.tensorboard, start_step=step, tokens_per_step=tokens_per_step,
                        per_expert_scalars=cfg.logging.per_expert_scalars, wandb=wandb)  # fmt: skip
    if rank == 0:
        (out / "config.yaml").write_text(cfg.to_yaml())
        log.config(cfg.to_yaml(), asdict(cfg))
    budget = model_budget(model, cfg.data.seq_len)
    fpt_beside_attention = budget.flops_per_token - budget.attention_flops_per_token
    peak = peak_flops(device)
    log.line(f"{cfg.model.name}: {total_params / 1e6:.1f}M parameters, {active_params / 1e6:.1f}M active "
             f"per token; {world_size} ranks on {device.type}; "
             + (f"resumed at step {step}" if step else "starting")
             + (f" from {cfg.model.init_from}" if cfg.model.init_from and not step else ""))  # fmt: skip
    if cfg.model.init_from and not step and cfg.model.is_moe and (warning := upcycle_check(cfg.model)):
        log.line(f"warning: {warning}")
    eval_set = None
    if cfg.eval.interval:
        eval_set = EvalSet(cfg.data.val_dirs, cfg.data.seq_len, rank, world_size, val_packing, out / "data_index",
                           partial=cfg.data.partial)  # fmt: skip

    # topk_bias routers update from every step's global load, not only on expert_interval steps.
    load_every_step = balances_from_load(model)
    batches = iter(loader)
    metrics: dict[str, float] = {}
    timer, timed_tokens, timed_flops = time.perf_counter(), 0, 0.0
    started, first_step = timer, step  # elapsed and ETA: this process's wall clock, resumed steps excluded
    while step < cfg.steps:
        step += 1
        log_experts = bool(cfg.logging.expert_interval) and step % cfg.logging.expert_interval == 0
        r = train_step(model, batches, cfg, device, log_experts or load_every_step)
        if not r.finite:
            what = f"step {step}: loss {r.total} (ce {r.ce}, aux {r.aux}, router {r.router}), grad norm {r.grad_norm}"
            if cfg.on_nonfinite == "stop":
                ckpt.wait()
                last = ckpt.steps()
                raise NonFiniteLossError(
                    f"{what} is not finite; stopped without updating or saving. Last checkpoint: "
                    f"{ckpt.path(last[-1]) if last else 'none'}. Lower optim.lr, or set "
                    "on_nonfinite=skip to skip such steps"
                )
            skipped += 1
            log.line(f"{what} is not finite: step skipped (on_nonfinite=skip)")
        else:
            optimizer.step()
            if load_every_step:
                update_router_biases(model, torch.from_numpy(r.expert_load))
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        timed_tokens += tokens_per_step
        fpt = fpt_beside_attention + attention_flops_per_token(model.arch, r.attention_keys_per_token)
        timed_flops += fpt * tokens_per_step

        if step % cfg.logging.interval == 0 or step == cfg.steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - timer
            metrics = {"loss/total": r.total, "loss/ce": r.ce, "loss/aux": r.aux, "loss/router": r.router,
                       "lr": lr, "grad_norm": r.grad_norm, "tokens_per_s": timed_tokens / elapsed,
                       "memory_gib": memory_gib(device), "skipped_steps": skipped}  # fmt: skip
            if peak:
                metrics["mfu"] = timed_flops / elapsed / (peak * world_size)
            log.scalars(step, metrics)
            wall = time.perf_counter() - started
            log.line(format_line(step, cfg.steps, metrics, wall, wall / (step - first_step) * (cfg.steps - step)))
            timer, timed_tokens, timed_flops = time.perf_counter(), 0, 0.0
        if log_experts and r.expert_load is not None:
            log.experts(step, r.expert_load, r.router_entropy)
        if eval_set is not None and (step % cfg.eval.interval == 0 or step == cfg.steps):
            val = evaluate(model, eval_set, cfg, device)
            log.scalars(step, val)
            log.line(f"step {step}/{cfg.steps} | val loss {val['val/loss']:.4f} | " + ", ".join(
                f"{k.split('/', 2)[2]} {v:.3f}" for k, v in val.items() if k.count("/") == 2))
            metrics.update(val)
            timer, timed_tokens, timed_flops = time.perf_counter(), 0, 0.0  # evaluation time is not training throughput
        if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == cfg.steps:
            state = {"scheduler": scheduler.state_dict(), "skipped_steps": skipped}
            path = ckpt.save(step, model, optimizer, state, loader.state_dict())
            log.line(f"step {step}/{cfg.steps} | checkpoint {path}")
            timer, timed_tokens, timed_flops = time.perf_counter(), 0, 0.0

    if cfg.checkpoint.export_final:
        final = out / "final" / "model.pt"
        export_model(model, final, rank, {"model_config": asdict(cfg.model), "step": step})  # plain: weights_only loads
        log.line(f"exported consolidated weights to {final}")
    log.close()
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Per-rank entry: CONFIG [a.b=value ...]; rank and world size come from torchrun's env."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m ioe_train.train CONFIG [a.b=value ...] (run under torchrun)")
    cfg = load_config(argv[0], argv[1:])
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_gpu else "gloo", rank=rank, world_size=world_size)
    try:
        with run_dir_lock(Path(cfg.output_dir), rank):  # before anything in output_dir is touched
            train(cfg, rank, world_size, local_rank)
    except (NonFiniteLossError, ConfigError, DataStateError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3 if isinstance(e, NonFiniteLossError) else 2)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
