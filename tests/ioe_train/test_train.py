from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import Replicate, Shard
from torch.utils._python_dispatch import TorchDispatchMode

import ioe_train.model as model_mod
import ioe_train.train as train_mod
from ioe_train.config import ConfigError, load_config
from ioe_train.loss import token_ce_sum
from ioe_train.model import build_model, init_weights
from ioe_train.moe import Experts
from ioe_train.parallelize import data_parallel_mesh, parallelize, shard_numel
from tests.distributed import run_distributed

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
B, S, A = 2, 16, 2


def small(train_dir: str, out: str, *extra: str) -> list[str]:
    return [f"data.train_dirs=[{train_dir}]", "data.val_dirs=[]", "eval.interval=0", f"data.seq_len={S}",
            f"micro_batch_size={B}", f"output_dir={out}", "logging.interval=1", *extra]  # fmt: skip


def _loss_and_grads_match_reference(rank, world, train_dir, out, checkpointing, *extra):
    w = 0.5
    cfg = load_config(CONFIG, small(train_dir, out, f"grad_accum_steps={A}", f"load_balancing_loss_weight={w}",
                                    "optim.max_grad_norm=0",
                                    f"parallel.activation_checkpointing={checkpointing}", *extra))  # fmt: skip
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    init_weights(ref)
    model = parallelize(copy.deepcopy(ref), cfg.parallel, init_device_mesh("cpu", (world,)), torch.device("cpu"))
    if rank == 0:  # rank 0 holds full-size shards: the planner's per-rank count, padding included
        assert sum(p.to_local().numel() for p in model.parameters()) == shard_numel(ref, world)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 151_000, (B, S + 1), generator=gen) for _ in range(world * A)]  # rank-major
    mine = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in batches[rank * A : (rank + 1) * A]]
    r = train_mod.train_step(model, iter(mine), cfg, torch.device("cpu"), want_experts=True)

    # Reference: one process, every rank's micro-batches; ce over all label tokens.
    ce_sum, aux, router = 0.0, [], []
    for t in batches:
        logits, router_loss, aux_loss = ref(t[:, :-1])
        ce_sum = ce_sum + token_ce_sum(logits, t[:, 1:])
        aux.append(aux_loss)
        router.append(router_loss)
    ce = ce_sum / (world * A * B * S)
    total = ce + w * torch.stack(aux).mean() + torch.stack(router).mean()
    total.backward()
    assert r.ce == pytest.approx(ce.item(), rel=1e-6)
    assert r.total == pytest.approx(total.item(), rel=1e-6)
    assert r.aux == pytest.approx(torch.stack(aux).mean().item(), rel=1e-6)
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        ref_grad = ref_grads[name.replace("_checkpoint_wrapped_module.", "")].grad
        torch.testing.assert_close(p.grad.full_tensor(), ref_grad, rtol=1e-5, atol=1e-7, msg=name)
    # expert load: every routed slot of every micro-batch of every rank, per layer
    k = cfg.model.moe.top_k
    assert r.expert_load.sum(axis=1).tolist() == [world * A * B * S * k] * r.expert_load.shape[0]


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_loss_composition_and_gradients_match_single_process(shards, tmp_path, checkpointing):
    run_distributed(_loss_and_grads_match_reference, str(shards[0]), str(tmp_path), checkpointing)


@pytest.mark.parametrize("num_experts", [2, 8])
def test_three_ranks_train_like_one_process_whatever_divides(shards, tmp_path, num_experts):
    # 2 experts [2, 64, 128] / [2, 64, 64] on 3 ranks: no dim divides by 3 (nor does the 151,936-row
    # embedding); 8 experts: 3 + 3 + 2 on the expert dim.
    run_distributed(_loss_and_grads_match_reference, str(shards[0]), str(tmp_path), "none",
                    f"model.moe.num_experts={num_experts}", "model.moe.top_k=1", world_size=3)  # fmt: skip


def _three_rank_run(rank, world, train_dir, out):
    cfg = load_config(CONFIG, small(train_dir, out, "steps=2", "checkpoint.interval=1", "model.moe.num_experts=2",
                                    "model.moe.top_k=1", "model.moe.aux_loss_scope=global"))  # fmt: skip
    train_mod.train(cfg, rank, world, rank)


def test_a_three_rank_run_with_two_experts_trains_and_checkpoints(shards, tmp_path):
    run_distributed(_three_rank_run, str(shards[0]), str(tmp_path / "run"), world_size=3)
    assert (tmp_path / "run" / "checkpoints" / "step_000002").is_dir()
    assert (tmp_path / "run" / "final" / "model.pt").is_file()


class _CountAllReduces(TorchDispatchMode):
    """Counts the functional all-reduces that reach dispatch (a recomputed one included)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops._c10d_functional.all_reduce.default
        return func(*args, **(kwargs or {}))


def _counts_all_reduce_not_recomputed(rank, world):
    cfg = load_config(CONFIG, ["data.train_dirs=[x]", "data.val_dirs=[]", "eval.interval=0", "model.vocab_size=512",
                               "model.moe.aux_loss_scope=global"])  # fmt: skip
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    init_weights(ref)
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(rank))
    results = {}
    for mode in ("none", "selective", "full"):
        cfg.parallel.activation_checkpointing = mode
        model = parallelize(copy.deepcopy(ref), cfg.parallel, init_device_mesh("cpu", (world,)), torch.device("cpu"))
        with _CountAllReduces() as counter:
            ce, router_loss, aux_loss = model(tokens[:, :-1], tokens[:, 1:])
            (ce + aux_loss + router_loss).backward()
        grads = [p.grad.full_tensor() for p in model.parameters()]
        results[mode] = (counter.count, aux_loss.detach(), grads)
    count, aux, grads = results["none"]
    assert count == len(ref.layers)  # one per MoE layer per micro-batch
    for mode in ("selective", "full"):
        assert results[mode][0] == count, (mode, results[mode][0])
        torch.testing.assert_close(results[mode][1], aux)
        for got, want in zip(results[mode][2], grads):
            torch.testing.assert_close(got, want)


def test_counts_all_reduce_is_not_recomputed_by_activation_checkpointing():
    run_distributed(_counts_all_reduce_not_recomputed)


def _fsdp_units_and_expert_placement(rank, world, num_experts, on_expert_dim):
    cfg = load_config(CONFIG, ["data.train_dirs=[x]", "data.val_dirs=[]", "eval.interval=0",
                               f"model.moe.num_experts={num_experts}", "model.moe.top_k=1",
                               "model.moe.aux_loss_scope=global"])  # fmt: skip
    with torch.device("meta"):
        model = build_model(cfg.model)
    parallelize(model, cfg.parallel, init_device_mesh("cpu", (world,)), torch.device("cpu"))
    assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.layers)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    for e in experts:
        for p in e.parameters():
            (placement,) = p.placements
            largest = max(range(1, p.ndim), key=lambda d: (p.shape[d], -d))
            assert placement == Shard(0 if on_expert_dim else largest), (p.shape, placement)
            assert p.to_local().numel() == p.numel() // world  # both ranks hold real rows
    assert all(m.reduce_counts is not None for m in model.modules() if hasattr(m, "reduce_counts"))


@pytest.mark.parametrize(("num_experts", "on_expert_dim"), [(1, False), (8, True)])
def test_experts_shard_on_a_non_expert_dim_when_fewer_than_ranks(num_experts, on_expert_dim):
    # 1 expert on 2 ranks: [1, D, 2H] sharded on its largest dim; 8 experts: the default Shard(0).
    run_distributed(_fsdp_units_and_expert_placement, num_experts, on_expert_dim)


def _poisoned_run(rank, world, overrides, mode):
    real, calls = model_mod.linear_cross_entropy, [0]

    def poisoned(h, weight, labels, chunk_tokens, reduction="sum"):
        value = real(h, weight, labels, chunk_tokens, reduction)
        if reduction == "none":  # evaluation
            return value
        calls[0] += 1
        return value * math.nan if rank == 0 and calls[0] == 3 else value  # step 3, one rank only

    model_mod.linear_cross_entropy = poisoned
    cfg = load_config(CONFIG, overrides + [f"on_nonfinite={mode}"])
    if mode == "stop":
        with pytest.raises(train_mod.NonFiniteLossError, match=r"^step 3: loss nan .* stopped without updating"):
            train_mod.train(cfg, rank, world, rank)
    else:
        train_mod.train(cfg, rank, world, rank)
        model_file = Path(cfg.output_dir) / "final" / "model.pt"
        if rank == 0:
            sd = torch.load(model_file, weights_only=False)["model"]
            assert all(torch.isfinite(t).all() for t in sd.values())


def test_nonfinite_loss_stops_naming_the_step(shards, tmp_path):
    out = tmp_path / "stop"
    run_distributed(_poisoned_run, small(str(shards[0]), str(out), "steps=5", "checkpoint.interval=2"), "stop")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]  # nothing after
    assert not (out / "final").exists()


def test_nonfinite_loss_skips_the_step_when_configured(shards, tmp_path):
    out = tmp_path / "skip"
    run_distributed(_poisoned_run, small(str(shards[0]), str(out), "steps=5", "checkpoint.interval=0",
                                         "logging.expert_interval=2"), "skip")  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/total" in r]
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 1, 1]
    assert math.isnan(steps[2]["loss/total"]) and math.isfinite(steps[4]["loss/total"])
    assert all(r["tokens"] == r["step"] * 2 * B * S for r in records)  # 2 ranks
    balance = [r for r in records if "experts/max_share" in r]  # ioe-train compare reads these
    assert [r["step"] for r in balance] == [2, 4] and all(0 < r["experts/entropy"] for r in balance)


def _sharded_init_equals_one_process(rank, world):
    cfg = load_config(CONFIG, ["data.train_dirs=[x]", "data.val_dirs=[]", "eval.interval=0"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    parallelize(model, cfg.parallel, init_device_mesh("cpu", (world,)), torch.device("cpu"))
    train_mod.materialize(model, cfg, torch.device("cpu"))
    ref = build_model(cfg.model)
    torch.manual_seed(cfg.seed)
    init_weights(ref)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), ref_params[name], rtol=0, atol=0, msg=name)
    # Shards are not copies of each other: experts 0 and E/2 (one on each rank) differ.
    experts = [m for m in model.modules() if isinstance(m, Experts)][0]
    w = next(experts.parameters()).full_tensor()
    assert not torch.equal(w[0], w[w.shape[0] // 2])


def _identical_ioe_experts_on_both_init_paths(rank, world):
    cfg = load_config(CONFIG, ["data.train_dirs=[x]", "data.val_dirs=[]", "eval.interval=0", "model.moe.router=ioe",
                               "model.moe.num_experts=4", "model.moe.ioe_expert_init=identical"])  # fmt: skip
    for cpu_path in (True, False):  # materialize's full copy on CPU; init_weights on the shards (CUDA's path)
        with torch.device("meta"):
            model = build_model(cfg.model)
        parallelize(model, cfg.parallel, init_device_mesh("cpu", (world,)), torch.device("cpu"))
        if cpu_path:
            train_mod.materialize(model, cfg, torch.device("cpu"))
        else:
            model.to_empty(device=torch.device("cpu"))
            torch.manual_seed(cfg.seed)
            init_weights(model)
        for experts in (m for m in model.modules() if isinstance(m, Experts)):
            for w in (experts.w_gate_up.full_tensor(), experts.w_down.full_tensor()):  # 2 experts per rank
                assert all(torch.equal(w[e], w[0]) for e in range(4)), (cpu_path, rank)
                assert w.std().item() == pytest.approx(0.02, rel=0.1)


def test_identical_ioe_experts_when_sharded():
    run_distributed(_identical_ioe_experts_on_both_init_paths)


def _indexes_built_by_local_rank_zero(rank, world, train_dir, val_dir, out):
    import ioe_train.data as data_mod
    import ioe_train.packing as packing_mod

    calls = []

    def counted(module, name):
        real = getattr(module, name)

        def slow(*args, **kwargs):
            calls.append((name, rank))
            time.sleep(0.5)  # a slow build: a rank that does not wait for it would build its own
            return real(*args, **kwargs)

        setattr(module, name, slow)

    counted(data_mod, "mixture_copies")
    counted(packing_mod, "document_order")
    cfg = load_config(CONFIG, small(train_dir, out, "steps=1", "data.mixture={ArXiv: 2.0}", "data.packing=by_source",
                                    f"data.val_dirs=[{val_dir}]", "eval.interval=1"))  # fmt: skip
    train_mod.train(cfg, rank, world, local_rank=rank)
    # Training and validation orders, and the mixture: each built once, by local rank 0.
    assert sorted(calls) == ([("document_order", 0)] * 2 + [("mixture_copies", 0)] if rank == 0 else []), calls


def test_packing_and_mixture_indexes_are_built_once_per_node(shards, tmp_path):
    run_distributed(_indexes_built_by_local_rank_zero, str(shards[0]), str(shards[1]), str(tmp_path / "run"))


def test_sharded_cpu_init_equals_one_process_init():
    run_distributed(_sharded_init_equals_one_process)


def _refuses_fresh_run_over_checkpoints(rank, world, train_dir, out):
    (Path(out) / "checkpoints" / "step_000005").mkdir(parents=True, exist_ok=True)
    cfg = load_config(CONFIG, small(train_dir, out, "checkpoint.resume=false", "steps=1"))
    with pytest.raises(ConfigError, match=r"checkpoint.resume: false, but .*step_000005 exists"):
        train_mod.train(cfg, rank, world, rank)


def test_fresh_run_over_old_checkpoints_is_refused(shards, tmp_path):
    run_distributed(_refuses_fresh_run_over_checkpoints, str(shards[0]), str(tmp_path))


def _hsdp_and_fsdp(rank, world, train_dir, root):
    mesh = data_parallel_mesh("cpu", world, replicate_degree=2)
    assert tuple(mesh.shape) == (2, 2) and list(mesh.get_coordinate()) == [rank // 2, rank % 2]
    model = parallelize(build_model(load_config(CONFIG).model), load_config(CONFIG).parallel, mesh,
                        torch.device("cpu"))  # fmt: skip
    assert all(p.placements[0] == Replicate() and isinstance(p.placements[1], Shard) for p in model.parameters())
    for replicate in (2, 1):
        cfg = load_config(CONFIG, small(train_dir, f"{root}/replicate{replicate}", "steps=3", "checkpoint.interval=0",
                                        "checkpoint.export_final=false", "logging.expert_interval=0",
                                        "model.moe.aux_loss_scope=global",  # counts all-reduced
                                        "grad_accum_steps=2",  # HSDP all-reduces after the last only
                                        f"parallel.replicate_degree={replicate}"))  # fmt: skip
        train_mod.train(cfg, rank, world, rank)


def test_hsdp_2x2_trains_like_fsdp_1x4(shards, tmp_path):
    run_distributed(_hsdp_and_fsdp, str(shards[0]), str(tmp_path), world_size=4)
    hsdp, fsdp = ([json.loads(line) for line in (tmp_path / f"replicate{r}" / "metrics.jsonl").open()]
                  for r in (2, 1))  # fmt: skip
    assert [r["step"] for r in hsdp] == [r["step"] for r in fsdp] == [1, 2, 3]
    for key in ("loss/ce", "loss/aux", "grad_norm"):  # aux: the expert counts reduce over all 4 ranks
        # the gradient sums run in another order (2 + 2 instead of 4): the last bits may differ
        assert [r[key] for r in hsdp] == pytest.approx([r[key] for r in fsdp], rel=1e-5), key


def _block_causal_keys(rank, world, train_dir, out):
    from ioe_train.model import document_starts
    from ioe_train.plan import visible_keys

    cfg = load_config(CONFIG, small(train_dir, out, f"grad_accum_steps={A}", "model.attention=block_causal",
                                    "model.vocab_size=512", "model.eos_id=7"))  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model)
    init_weights(model)
    model = parallelize(model, cfg.parallel, init_device_mesh("cpu", (world,)), torch.device("cpu"))
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 12, (B, S + 1), generator=gen) for _ in range(A)]  # id 7: ~1 EOS in 12
    mine = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in batches]
    r = train_mod.train_step(model, iter(mine), cfg, torch.device("cpu"), want_experts=False)
    keys = sum(visible_keys(document_starts(t[:, :-1], 7)) for t in batches)
    assert 0 < keys.item() < A * B * S * S / 2
    assert r.attention_keys_per_token == pytest.approx(keys.item() / (A * B * S))  # one rank: its own
    causal = load_config(CONFIG, small(train_dir, out))
    assert train_mod.train_step(model, iter(mine), causal, torch.device("cpu"), False).attention_keys_per_token == S / 2


def test_block_causal_steps_report_the_keys_their_documents_attend_to(shards, tmp_path):
    run_distributed(_block_causal_keys, str(shards[0]), str(tmp_path), world_size=1)


def _gathered_after_forward(rank, world):
    cfg = load_config(CONFIG, ["data.train_dirs=[x]", "data.val_dirs=[]", "eval.interval=0", "model.vocab_size=512",
                               "model.num_layers=4"])  # fmt: skip
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(rank))
    gathered = {}
    for reshard in (True, False):
        cfg.parallel.reshard_after_forward = reshard
        torch.manual_seed(0)
        model = build_model(cfg.model)
        init_weights(model)
        parallelize(model, cfg.parallel, init_device_mesh("cpu", (world,)), torch.device("cpu"))
        ce, router_loss, aux_loss = model(tokens[:, :-1], tokens[:, 1:])
        gathered[reshard] = sum(b._get_fsdp_state()._fsdp_param_group.is_unsharded for b in model.layers)
        (ce + router_loss + aux_loss).backward()
    # ioe-train plan counts 2 gathered blocks (the running and the prefetched one), or all of them
    assert gathered == {True: 1, False: 4}  # at the end of forward: the last block / every block


def test_blocks_stay_gathered_after_forward_as_the_planner_counts():
    run_distributed(_gathered_after_forward)
