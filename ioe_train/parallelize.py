"""The one place that makes a single-device model distributed: AC, compile, then FSDP2.

Per transformer block, in this order (torchtitan's): activation checkpointing, `torch.compile`,
`fully_shard`; then `fully_shard` of the root, whose unit holds the tied embedding/output weight
and the final norm. Model code never imports torch.distributed: the MoE layers' global
load-balancing counts get their all-reduce here (`MoE.reduce_counts`).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from ioe_train.config import ConfigError, ParallelConfig
from ioe_train.moe import Experts, MoE

_aten = torch.ops.aten
# Ops whose outputs activation checkpointing keeps instead of recomputing. The router's top-k is
# always kept: a recomputed forward then routes exactly as the first one did, even where bf16
# matmuls differ in the last bit. So is the all-reduce of the global load-balancing counts
# (aux_loss_scope: global): recomputed, it would be a second blocking collective per MoE layer
# inside backward (torchtitan keeps its collectives too). "selective" also keeps attention (the
# costliest op to redo): SDPA's kernels, and FlexAttention (block_causal on a GPU), a higher-order
# op that the checkpoint policy sees as itself (torchtitan keeps it the same way).
_KEEP_ALWAYS = {_aten.topk.default, torch.ops._c10d_functional.all_reduce.default}
_KEEP_SELECTIVE = _KEEP_ALWAYS | {
    getattr(_aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(_aten, name)
}  # fmt: skip
if hasattr(torch._higher_order_ops, "flex_attention"):
    _KEEP_SELECTIVE.add(torch._higher_order_ops.flex_attention)


def param_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    """bf16 parameters in forward/backward where chosen, or by default where the GPU supports it."""
    if cfg.mixed_precision == "bf16":
        return torch.bfloat16
    if cfg.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32  # CPU default: fp32 keeps runs bit-reproducible


def _keep_policy(keep: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(block: nn.Module, mode: str) -> nn.Module:
    keep = _KEEP_SELECTIVE if mode == "selective" else _KEEP_ALWAYS
    context = partial(create_selective_checkpoint_contexts, partial(_keep_policy, keep))
    return checkpoint_wrapper(block, context_fn=context, preserve_rng_state=True)


def expert_placement(mesh_size: int, param: nn.Parameter) -> Shard:
    """Where experts [E, ., .] are sharded over `mesh_size` ranks: dim 0 when E divides evenly,
    else their largest dim that does, else dim 0 padded.

    fully_shard's default Shard(0) would give 8 experts on 16 ranks one row each and leave half
    the ranks holding padding only (no memory saved there, no work balanced). FSDP2 pads only
    dim 0, so another dim must divide: at 24 ranks none of Qwen2.5-0.5B's (896, 2432, 4864) does,
    and 8 experts go to 8 of the 24 ranks (ceil(E / ranks) experts each; plan.py counts that).
    """
    if param.ndim >= 2 and param.shape[0] % mesh_size:
        even = [d for d in range(1, param.ndim) if param.shape[d] % mesh_size == 0]
        if even:
            return Shard(max(even, key=lambda d: (param.shape[d], -d)))
    return Shard(0)


def _placement_fn(model: nn.Module, mesh_size: int):
    expert_params = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}

    def place(param: nn.Parameter) -> Shard:
        return expert_placement(mesh_size, param) if id(param) in expert_params else Shard(0)

    return place


def shard_numel(model: nn.Module, mesh_size: int) -> int:
    """Parameter elements one rank holds once `model` is sharded over `mesh_size` ranks: each
    parameter as `parallelize` places it, padded as FSDP2 pads it (ceil(n / ranks) of its sharded
    dim's n rows on every rank). `ioe-train plan` counts sharded state with this."""
    place = _placement_fn(model, mesh_size)
    total = 0
    for p in model.parameters():
        rows = p.shape[place(p).dim] if p.ndim else 1
        total += -(-rows // mesh_size) * (p.numel() // max(rows, 1))
    return total


def set_global_counts(model: nn.Module, mesh: DeviceMesh) -> None:
    """Give every MoE layer the all-reduce that sums its expert counts over data-parallel ranks."""

    group = mesh if mesh.ndim == 1 else mesh._flatten()  # HSDP: every replica's ranks too

    def reduce_counts(counts: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(counts, "sum", group)

    for module in model.modules():
        if isinstance(module, MoE):
            module.reduce_counts = reduce_counts


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """Wrap `model` (built on any device, typically meta) in place for data-parallel training.

    `model.layers` blocks become checkpointed (per cfg.activation_checkpointing), compiled (per
    cfg.compile) and FSDP units; the root becomes the last unit. Returns the model.
    """
    set_global_counts(model, mesh)
    dtype = param_dtype(cfg, device)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # A 2-D mesh makes fully_shard HSDP: sharded along its last dim, replicated along the first.
    fsdp = dict(mesh=mesh, mp_policy=mp, shard_placement_fn=_placement_fn(model, mesh.size(mesh.ndim - 1)))
    for i, block in enumerate(model.layers):
        if cfg.activation_checkpointing != "none":
            block = _checkpointed(block, cfg.activation_checkpointing)
        if cfg.compile:
            block.compile()  # in place: parameter names (and checkpoints) stay the same
        # The last block's parameters are needed again at once by backward: keep them gathered.
        last = i == len(model.layers) - 1
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward and not last, **fsdp)
        model.layers[i] = block
    # The root (tied embedding / output projection, final norm) is used again first thing in
    # backward: kept gathered, it is all-gathered once per micro-batch instead of twice.
    fully_shard(model, reshard_after_forward=False, **fsdp)
    return model


def data_parallel_mesh(device_type: str, world_size: int, replicate_degree: int) -> DeviceMesh:
    """[W] (FSDP), or [R, W/R] (HSDP): parameters sharded within each run of W/R consecutive
    ranks (a node: all-gathers stay on its links) and replicated across the R runs (only the
    gradient all-reduce crosses nodes). Either way rank r is data-parallel rank r of W."""
    if world_size % replicate_degree:
        raise ConfigError(f"parallel.replicate_degree: {replicate_degree} does not divide the {world_size} ranks")
    if replicate_degree == 1:
        return init_device_mesh(device_type, (world_size,))
    return init_device_mesh(device_type, (replicate_degree, world_size // replicate_degree),
                            mesh_dim_names=("replicate", "shard"))  # fmt: skip


@torch.no_grad()
def copy_full_tensors(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Set parameters of `model` (sharded or not) by their unwrapped names to full tensors.

    Every rank passes the same tensors and keeps its own shard of each, with no communication;
    names are those of the unparallelized model (no checkpoint or compile wrapper prefixes).
    """
    params = {name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): p
              for name, p in model.named_parameters()}  # fmt: skip
    for name, full in tensors:
        p = params[name]
        if p.shape != full.shape:
            raise ValueError(f"{name}: parameter of shape {tuple(p.shape)} vs tensor {tuple(full.shape)}")
        full = full.to(p.device, p.dtype)
        if isinstance(p, DTensor):
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        p.copy_(full)
