"""Routing diagnostics: the routing overrides of every router, and the diagnostics of models whose
routing is known (experts chosen by domain, or a constant router) and of a trained run."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ioe_train.cli import main as ioe_train
from ioe_train.config import load_config
from ioe_train.data import EvalSet
from ioe_train.diagnostics import (
    item_sources,
    mutual_information,
    routing_diagnostics,
    routing_override,
    train_val_gap,
)
from ioe_train.model import ModelConfig, build_model, init_weights
from ioe_train.moe import ROUTERS, MoE, MoEConfig
from ioe_train.runs import read_metrics
from pile_prep.sample import DOMAIN_WORDS, write_domain_tokenizer
from pile_prep.tokenize import TokenizeOptions, tokenize
from tests.ioe_train.conftest import run_launch
from tests.pile_prep.conftest import pile_record, write_jsonl_zst

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
D, H = 8, 16


def make_moe(router: str, **cfg) -> MoE:
    torch.manual_seed(0)
    moe = MoE(D, MoEConfig(router=router, num_experts=4, top_k=2, expert_hidden_dim=H, ioe_segment_len=4, **cfg))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return moe


def permutation(normal: torch.Tensor, shuffled: torch.Tensor) -> torch.Tensor:
    """rows [R, C] -> perm [R] with shuffled[i] == normal[perm[i]], each row matched exactly once."""
    match = (shuffled[:, None, :] == normal[None, :, :]).all(dim=-1)  # [R, R]
    assert (match.sum(dim=1) == 1).all() and (match.sum(dim=0) == 1).all(), "not a permutation"
    return match.float().argmax(dim=1)


def decisions(routing) -> torch.Tensor:
    """The applied routing of each routed item, one row each: [R, 2J] (expert ids, weights)."""
    rows = torch.cat([routing.indices.float(), routing.weights], dim=-1)  # [B, M, 2J]
    return rows[routing.routed]


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_honours_the_routing_overrides(router):
    moe = make_moe(router)
    x, other = torch.randn(3, 20, D), torch.randn(3, 20, D)
    normal = moe.forward_with_stats(x)
    with routing_override(moe, "uniform"):
        uniform, uniform_other = moe.forward_with_stats(x), moe.forward_with_stats(other)
    with routing_override(moe, "shuffle"):
        shuffled = moe.forward_with_stats(x)
    assert moe.router.routing_override is None
    torch.testing.assert_close(moe.forward_with_stats(x).out, normal.out, rtol=0, atol=0)

    # uniform: the same routing whatever the input, every used expert weighted alike, all experts used
    u = uniform.routing
    assert torch.equal(u.indices, uniform_other.routing.indices)
    assert torch.equal(u.weights, uniform_other.routing.weights)
    torch.testing.assert_close(u.weights, torch.full_like(u.weights, 1 / u.weights.shape[-1]))
    load = torch.zeros(4).index_add_(0, u.indices.flatten(), u.share.flatten())
    assert load.min() > 0.15 * load.sum()
    torch.testing.assert_close(u.probs, normal.routing.probs)  # the router's own distribution, as before
    assert not torch.allclose(uniform.out, normal.out)

    # shuffle: the routed items' decisions, permuted among them
    perm = permutation(decisions(normal.routing), decisions(shuffled.routing))
    assert not torch.equal(perm, torch.arange(len(perm)))
    assert not torch.allclose(shuffled.out, normal.out)


def expert_outputs(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: x [T, D] -> [T, E, D]."""
    gate, up = torch.einsum("td,edh->teh", x, moe.experts.w_gate_up).chunk(2, dim=-1)
    return torch.einsum("teh,ehd->ted", F.silu(gate) * up, moe.experts.w_down)


def test_topk_shuffle_gives_each_token_another_tokens_experts_and_weights():
    moe = make_moe("topk")
    x = torch.randn(3, 20, D)
    normal = moe.forward_with_stats(x)
    with routing_override(moe, "shuffle"):
        shuffled = moe.forward_with_stats(x)
    perm = permutation(decisions(normal.routing), decisions(shuffled.routing))  # [T]
    indices = normal.routing.indices.reshape(-1, 2)[perm]  # [T, K]
    weights = normal.routing.weights.reshape(-1, 2)[perm]
    ys = expert_outputs(moe, x.reshape(-1, D))  # [T, E, D]
    want = (ys.gather(1, indices[..., None].expand(-1, -1, D)) * weights[..., None]).sum(dim=1)  # [T, D]
    torch.testing.assert_close(shuffled.out, want.view_as(x))


def merged_reference(moe: MoE, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """IoE with given merge weights: x [B, S, D], g [B, N, E] -> [B, S, D] (S a multiple of L)."""
    b, s, _ = x.shape
    xs = x.view(b, g.shape[1], -1, D)  # [B, N, L, D]
    w_gu = torch.einsum("bne,edh->bndh", g, moe.experts.w_gate_up)
    w_d = torch.einsum("bne,ehd->bnhd", g, moe.experts.w_down)
    gate, up = torch.einsum("bnld,bndh->bnlh", xs, w_gu).chunk(2, dim=-1)
    return torch.einsum("bnlh,bnhd->bnld", F.silu(gate) * up, w_d).reshape(b, s, D)


def test_ioe_overrides_permute_the_routed_segments_merge_weights_or_merge_uniformly():
    moe = make_moe("ioe", ioe_document_reset=True)
    x = torch.randn(3, 20, D)  # 5 segments per sequence
    doc_start = torch.zeros(3, 20, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[0, 6] = True  # sequence 0's segment 2 takes the prior
    normal = moe.forward_with_stats(x, doc_start)
    g, routed = normal.routing.weights, normal.routing.routed  # [B, N, E], [B, N]
    assert routed.sum() == 3 * 4 - 1
    with routing_override(moe, "shuffle"):
        shuffled = moe.forward_with_stats(x, doc_start)
    perm = permutation(g[routed], shuffled.routing.weights[routed])
    want = g.clone()
    want[routed] = g[routed][perm]
    torch.testing.assert_close(shuffled.routing.weights, want, rtol=0, atol=0)  # prior segments keep the prior
    torch.testing.assert_close(shuffled.out, merged_reference(moe, x, want))
    with routing_override(moe, "uniform"):
        uniform = moe.forward_with_stats(x, doc_start)
    torch.testing.assert_close(uniform.out, merged_reference(moe, x, torch.full_like(g, 0.25)))


def test_item_sources_and_mutual_information_by_hand():
    source_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 3, 3]])
    assert item_sources(source_ids, 4, 3).tolist() == [[0, -1, 3]]  # the padded tail ignored
    assert item_sources(source_ids, 1, 10).tolist() == source_ids.tolist()
    assert mutual_information(torch.tensor([[5.0, 0.0], [0.0, 5.0]])) == pytest.approx(math.log(2))
    assert mutual_information(torch.tensor([[2.0, 2.0], [1.0, 1.0]])) == pytest.approx(0.0, abs=1e-12)
    # p(source 0) = 1/2, p(e | 0) = (1, 0), p(e | 1) = (1/2, 1/2): H(e) - H(e | s) = H(3/4) - ln 2 / 2
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert mutual_information(torch.tensor([[2.0, 0.0], [1.0, 1.0]])) == pytest.approx(h - math.log(2) / 2)


def test_train_val_gap_is_the_last_val_loss_minus_the_last_train_loss():
    records = [{"step": 1, "loss/ce": 5.0}, {"step": 2, "val/loss": 4.5}, {"step": 3, "loss/ce": 4.0},
               {"step": 3, "expert/x": 1}]  # fmt: skip
    gap = train_val_gap(records)
    assert (gap.train_loss, gap.train_step, gap.val_loss, gap.val_step, gap.gap) == (4.0, 3, 4.5, 2, 0.5)
    assert train_val_gap(records[:1]) is None


# A corpus whose domains use disjoint words: domain d writes words 16d .. 16d + 15, so a token's
# embedding can carry its domain, and a router can be set by hand to route by domain.
DOMAINS, WORDS_PER_DOMAIN, DOC_WORDS, SEQ = 8, 16, 48, 64
EOS = DOMAINS * WORDS_PER_DOMAIN


def write_disjoint_domains(root: Path) -> Path:
    """The val shards of 96 documents of 48 words (12 per domain), in random order."""
    rng = random.Random(0)
    docs = [d for d in range(DOMAINS) for _ in range(12)]
    rng.shuffle(docs)
    records = [pile_record("".join(" " + DOMAIN_WORDS[WORDS_PER_DOMAIN * d + rng.randrange(WORDS_PER_DOMAIN)]
                                   for _ in range(DOC_WORDS)), f"domain_{d:02d}") for d in docs]  # fmt: skip
    tok = write_domain_tokenizer(root / "tokenizer.json", EOS)
    tokenize(TokenizeOptions(inputs=[str(write_jsonl_zst(root / "val.jsonl.zst", records))], output=root / "val",
                             workers=1, tokenizer=str(tok), progress=False))  # fmt: skip
    return root / "val"


@pytest.fixture(scope="module")
def disjoint_domains(tmp_path_factory) -> Path:
    return write_disjoint_domains(tmp_path_factory.mktemp("disjoint"))


def domain_model(router: str, gate_kind: str) -> torch.nn.Module:
    """A 2-layer MoE (16 experts) whose routing is set by hand. Attention adds nothing; a word's
    embedding is 1 at dim d (its domain) plus noise on dims 8..63. Experts 2d and 2d + 1 fire on
    dim d and add the mean embedding of domain d's words (dims 8..63 only: the domain dims, and
    so the next layer's routing, stay). The router's gate: "domain" sends domain d to experts 2d
    and 2d + 1 (top-2: both; IoE: g of 1/2 each), "zero" is constant (uniform probs; IoE: a uniform
    merge), "one_pair" sends every domain to experts 0 and 1."""
    moe = MoEConfig(router=router, num_experts=16, top_k=2, expert_hidden_dim=8, ioe_segment_len=8,
                    ioe_document_reset=router == "ioe")  # fmt: skip
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny_moe", vocab_size=EOS + 1, max_seq_len=SEQ, eos_id=EOS, moe=moe))
    init_weights(model)
    with torch.no_grad():
        emb = model.tok_embeddings.weight  # [V, 64]
        emb.zero_()
        emb[:, DOMAINS:] = 0.3 * torch.randn(EOS + 1, 64 - DOMAINS)
        words = torch.arange(EOS)
        emb[words, words // WORDS_PER_DOMAIN] = 1.0
        mean_word = emb[:EOS, DOMAINS:].view(DOMAINS, WORDS_PER_DOMAIN, -1).mean(dim=1)  # [domains, 56]
        for layer in model.layers:
            layer.attn.output_proj.weight.zero_()
            experts, gate = layer.mlp.experts, layer.mlp.router.gate.weight  # [E, D]
            experts.w_gate_up.zero_()
            experts.w_down.zero_()
            gate.zero_()
            for e in range(16):
                experts.w_gate_up[e, e // 2] = 1.0  # gate and up units read dim d
                experts.w_down[e, :, DOMAINS:] = mean_word[e // 2] / mean_word[e // 2].norm() / 8
                if gate_kind == "domain":
                    gate[e, e // 2] = 10.0
            if gate_kind == "one_pair":
                gate[:2, :DOMAINS] = 10.0
    return model


def diagnose(model, val_dir: Path):
    return routing_diagnostics(model, EvalSet([str(val_dir)], SEQ, rank=0, world_size=1), batch_size=8)


@pytest.mark.parametrize("router", ["topk", "ioe"])
def test_routing_by_domain_carries_the_domain_and_is_worth_loss(router, disjoint_domains):
    routed = diagnose(domain_model(router, "domain"), disjoint_domains)
    constant = diagnose(domain_model(router, "zero"), disjoint_domains)
    assert routed.losses["val/loss"] < constant.losses["val/loss"] - 0.1  # the hand-set experts help
    for layer in routed.layers:
        assert layer.source_entropy == pytest.approx(math.log(DOMAINS), abs=0.05)
        assert layer.mi_fraction > 0.85, layer
        assert math.log(2) - 1e-6 < layer.entropy < math.log(2) + 0.15  # half and half on a domain's pair
        assert layer.weight_entropy == pytest.approx(math.log(2), abs=0.05)
        assert layer.max_share == pytest.approx(1 / 16, abs=0.02)
    for layer in constant.layers:
        assert layer.mutual_information == pytest.approx(0, abs=1e-9)
    # Routing by domain is worth loss: without it (uniform, or another item's routing) it rises.
    assert routed.interventions["uniform"].delta > 0.1 and routed.interventions["shuffle"].delta > 0.1
    for name, i in routed.interventions.items():
        assert i.delta == pytest.approx(i.loss - routed.losses["val/loss"]), name


def test_ioe_statistics_cover_the_routed_segments_only_and_uniform_routing_loses_nothing(disjoint_domains):
    routed = diagnose(domain_model("ioe", "domain"), disjoint_domains)
    constant = diagnose(domain_model("ioe", "zero"), disjoint_domains)
    windows = torch.cat([b["input_ids"] for b in EvalSet([str(disjoint_domains)], SEQ, 0, 1).batches(8, 0)])
    # segment s >= 1 is routed when segment s - 1 holds no EOS (no document starts in (sL - L, sL])
    has_eos = (windows == EOS).view(len(windows), SEQ // 8, 8).any(dim=-1)  # [windows, N]
    assert routed.layers[0].items == constant.layers[0].items == int((~has_eos[:, :-1]).sum())
    assert routed.span == 8 and routed.experts_per_item == 16
    # The prior's segments (uniform g, entropy ln 16) are not in the entropy or the load; a routed
    # segment's predecessor holds no EOS, so its domain is clear: g = 1/2 on the domain's pair.
    assert routed.layers[0].entropy == pytest.approx(math.log(2), abs=1e-4)
    for layer in constant.layers:
        assert layer.entropy == pytest.approx(math.log(16)) and layer.max_share == pytest.approx(1 / 16)
    # A router that already merges uniformly: both interventions change nothing, to the bit.
    assert constant.interventions["uniform"].delta == 0.0 and constant.interventions["shuffle"].delta == 0.0
    # Every routed segment on experts 0 and 1: the load is theirs alone (the prior's uniform
    # segments would spread it), and nothing is said about the source.
    for layer in diagnose(domain_model("ioe", "one_pair"), disjoint_domains).layers:
        assert layer.max_share == pytest.approx(0.5, abs=1e-3)
        assert layer.load_entropy == pytest.approx(math.log(2), abs=0.01)
        assert layer.mutual_information < 0.01


def test_topk_statistics_separate_the_softmax_from_the_top_k_weights(disjoint_domains):
    routed = diagnose(domain_model("topk", "domain"), disjoint_domains)
    constant = diagnose(domain_model("topk", "zero"), disjoint_domains)
    # Layer 0's softmax: 1/2 on the domain's pair for the 48 words of a document, uniform (its
    # domain dims are 0) for the EOS; the renormalised top-2 weights are 1/2 and 1/2 for all.
    want = (DOC_WORDS * math.log(2) + math.log(16)) / (DOC_WORDS + 1)
    assert routed.layers[0].entropy == pytest.approx(want, abs=1e-3)
    assert routed.layers[0].weight_entropy == pytest.approx(math.log(2), abs=1e-6)
    for layer in constant.layers:
        assert layer.entropy == pytest.approx(math.log(16))  # the full softmax: uniform
        assert layer.weight_entropy == pytest.approx(math.log(2))  # the 2 renormalised top-k weights
        assert layer.max_share == pytest.approx(0.5)  # ties: the same 2 experts for every token
        assert layer.items == layer.mi_items == constant.layers[0].items


@pytest.fixture(scope="module")
def ioe_run(domain_shards, tmp_path_factory) -> Path:
    """A real 4-step run of configs/proxy_ioe.yaml (one process), evaluated at steps 2 and 4."""
    train, val = domain_shards
    out = tmp_path_factory.mktemp("ioe_run") / "run"
    cmd = [sys.executable, "-c", "from ioe_train.cli import main; main()", "launch", str(CONFIGS / "proxy_ioe.yaml"),
           f"data.train_dirs=[{train}]", f"data.val_dirs=[{val}]", "steps=4", "eval.interval=2",
           "eval.max_batches=2", "logging.interval=1", "checkpoint.interval=0", f"output_dir={out}",
           "--nproc-per-node", "1"]  # fmt: skip
    run_launch(cmd, out.parent / "console.log")
    return out


def test_eval_routing_reports_interventions_information_and_the_gap(ioe_run, domain_shards):
    args = ["eval", str(ioe_run), "--data", str(domain_shards[1]), "--batches", "3", "--no-per-document"]
    plain = CliRunner().invoke(ioe_train, [*args, "--json"])
    result = CliRunner().invoke(ioe_train, [*args, "--routing", "--json"])
    assert plain.exit_code == 0 and result.exit_code == 0, result.output
    report, plain_report = json.loads(result.output), json.loads(plain.output)
    assert report["val/loss"] == pytest.approx(plain_report["val/loss"], rel=1e-9)  # the pass as trained
    routing = report["routing"]
    assert (routing["router"], routing["num_experts"], routing["span"]) == ("ioe", 16, 16)
    assert sorted(routing["interventions"]) == ["shuffle", "uniform"]
    for i in routing["interventions"].values():
        assert i["delta"] == pytest.approx(i["loss"] - report["val/loss"])
    assert [layer["layer"] for layer in routing["layers"]] == [0, 1]
    # 3 batches of 8 windows of 64 tokens: 3 routed segments (of 4) per window, no document reset
    assert all(layer["items"] == 3 * 8 * 3 for layer in routing["layers"])
    assert all(0 <= layer["mutual_information"] <= layer["source_entropy"] for layer in routing["layers"])
    per_doc = CliRunner().invoke(ioe_train, [*args[:-1], "--per-document", "--routing", "--json"])
    reset = json.loads(per_doc.output)["routing"]["layers"]  # segments after a document start take the prior
    assert all(0 < layer["items"] < 3 * 8 * 3 for layer in reset)
    records = read_metrics(ioe_run)
    train = [r for r in records if "loss/ce" in r][-1]
    val = [r for r in records if "val/loss" in r][-1]
    assert report["train_val_gap"] == {"train_loss": train["loss/ce"], "train_step": 4, "val_loss": val["val/loss"],
                                       "val_step": 4, "gap": val["val/loss"] - train["loss/ce"]}  # fmt: skip

    text = CliRunner().invoke(ioe_train, [*args, "--routing"])
    assert text.exit_code == 0, text.output
    assert "routing: ioe, 16 experts" in text.output and "train-val gap: val loss" in text.output
    assert f"loss as trained {report['val/loss']:.4f} | uniform" in text.output


def test_eval_routing_of_a_dense_run_says_there_is_none(tmp_path, domain_shards):
    cfg = load_config(CONFIGS / "proxy_dense.yaml", [f"output_dir={tmp_path}"])
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    args = ["eval", str(tmp_path), "--data", str(domain_shards[1]), "--routing"]
    result = CliRunner().invoke(ioe_train, args)
    assert result.exit_code == 0 and "a dense model, no routing to diagnose" in result.output
    result = CliRunner().invoke(ioe_train, [*args, "--json"])
    assert result.exit_code == 0 and json.loads(result.output) == {"run": str(tmp_path), "routing": None}
