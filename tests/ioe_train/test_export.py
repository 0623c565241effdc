"""Hugging Face export: real short training runs, loaded back with transformers, give our logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ioe_train.cli import main
from ioe_train.config import load_config
from ioe_train.export import export_hf, model_config_from_dict, read_weights
from ioe_train.model import build_model
from ioe_train.train import train
from tests.distributed import run_distributed

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"
STEPS = 2
# name -> overrides of configs/tiny_cpu.yaml (top-2 of 8 experts, renormalised)
RUNS = {
    "dense": ["model.name=tiny_dense"],
    "topk": [],
    # K = 1 keeps the raw top probability (norm_topk_prob must be false); shared expert on
    "topk1_shared": ["model.moe.top_k=1", "model.moe.shared_expert_hidden_dim=32"],
}


def _train_runs(rank, world, train_dir, root):
    for name, extra in RUNS.items():
        cfg = load_config(CONFIG, [f"data.train_dirs=[{train_dir}]", "data.val_dirs=[]", "eval.interval=0",
                                   "data.seq_len=16", "micro_batch_size=2", f"steps={STEPS}",
                                   "checkpoint.interval=0", "logging.tensorboard=false",
                                   "logging.expert_interval=0", f"output_dir={root}/{name}", *extra])  # fmt: skip
        train(cfg, rank, world, 0)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> Path:
    """Output dirs of STEPS-step trainings (final/model.pt and checkpoints/step_000002) per RUNS."""
    root = tmp_path_factory.mktemp("runs")
    run_distributed(_train_runs, str(shards[0]), str(root), world_size=1)
    return root


def _logits_ours(run: Path, tokens: torch.Tensor) -> torch.Tensor:
    cfg, sd, _ = read_weights(run)
    model = build_model(cfg)
    model.load_state_dict(sd)
    with torch.no_grad():
        return model.eval()(tokens)[0]


def test_final_model_pt_opens_with_default_torch_load(runs):
    saved = torch.load(runs / "topk1_shared" / "final" / "model.pt")  # weights_only=True
    assert set(saved) == {"model", "model_config", "step"}
    assert saved["step"] == STEPS
    assert model_config_from_dict(saved["model_config"]) == load_config(runs / "topk1_shared" / "config.yaml").model


@pytest.mark.parametrize("name", list(RUNS))
def test_export_loads_in_transformers_with_our_logits(runs, tmp_path, name):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    # the dense export is sharded: the 38.9 MB embedding alone passes 20 MB
    export_hf(runs / name, out, max_shard_bytes=20 * 10**6 if name == "dense" else 10**9)
    if name == "dense":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                             "model-00002-of-00002.safetensors"]  # fmt: skip
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # nothing left at random init
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if name == "dense" else "Qwen2MoeForCausalLM")
    tokens = torch.randint(0, 151_000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.eval()(tokens).logits
    torch.testing.assert_close(theirs, _logits_ours(runs / name, tokens), rtol=0, atol=1e-5)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 151_643


def test_export_of_a_checkpoint_equals_the_final_weights(runs, tmp_path):
    run = runs / "topk"
    _, final, _ = read_weights(run)
    _, ckpt, step = read_weights(run, STEPS)  # DCP, consolidated without a process group
    assert step == STEPS and final.keys() == ckpt.keys()
    for key in final:
        assert torch.equal(final[key], ckpt[key]), key
    result = CliRunner().invoke(main, ["export", str(run), "--step", str(STEPS), "--output", str(tmp_path / "hf"),
                                       "--dtype", "bfloat16"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "export hf: 3/3, writing" in result.output  # the stages' progress bar, on stderr
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    torch.testing.assert_close(tensors["model.layers.1.mlp.experts.3.down_proj.weight"],
                               final["layers.1.mlp.experts.w_down"][3].T.bfloat16(), rtol=0, atol=0)  # fmt: skip

    missing = CliRunner().invoke(main, ["export", str(run), "--step", "7", "--output", str(tmp_path / "x")])
    assert missing.exit_code == 1 and f"(checkpoints: {STEPS})" in missing.output
    assert len(missing.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_a_router_the_modeling_code_lacks_is_refused_pointing_at_the_raw_weights(tmp_path, monkeypatch):
    from ioe_train.moe import ROUTERS, TopKRouter

    monkeypatch.setitem(ROUTERS, "mine", type("MyRouter", (TopKRouter,), {}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config(CONFIG, ["model.moe.router=mine"]).to_yaml())
    result = CliRunner().invoke(main, ["export", str(run), "--output", str(tmp_path / "hf")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "model.moe.router: 'mine'" in lines[0] and "modeling_ioe.py" in lines[0]
    assert str(run / "final" / "model.pt") in lines[0] and not (tmp_path / "hf").exists()


def _documents(raw: Path) -> list[str]:
    import zstandard

    texts = []
    for path in sorted(raw.glob("*.jsonl.zst")):
        with open(path, "rb") as f:
            lines = zstandard.ZstdDecompressor().stream_reader(f).read().decode().splitlines()
        texts += [json.loads(line)["text"] for line in lines if line]
    return texts


def _auto_tokenizer(export: Path):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"  # a file missing from the export must fail, not download
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(export)


def test_bundled_tokenizer_exports_with_pile_preps_ids(runs, tmp_path):
    from pile_prep.sample import write_sample_corpus
    from pile_prep.tokenizer import QWEN2_5_SPECIAL_TOKENS, load_tokenizer

    out = export_hf(runs / "topk", tmp_path / "hf")  # data tokenized with the bundled qwen2.5
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {p.name: "0o644" for p in out.iterdir()}
    assert "huggingface-cli" not in (out / "README.md").read_text()
    theirs, ours = _auto_tokenizer(out), load_tokenizer("qwen2.5")
    assert len(theirs) == 151_665 and theirs.eos_token == theirs.pad_token == "<|endoftext|>"
    assert theirs.eos_token_id == theirs.pad_token_id == 151_643
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<|endoftext|>"
    docs = _documents(write_sample_corpus(tmp_path / "raw", num_files=1, docs_per_file=40)[0].parent)
    literal = "x" + "a ".join(QWEN2_5_SPECIAL_TOKENS) + " Hello world\r\n\n  naïve cafe\u0301 123456"
    for text in [*docs, literal, "<|endoftext|>", "<tool_call>", " the film"]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), text[:80]
    assert theirs.decode(ours.encode(docs[0])) == docs[0]


def test_word_tokenizer_of_the_domains_proxy_exports_complete(runs, domain_shards, tmp_path):
    from pile_prep.tokenizer import load_tokenizer

    raw = domain_shards[0].parent / "raw"
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(runs / "topk" / "config.yaml", [f"data.train_dirs=[{domain_shards[0]}]"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "final").symlink_to(runs / "topk" / "final")
    out = export_hf(run, tmp_path / "hf")

    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 128  # the word tokenizer's EOS
    theirs, ours = _auto_tokenizer(out), load_tokenizer(str(raw / "tokenizer.json"))
    assert len(theirs) == 129 and theirs.eos_token_id == theirs.pad_token_id == 128
    for text in [*_documents(raw)[:200], " the film", " the <|endoftext|> film"]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), text[:80]
    assert theirs.encode(" the film", add_special_tokens=False)  # not []


def test_checkpoint_that_does_not_match_the_config_is_one_line(runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(runs / "topk" / "checkpoints")
    cfg = load_config(runs / "topk" / "config.yaml", ["model.moe.num_experts=4"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    result = CliRunner().invoke(main, ["export", str(run), "--step", str(STEPS), "--output", str(tmp_path / "hf")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Size mismatch" in lines[0] and "step_000002: cannot read the model" in lines[0]


class _Payload:
    """Unpickling this runs code: os.system would create the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_pickle_runs_code_is_refused_by_export_sample_and_eval(runs, tmp_path):
    import pickle
    import shutil

    from ioe_train.export import ExportError
    from ioe_train.runs import RunError, load_model

    run = tmp_path / "run"
    shutil.copytree(runs / "topk", run)
    shutil.rmtree(run / "final")  # load_model then reads the checkpoint
    marker = tmp_path / "pwned"
    (run / "checkpoints" / f"step_{STEPS:06d}" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ExportError, match=r"\.metadata holds objects other than tensors.*refused"):
        read_weights(run, STEPS)  # ioe-train export --step
    with pytest.raises(RunError, match=r"\.metadata holds objects other than tensors.*refused"):
        load_model(run)  # ioe-train sample / eval
    assert not marker.exists()


# name -> overrides of configs/tiny_cpu.yaml for a randomly initialised run of every router
ROUTER_RUNS = {
    "dense": ["model.name=tiny_dense"],
    "topk": [],
    "topk_bias": ["model.moe.router=topk_bias", "model.moe.shared_expert_hidden_dim=32"],
    # 4-token segments: a 16-token window has 4, the document reset and block-causal mask act on EOS
    "ioe": ["model.moe.router=ioe", "model.moe.ioe_segment_len=4", "model.moe.ioe_document_reset=true",
            "model.attention=block_causal", "model.moe.ioe_merge_chunk=3"],
}


def random_run(run: Path, train_dir: Path, overrides: list[str]) -> Path:
    """A run directory (config.yaml, final/model.pt) of a randomly initialised tiny model whose
    router buffers and priors are random too (zeros would hide a router that ignores them)."""
    from dataclasses import asdict

    from ioe_train.model import init_weights

    cfg = load_config(CONFIG, [f"data.train_dirs=[{train_dir}]", "data.val_dirs=[]", "eval.interval=0",
                               f"output_dir={run}", "model.vocab_size=129", "model.eos_id=128", *overrides])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg.model)
    init_weights(model)
    sd = model.state_dict()
    for key in sd:
        if key.endswith(("expert_bias", "router.prior")):
            sd[key] = torch.randn(sd[key].shape) * 0.5
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    torch.save({"model": sd, "model_config": asdict(cfg.model), "step": 0}, run / "final" / "model.pt")
    return run


@pytest.fixture(scope="module")
def router_exports(domain_shards, tmp_path_factory) -> dict[str, Path]:
    """name -> export (custom modeling code) of a random run per ROUTER_RUNS on the domains proxy's
    data: its 129-word tokenizer keeps lm-eval's loading fast."""
    root = tmp_path_factory.mktemp("router_exports")
    return {name: export_hf(random_run(root / name, domain_shards[0], extra), root / f"{name}_hf", modeling="custom")
            for name, extra in ROUTER_RUNS.items()}  # fmt: skip


@pytest.mark.parametrize("name", list(ROUTER_RUNS))
def test_every_router_exports_with_our_logits(router_exports, tmp_path, name):
    from transformers import AutoModelForCausalLM

    out = router_exports[name]
    assert (out / "modeling_ioe.py").is_file() and (out / "configuration_ioe.py").is_file()
    assert "ioe_train" not in (out / "modeling_ioe.py").read_text()  # runs without this project
    hf, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(hf).__name__ == "IoeForCausalLM"
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    tokens[0, 5] = tokens[1, 9] = 128  # documents end inside the windows
    with torch.no_grad():
        theirs = hf.eval()(tokens).logits
    torch.testing.assert_close(theirs, _logits_ours(out.parent / name, tokens), rtol=0, atol=1e-5)
    greedy = tokens[1:, :6]
    for _ in range(3):  # our model's greedy continuation
        greedy = torch.cat([greedy, _logits_ours(out.parent / name, greedy)[:, -1:].argmax(-1)], dim=1)
    generated = hf.generate(tokens[1:, :6], max_new_tokens=3, do_sample=False)  # stops early at EOS
    assert generated.shape[1] > 6 and torch.equal(generated, greedy[:, : generated.shape[1]])


TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""


def _loglikelihood(run: Path, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) under this project's model of `run`."""
    tokens = torch.tensor([context + continuation])
    logits = _logits_ours(run, tokens[:, :-1])[0]  # [S - 1, V]
    logprobs = logits.log_softmax(dim=-1)[len(context) - 1 :]  # rows predicting the continuation
    return logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()


@pytest.mark.parametrize("name", list(ROUTER_RUNS))
def test_lm_eval_harness_scores_every_router_offline(router_exports, domain_shards, tmp_path, monkeypatch, name):
    """lm-eval's own API on a multiple-choice task written here: its log-likelihoods are ours."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pile_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(str(domain_shards[0].parent / "raw" / "tokenizer.json"))
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1)).tolist()
    # 12-word questions: 3 IoE segments of 4 tokens, so the routed segments count
    docs = [{"question": tok.decode(q), "choices": [tok.decode([q[0]]), tok.decode(q[1:3])], "answer": i % 2}
            for i, q in enumerate(ids)]  # fmt: skip
    (tmp_path / "tiny_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=tmp_path / "tiny_mc.jsonl"))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={router_exports[name]},trust_remote_code=True,dtype=float32",
        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=2, device="cpu", log_samples=True,
    )  # fmt: skip
    run = router_exports[name].parent / name
    correct = []
    for sample in sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        ours = [_loglikelihood(run, tok.encode(doc["question"]), tok.encode(c)) for c in doc["choices"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct.append(float(max(range(len(ours)), key=ours.__getitem__) == doc["answer"]))
    assert len(correct) == len(docs)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
