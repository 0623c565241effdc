from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ioe_train.config import ConfigError, TrainConfig, load_config
from ioe_train.model import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "tiny_cpu_dense.yaml", "qwen2_5_0_5b_moe_pile_pretrain_fsdp.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, TrainConfig)


def test_overrides_apply_with_types():
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", ["optim.lr=0.5", "data.train_dirs=[a,b]", "model.moe.top_k=1"])
    assert cfg.optim.lr == 0.5 and cfg.data.train_dirs == ["a", "b"] and cfg.model.moe.top_k == 1


def test_base_file_is_merged_first(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {CONFIGS / 'tiny_cpu.yaml'}\nsteps: 7\n")
    cfg = load_config(child)
    assert cfg.steps == 7 and cfg.model.name == "tiny_moe"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=1"], r"^optim\.lrr: Key 'lrr' not in 'OptimConfig'"),
        (["optim.lr=fast"], r"^optim\.lr: Value 'fast'"),
        (["parallel.activation_checkpointing=some"], r"^parallel\.activation_checkpointing: 'some' is not one of"),
        (["data.train_dirs=[]"], r"^data\.train_dirs: empty"),
        (["data.val_dirs=[]"], r"^eval\.interval: 100 but data\.val_dirs is empty"),
        (["data.seq_len=1024"], r"^data\.seq_len: 1024 exceeds model\.max_seq_len=512"),
        (["optim.min_lr_ratio=2"], r"^optim\.min_lr_ratio: 2\.0 is not in \[0, 1\]"),
        (["steps=0"], r"^steps: 0 is below 1"),
        (["data.source=streaming"], r"^data\.streaming\.data_files: empty"),
        (["model.moe.top_k=9"], r"^model\.moe\.top_k: must be in"),
        (["model.name=gpt5"], r"^model\.name: must be one of"),
        (["model.num_heads=3"], r"^model\.num_heads: must divide dim: 3 heads, dim 64"),
        (["model.num_kv_heads=3"], r"^model\.num_kv_heads: must divide num_heads"),
        (["model.num_heads=64"], r"^model\.num_heads: head_dim = dim / num_heads = 1 "),
        (["model.dim=0"], r"^model\.dim: must be >= 1"),
        (["model.num_layers=0"], r"^model\.num_layers: must be >= 1"),
        (["lr"], r"^lr: an override is key=value"),
        (["logging.wandb.mode=cloud"], r"^logging\.wandb\.mode: 'cloud' is not one of 'online', 'offline'"),
        (["lr=1e-3"], r"^lr: Key 'lr' not in 'TrainConfig'; did you mean optim\.lr\?$"),
        (["router=ioe"], r"^router: .*; did you mean model\.moe\.router\?$"),
        (["optim.lrr=1e-3"], r"^optim\.lrr: Key 'lrr' not in 'OptimConfig'; did you mean optim\.lr\?$"),
        (["data.mixture={Books3:1.5}"], r"a mapping entry is `data\.mixture\.Books3=1\.5`, or `data\.mixture=\{Books3: 1\.5\}`"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny_cpu.yaml", overrides)


def test_unknown_yaml_key_names_its_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  trian_dirs: [x]\n")
    with pytest.raises(ConfigError, match=r"^data\.trian_dirs: Key 'trian_dirs' not in 'DataConfig'"):
        load_config(bad)


def test_architecture_overrides_scale_the_preset():
    cfg = load_config(CONFIGS / "qwen2_5_0_5b_moe_pile_pretrain_fsdp.yaml",
                      ["model.num_layers=2", "model.dim=448", "model.num_heads=7", "model.num_kv_heads=1",
                       "model.hidden_dim=2432"])  # fmt: skip
    arch = cfg.model.arch()
    assert (arch.num_layers, arch.dim, arch.num_heads, arch.num_kv_heads, arch.hidden_dim) == (2, 448, 7, 1, 2432)
    assert (arch.vocab_size, arch.max_seq_len) == (151_936, 4096)  # the YAML's, untouched
    with torch.device("meta"):
        model = build_model(cfg.model)
    block = model.layers[0]
    assert len(model.layers) == 2 and model.tok_embeddings.weight.shape == (151_936, 448)
    assert (block.attn.num_heads, block.attn.num_kv_heads, block.attn.head_dim) == (7, 1, 64)
    assert block.mlp.experts.w_gate_up.shape == (8, 448, 2 * 1216)  # 2432 / top-2


def test_resolved_yaml_loads_back(tmp_path):
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", ["steps=5"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(cfg.to_yaml())
    assert load_config(dumped) == cfg


def test_mapping_entries_are_overridden_one_by_one():
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", ["data.mixture.Books3=1.5", "data.mixture.Pile-CC=0.5"])
    assert cfg.data.mixture == {"Books3": 1.5, "Pile-CC": 0.5}
