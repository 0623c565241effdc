"""Aux-loss-free balancing (`topk_bias`): the bias picks experts but never weights them, its
update moves a skewed load toward balance, and a resumed run continues with the saved bias."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import ioe_train.train as train_mod
from ioe_train.config import load_config
from ioe_train.moe import MoE, MoEConfig, update_router_biases
from tests.distributed import run_distributed

D = 8
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


def biased_moe(**cfg) -> MoE:
    torch.manual_seed(0)
    return MoE(D, MoEConfig(router="topk_bias", expert_hidden_dim=16, **cfg))


def test_bias_selects_experts_but_weights_stay_unbiased():
    moe = biased_moe(num_experts=4, top_k=2)
    moe.router.gate.weight.data = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]).repeat(1, D // 2)
    x = torch.tensor([[2.0, 1.0] + [0.0] * (D - 2)])  # probs ~ [0.71, 0.26, 0.01, 0.03]
    probs = torch.softmax(torch.tensor([2.0, 1.0, -2.0, -1.0]), -1)
    assert moe.router.route(x)[3].tolist() == [[0, 1]]
    moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    _, _, weights, indices = moe.router.route(x)
    assert indices.tolist() == [[3, 0]]
    torch.testing.assert_close(weights, (probs[[3, 0]] / probs[[3, 0]].sum())[None])


def test_bias_update_moves_a_skewed_load_toward_balance():
    moe = biased_moe(num_experts=4, top_k=1, bias_update_rate=0.01)
    skew = torch.randn(D)
    skew = 1.5 * skew / skew.norm()
    moe.router.gate.weight.data[0] = skew  # expert 0 leads by ~2.25 logits: it takes ~90% at first
    x = torch.randn(4, 32, D) + skew
    shares = []
    for _ in range(100):
        load = moe.forward_with_stats(x).tokens_per_expert  # [E]
        shares.append((load.max() / load.sum()).item())
        update_router_biases(torch.nn.ModuleList([moe]), load[None])
    assert shares[0] > 0.8 and max(shares[-20:]) < 0.4  # 1 / E = 0.25 is perfect balance
    assert moe.router.expert_bias[0] < 0 < moe.router.expert_bias[1:].min()


def test_update_rejects_a_load_of_the_wrong_layer_count():
    with pytest.raises(ValueError, match="2 rows for 1 MoE layers"):
        update_router_biases(torch.nn.ModuleList([biased_moe()]), torch.ones(2, 8))


def test_config_rejects_a_negative_rate():
    with pytest.raises(ValueError, match="bias_update_rate"):
        MoEConfig(bias_update_rate=-1.0)


class _Interrupted(Exception):
    pass


def _losses_and_bias(out: Path) -> tuple[list[float], list[torch.Tensor]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    model = torch.load(out / "final" / "model.pt", weights_only=False)["model"]
    return [r["loss/total"] for r in records if "loss/total" in r], [
        v for k, v in sorted(model.items()) if k.endswith("expert_bias")
    ]


def _whole_and_interrupted_runs(rank, world, train_dir, root):
    overrides = [f"data.train_dirs=[{train_dir}]", "data.val_dirs=[]", "eval.interval=0", "data.seq_len=16",
                 "micro_batch_size=2", "steps=5", "checkpoint.interval=3", "logging.interval=1",
                 "logging.expert_interval=0", "model.moe.router=topk_bias",
                 "model.moe.bias_update_rate=0.01"]  # fmt: skip
    train_mod.train(load_config(CONFIG, overrides + [f"output_dir={root}/whole"]), rank, world, rank)

    real = train_mod.Checkpointer

    class StopAfterFirstSave(real):
        def save(self, *args, **kwargs):
            path = super().save(*args, **kwargs)
            raise _Interrupted(path)

    train_mod.Checkpointer = StopAfterFirstSave
    try:
        with pytest.raises(_Interrupted):
            train_mod.train(load_config(CONFIG, overrides + [f"output_dir={root}/split"]), rank, world, rank)
    finally:
        train_mod.Checkpointer = real
    train_mod.train(load_config(CONFIG, overrides + [f"output_dir={root}/split"]), rank, world, rank)


@pytest.mark.slow
def test_resume_continues_with_the_saved_bias(shards, tmp_path):
    run_distributed(_whole_and_interrupted_runs, str(shards[0]), str(tmp_path))
    losses, biases = _losses_and_bias(tmp_path / "whole")
    split_losses, split_biases = _losses_and_bias(tmp_path / "split")
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert split_losses == losses  # bit for bit
    assert len(biases) == 2 and all((b != 0).float().mean() > 0.5 for b in biases)  # 5 updates of +-0.01 (or 0)
    for a, b in zip(biases, split_biases):
        assert torch.equal(a, b)
