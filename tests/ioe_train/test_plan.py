"""`ioe-train plan`: FLOP accounting, the activation model against autograd's saved tensors, the
device table, and the command's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ioe_train.cli import main
from ioe_train.config import load_config
from ioe_train.devices import match_device
from ioe_train.model import Arch, Decoder, build_model, init_weights
from ioe_train.moe import MoEConfig
from ioe_train.plan import activation_bytes_per_token, model_budget, plan

pytestmark = pytest.mark.usefixtures("one_thread")
REAL = Path(__file__).resolve().parents[2] / "configs" / "qwen2_5_0_5b_moe_pile_pretrain_fsdp.yaml"


def test_flops_per_token_counts_causal_attention_and_ioe_merges():
    cfg = load_config(REAL)
    with torch.device("meta"):
        dense = build_model(load_config(REAL, ["model.name=qwen2_5_dense"]).model)
        topk = build_model(cfg.model)
        ioe = build_model(load_config(REAL, ["model.moe.router=ioe"]).model)
    attention = 6 * 24 * 896 * 2048  # half of PaLM's 12 * L * D * S: the causal kernel's work
    assert model_budget(dense, 2048).flops_per_token == 6 * 494_032_768 + attention
    budget = model_budget(topk, 2048)
    assert budget.flops_per_token == 6 * budget.params_active + attention
    assert budget.params_embedding == 151_936 * 896 and budget.attention_flops_per_token == attention
    merges = 24 * 18 * 8 * 896 * 4864 / 64  # per layer: 3 x 2 x E x 3DH per segment of 64 tokens
    ioe_budget = model_budget(ioe, 2048)
    assert ioe_budget.flops_per_token == pytest.approx(6 * ioe_budget.params_active + attention + merges)


def saved_bytes_per_token(router: str | None, dtype: torch.dtype, **moe) -> tuple[float, Arch, MoEConfig | None]:
    """Bytes of the tensors autograd saves in one block's forward (parameters excluded), per token."""
    arch = Arch(vocab_size=97, num_layers=1, dim=64, num_heads=4, num_kv_heads=2, hidden_dim=192, max_seq_len=64)
    cfg = None if router is None else MoEConfig(router=router, num_experts=4, expert_hidden_dim=96, **moe)
    torch.manual_seed(0)
    model = Decoder(arch, cfg)
    init_weights(model)
    model.to(dtype)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = model.tok_embeddings(torch.randint(0, 97, (2, 64))).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x)
    return sum(storages.values()) / x.shape[:2].numel(), arch, cfg


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # bf16 RMSNorm on CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("router", "moe"), [(None, {}), ("topk", {"top_k": 2}), ("topk", {"top_k": 1}),
                                             ("topk", {"shared_expert_hidden_dim": 32}), ("topk_bias", {"top_k": 2}),
                                             ("ioe", {"ioe_segment_len": 16})])  # fmt: skip
def test_activation_model_matches_autograd_saved_tensors(router, moe, dtype):
    measured, arch, cfg = saved_bytes_per_token(router, dtype, **moe)
    a = torch.finfo(dtype).bits // 8
    assert activation_bytes_per_token(arch, cfg, a, "none") == pytest.approx(measured, rel=0.03)


def test_device_table_tells_rocm_and_nvidia_names_apart():
    # ROCm names MI250X and MI250 alike: the compute units per GCD tell them apart.
    assert match_device("AMD Instinct MI250X/MI250", 110).key == "mi250x"
    assert match_device("AMD Instinct MI250X/MI250", 104).key == "mi250"
    assert match_device("NVIDIA H100 80GB HBM3", 132).key == "h100"
    assert match_device("NVIDIA H100 NVL", 132).key == "h100-nvl"
    assert match_device("NVIDIA H100 PCIe", 114).key == "h100-pcie"
    assert match_device("NVIDIA H200", 132).key == "h200"
    assert match_device("AMD Instinct MI250X/MI250", 96) is None  # an unknown variant: no MFU, not a guess


def test_plan_fits_the_largest_micro_batch_and_no_more():
    cfg = load_config(REAL, ["parallel.activation_checkpointing=none"])
    p = plan(cfg, nproc_per_node=16, device="mi250x")
    assert p.world_size == 16 and p.tokens_per_step == 16 * 2 * 4 * 2048 and p.param_dtype == "bf16"
    assert p.max_micro_batch_size >= 1
    at_max = plan(load_config(REAL, ["parallel.activation_checkpointing=none",
                                     f"micro_batch_size={p.max_micro_batch_size}"]), 16)  # fmt: skip
    over = plan(load_config(REAL, ["parallel.activation_checkpointing=none",
                                   f"micro_batch_size={p.max_micro_batch_size + 1}"]), 16)  # fmt: skip
    assert at_max.fits and not over.fits
    more_ranks = plan(cfg, nproc_per_node=16, nnodes=2)
    assert more_ranks.memory_gib["optimizer states (AdamW, fp32)"] == pytest.approx(
        p.memory_gib["optimizer states (AdamW, fp32)"] / 2, rel=1e-3)  # the 8-row routers pad to 16 / 32
    hsdp = plan(load_config(REAL, ["parallel.activation_checkpointing=none", "parallel.replicate_degree=2"]), 16, 2)
    assert hsdp.memory_gib == p.memory_gib  # 2 nodes as 2 replicas of 16 shards: one node's memory
    selective = plan(load_config(REAL), 16)
    assert selective.memory_gib["activations"] < p.memory_gib["activations"] / 5


def test_plan_command_prints_the_table_and_stable_json():
    runner = CliRunner()
    text = runner.invoke(main, ["plan", str(REAL), "model.moe.router=ioe", "--nproc-per-node", "16"])
    assert text.exit_code == 0, text.output
    assert "IoE merged experts" in text.output and "largest micro-batch that fits" in text.output
    out = runner.invoke(main, ["plan", str(REAL), "--nproc-per-node", "16", "--json"])
    data = json.loads(out.output)
    for key in ("params_total", "params_active", "params_embedding", "flops_per_token", "tokens_per_step",
                "peak_gib_per_rank", "max_micro_batch_size", "memory_gib", "step_time_s"):
        assert key in data
    assert (data["params_total"], data["params_active"]) == (1_435_563_904, 494_204_800)
    bad = runner.invoke(main, ["plan", str(REAL), "--device", "tpu"])
    assert bad.exit_code == 1 and "--device: 'tpu' is not one of" in bad.output
    cpu = runner.invoke(main, ["plan", str(REAL), "--device", "cpu"])
    assert cpu.exit_code == 1 and "--device cpu needs --device-gib" in cpu.output


def test_plan_counts_expert_shards_as_parallelize_places_them():
    # 24 or 48 ranks: none of 896, 2432, 4864 divides, so the 8 experts shard on dim 0 padded: one
    # expert per rank on 8 ranks, and every rank reserves that much (FSDP2 pads to equal shards).
    cfg = load_config(REAL)
    with torch.device("meta"):
        model = build_model(cfg.model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)  # [8, ., .] each
    for world in (16, 24, 48):
        p = plan(cfg, nproc_per_node=8, nnodes=world // 8)
        per_rank = p.memory_gib["sharded parameters (fp32)"] * 2**30 / 4
        want_experts = experts / world if world == 16 else experts / 8  # 24, 48: no dim divides
        assert per_rank == pytest.approx(want_experts + (p.params_total - experts) / world, rel=2e-3), world
        assert p.fits, world


@pytest.mark.parametrize(("router", "gathered_gib"), [("topk", 2.67), ("ioe", 5.01)])
def test_plan_keeps_every_block_gathered_without_reshard_after_forward(router, gathered_gib):
    # parallelize.py: with reshard_after_forward false each block stays gathered from its forward
    # to its backward, so at the end of forward the root and all 24 blocks are unsharded (bf16).
    resharded = plan(load_config(REAL, [f"model.moe.router={router}"]), 16)
    kept = plan(load_config(REAL, [f"model.moe.router={router}", "parallel.reshard_after_forward=false"]), 16)
    with torch.device("meta"):
        model = build_model(load_config(REAL, [f"model.moe.router={router}"]).model)
    layer = sum(p.numel() for p in model.layers[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - 24 * layer
    assert resharded.memory_gib["unsharded parameters (FSDP)"] == pytest.approx(2 * (root + 2 * layer) / 2**30)
    assert kept.memory_gib["unsharded parameters (FSDP)"] == pytest.approx(2 * (root + 24 * layer) / 2**30)
    assert kept.memory_gib["unsharded parameters (FSDP)"] == pytest.approx(gathered_gib, abs=0.005)
    extra = kept.memory_gib["unsharded parameters (FSDP)"] - resharded.memory_gib["unsharded parameters (FSDP)"]
    assert kept.peak_gib_per_rank == pytest.approx(resharded.peak_gib_per_rank + extra)


def test_headroom_is_named_rows_and_json_keys_that_decide_the_fit():
    from ioe_train.plan import FRAGMENTATION, RUNTIME_RESERVE_GIB

    p = plan(load_config(REAL), 16)
    rows = p.memory_gib
    assert rows["fragmentation allowance"] == pytest.approx(FRAGMENTATION * rows["peak"])
    assert rows["runtime reserve (context, NCCL/RCCL)"] == RUNTIME_RESERVE_GIB > 0
    assert rows["required"] == pytest.approx(rows["peak"] + rows["fragmentation allowance"] + RUNTIME_RESERVE_GIB)
    assert (p.fragmentation_gib, p.runtime_reserve_gib, p.required_gib_per_rank) == (
        rows["fragmentation allowance"], RUNTIME_RESERVE_GIB, rows["required"])
    # the largest micro-batch is the largest whose requirement, not its bare peak, fits the device
    at_max = plan(load_config(REAL, [f"micro_batch_size={p.max_micro_batch_size}"]), 16)
    over = plan(load_config(REAL, [f"micro_batch_size={p.max_micro_batch_size + 1}"]), 16)
    assert at_max.required_gib_per_rank <= 64 < over.required_gib_per_rank
    cpu = plan(load_config(REAL), 16, device="cpu", device_gib=64)
    assert cpu.runtime_reserve_gib == 0  # host memory: no device context or NCCL buffers
    out = json.loads(CliRunner().invoke(main, ["plan", str(REAL), "--nproc-per-node", "16", "--json"]).output)
    assert {"fragmentation_gib", "runtime_reserve_gib", "required_gib_per_rank"} <= out.keys()


def test_block_causal_attention_flops_count_the_keys_of_each_document():
    from ioe_train.model import document_starts
    from ioe_train.plan import attention_flops_per_token, visible_keys

    # one window of 8: documents of 3 and 5 tokens (EOS = 9 ends the first); one of 8 tokens
    tokens = torch.tensor([[1, 2, 9, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
    keys = visible_keys(document_starts(tokens, 9))  # sum over documents of n^2 / 2
    assert keys.item() == (3**2 + 5**2) / 2 + 8**2 / 2
    arch = Arch(vocab_size=97, num_layers=2, dim=64, num_heads=4, num_kv_heads=2, hidden_dim=192, max_seq_len=8)
    # causal: S / 2 keys per token, the budget's attention term
    assert attention_flops_per_token(arch, 8 / 2) == 6 * 2 * 64 * 8
    assert attention_flops_per_token(arch, keys.item() / 16) == 12 * 2 * 64 * (17 + 32) / 16
