"""Reading a run back on one process: weights (final/model.pt or DCP), `ioe-train eval` and `sample`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from click.testing import CliRunner

from ioe_train.cli import main as ioe_train
from ioe_train.config import load_config
from ioe_train.generate import next_token_probs
from ioe_train.model import build_model, init_weights
from ioe_train.runs import load_model
from pile_prep.tokenizer import load_tokenizer
from tests.ioe_train.proxy import windows

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tmp_path, domain_shards):
    """A topk run directory on the proxy with a DCP checkpoint at step 5; returns (dir, model)."""
    train, val = domain_shards
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / "proxy_topk.yaml", [f"data.train_dirs=[{train}]", f"data.val_dirs=[{val}]",
                                                    f"output_dir={out}"])  # fmt: skip
    (out / "checkpoints" / "step_000005").mkdir(parents=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(0)
    model = build_model(cfg.model)
    init_weights(model, std=0.5)  # far from uniform predictions: every window's loss differs
    with pytest.warns(UserWarning, match="load in a single process|save in a single process"):
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(out / "checkpoints" / "step_000005"))
    return out, model, cfg


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_newest_weights_load_from_the_checkpoint_or_final_model_pt(run):
    out, model, cfg = run
    loaded, _, step = load_model(out)
    assert step == 5 and same_weights(loaded, model) and not loaded.training
    final = out / "final" / "model.pt"
    final.parent.mkdir()
    # The export format before weights_only (a dataclass inside): the checkpoint is read instead.
    torch.save({"model": {k: v * 0 for k, v in model.state_dict().items()}, "model_config": cfg.model, "step": 5},
               final)  # fmt: skip
    assert same_weights(load_model(out)[0], model)
    # A weights_only-loadable export at least as new as the checkpoint wins.
    halved = {k: v / 2 for k, v in model.state_dict().items()}
    torch.save({"model": halved, "model_config": {"name": "tiny_moe"}, "step": 7}, final)
    loaded, _, step = load_model(out)
    assert step == 7 and torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight / 2)


def test_eval_reports_the_loss_of_every_window_overall_and_per_domain(run, domain_shards):
    out, model, _ = run
    val = windows(domain_shards[1])  # [N, S + 1], all of them: one process
    for flag, per_document in (("--no-per-document", False), (None, True)):  # default: the run's eval protocol
        args = ["eval", str(out), "--data", str(domain_shards[1]), "--json"] + ([flag] if flag else [])
        result = CliRunner().invoke(ioe_train, args)
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        with torch.no_grad():
            logits, _, _ = model.eval()(val[:, :-1], per_document=per_document)
        want = F.cross_entropy(logits.flatten(0, 1), val[:, 1:].flatten()).item()
        assert report["step"] == 5 and report["val/loss"] == pytest.approx(want, rel=1e-5)
        assert report["per_document"] is per_document and report["packing"] == "stream"
        assert sorted(k for k in report if k.startswith("val/loss/")) == [f"val/loss/domain_{i:02d}" for i in range(8)]


def test_sample_continues_the_prompt_greedily_with_the_runs_tokenizer(run, domain_shards):
    out, model, _ = run
    args = ["sample", str(out), "--prompt", " the film", "--tokens", "6", "--temperature", "0"]
    result = CliRunner().invoke(ioe_train, args)
    assert result.exit_code == 0, result.output
    words = load_tokenizer(str(Path(domain_shards[0]).parent / "raw" / "tokenizer.json"))
    ids = words.encode(" the film")
    assert len(ids) == 2
    for _ in range(6):
        with torch.no_grad():
            logits, _, _ = model.eval()(torch.tensor([ids]))
        ids.append(int(logits[0, -1, :129].argmax()))
        if ids[-1] == 128:
            break
    assert result.stdout == words.decode([i for i in ids if i != 128]) + "\n"


def test_top_p_keeps_the_smallest_set_reaching_p_and_padding_ids_are_never_drawn():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 9.0]).log_softmax(-1)  # id 4: padding
    probs = next_token_probs(logits, temperature=1.0, top_p=0.7, allowed=4)
    p = torch.tensor([2.0, 1.0, 0.0, -1.0]).softmax(-1)  # 0.64, 0.24, 0.09, 0.03
    torch.testing.assert_close(probs, torch.tensor([p[0], p[1], 0, 0, 0]) / (p[0] + p[1]))
    assert next_token_probs(logits, 0.0, 1.0, allowed=4).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def _train_tool_runs(rank, world, train_dir, val_dir, root):
    from ioe_train.train import train

    for name, (config, extra) in TOOL_RUNS.items():
        overrides = [f"data.train_dirs=[{train_dir}]", f"data.val_dirs=[{val_dir}]", "steps=2", "micro_batch_size=2",
                     "eval.interval=2", "eval.max_batches=2", "checkpoint.interval=2", "logging.tensorboard=false",
                     "logging.expert_interval=0", f"output_dir={root}/{name}", *extra]  # fmt: skip
        cfg = load_config(CONFIGS / config, overrides)
        train(cfg, rank, world, 0)


# Routers and load-balancing scopes the post-training tools must read back (the shipped config
# balances over all ranks' tokens: aux_loss_scope global).
TOOL_RUNS = {
    "topk_global": ("proxy_topk.yaml", ["model.moe.aux_loss_scope=global"]),
    "topk_bias": ("proxy_topk_bias.yaml", []),
}


@pytest.fixture(scope="module")
def tool_runs(domain_shards, tmp_path_factory) -> Path:
    """Output dirs of 2-step trainings (checkpoint and final/model.pt at step 2) per TOOL_RUNS."""
    from tests.distributed import run_distributed

    root = tmp_path_factory.mktemp("tool_runs")
    run_distributed(_train_tool_runs, str(domain_shards[0]), str(domain_shards[1]), str(root), world_size=1)
    return root


@pytest.mark.parametrize("name", list(TOOL_RUNS))
def test_eval_sample_compare_and_export_read_runs_of_every_router_and_scope(tool_runs, domain_shards, tmp_path, name):
    run = tool_runs / name
    model, cfg, step = load_model(run)
    assert step == 2 and model.layers[0].mlp.cfg.router == cfg.model.moe.router  # what was trained
    cli = CliRunner()
    result = cli.invoke(ioe_train, ["eval", str(run), "--data", str(domain_shards[1]), "--no-per-document", "--json"])
    assert result.exit_code == 0, result.output
    val = windows(domain_shards[1])
    with torch.no_grad():
        logits, _, _ = model(val[:, :-1])  # a global-scope model counts this process's tokens
    want = F.cross_entropy(logits.flatten(0, 1), val[:, 1:].flatten()).item()
    assert json.loads(result.output)["val/loss"] == pytest.approx(want, rel=1e-5)

    result = cli.invoke(ioe_train, ["sample", str(run), "--prompt", " the film", "--tokens", "4", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(" the film")

    result = cli.invoke(ioe_train, ["compare", str(run), "--json"])
    assert result.exit_code == 0, result.output

    result = cli.invoke(ioe_train, ["export", str(run), "--step", "2", "--output", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output  # topk: Qwen2MoE; topk_bias: IoeForCausalLM (its selection bias)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
