"""A trained run as a Hugging Face checkpoint: `ioe-train export RUN_DIR --format hf --output DIR`.

L layers, D model dim, V vocabulary, E experts, H expert hidden dim, S shared-expert hidden dim.

Dense runs become `Qwen2ForCausalLM`, top-k MoE runs `Qwen2MoeForCausalLM` (the per-expert
tensor names Qwen's own MoE releases use, which transformers, vLLM and lm-eval-harness read).
Every other router (topk_bias, IoE), and models Qwen2 cannot compute (block-causal attention),
export with the self-contained modeling code of ioe_train/hf_code, loaded with
`trust_remote_code=True`. The logits equal this project's model's (tests/ioe_train/test_export.py).
The layout is documented in docs/TRAINING.md#hugging-face-export.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ioe_train.checkpoint import checkpoint_steps, read_model_state
from ioe_train.config import ConfigError, DataConfig, TrainConfig, load_config
from ioe_train.model import Arch, ModelConfig, build_model
from ioe_train.moe import MoE, MoEConfig
from ioe_train.export_tokenizer import write_tokenizer
from pile_prep.tokenizer import DEFAULT_TOKENIZER, NUM_BASE_TOKENS, hf_tokenizer_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODELINGS = ("auto", "custom")
# Routers ioe_train/hf_code/modeling_ioe.py computes (dense models need none).
CUSTOM_ROUTERS = ("topk", "topk_bias", "ioe")
# Copied into an export that uses them (`auto_map`).
CODE_FILES = ("configuration_ioe.py", "modeling_ioe.py")
# transformers' own default shard size: one file up to 5 GB (Qwen2.5-0.5B in fp32 is 2 GB).
MAX_SHARD_BYTES = 5 * 10**9
# Qwen2MoE always builds a shared expert: a run without one gets a width-1 all-zero expert
# (contributes exactly 0; width 0 would be an empty tensor some loaders reject).
_NO_SHARED_WIDTH = 1


class ExportError(ValueError):
    """A run that cannot be exported; the message names the file or key."""


def read_weights(run_dir: Path, step: int | None = None) -> tuple[ModelConfig, dict[str, Tensor], int]:
    """(model config, fp32 state_dict on CPU, step) of `run_dir`: final/model.pt, or with `step`
    the DCP checkpoint checkpoints/step_NNNNNN consolidated in this process (no process group)."""
    if step is None:
        path = run_dir / "final" / "model.pt"
        if not path.is_file():
            raise ExportError(f"{path}: not found (the run has not finished, or checkpoint.export_final was "
                              f"false); export a checkpoint with --step N{_steps_hint(run_dir)}")  # fmt: skip
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ExportError(f"{path}: written by an older ioe-train that pickled ModelConfig; export a "
                              f"checkpoint instead with --step N{_steps_hint(run_dir)}") from None  # fmt: skip
        return model_config_from_dict(saved["model_config"]), saved["model"], saved["step"]
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    if not path.is_dir():
        raise ExportError(f"{path}: no such checkpoint{_steps_hint(run_dir)}")
    cfg = _run_config(run_dir).model
    with torch.device("meta"):
        shapes = build_model(cfg).state_dict()
    sd = {k: torch.empty_like(v, device="cpu") for k, v in shapes.items()}
    try:
        read_model_state(path, sd)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    return cfg, sd, step


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of `dataclasses.asdict(ModelConfig)` (what final/model.pt stores)."""
    return ModelConfig(**{**d, "moe": MoEConfig(**d["moe"])})


def export_hf(run_dir: Path, output: Path, step: int | None = None, dtype: str = "float32",
              max_shard_bytes: int = MAX_SHARD_BYTES, modeling: str = "auto", progress: bool = False) -> Path:  # fmt: skip
    """Write `run_dir`'s final weights (or checkpoint `step`) to the new directory `output`:
    config.json, model.safetensors (or model-0000i-of-0000n.safetensors + index past
    `max_shard_bytes`), generation_config.json, the data's tokenizer (ioe_train/export_tokenizer.py)
    and a README.md. Every file mode 0644.

    `modeling` "auto": transformers' own Qwen2 / Qwen2MoE where they compute this model (see
    `native_equivalent`), else the self-contained code of ioe_train/hf_code (configuration_ioe.py,
    modeling_ioe.py, `auto_map`: load with trust_remote_code=True); "custom": that code always.

    Written to a temporary sibling and renamed: `output` is complete or absent. `progress`: a
    progress bar of the stages on stderr. Returns `output`.
    """
    from tqdm import tqdm

    run_dir, output = Path(run_dir), Path(output)
    if dtype not in DTYPES:
        raise ExportError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if modeling not in MODELINGS:
        raise ExportError(f"modeling: {modeling!r} is not one of {', '.join(MODELINGS)}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ExportError(f"{output}: exists and is not empty; choose a new --output")
    run = _run_config(run_dir)
    _check_exportable(run.model, run_dir)  # before reading gigabytes
    model_cfg, sd, step = read_weights(run_dir, step)  # errors before the bar: one line
    bar = tqdm(total=3, desc=f"export {output.name}", unit="stage", disable=not progress,
               bar_format="{desc}: {n}/{total}{postfix} [{elapsed}]")  # fmt: skip
    _check_exportable(model_cfg, run_dir)
    with torch.device("meta"):
        model = build_model(model_cfg)
    moe = next((m.cfg for m in model.modules() if isinstance(m, MoE)), None)  # expert_hidden_dim resolved
    spec, eos_id = _data_tokenizer(run.data)
    bar.set_postfix_str(f"tokenizer {spec}")
    tokenizer = hf_tokenizer_json(spec) if _has_tokenizer(spec) else None  # qwen2.5: ~10 s
    bar.update()
    if modeling == "auto" and native_equivalent(model_cfg, tokenizer):
        config = hf_config(model.arch, moe, eos_id, dtype, run.load_balancing_loss_weight)
        sd = hf_state_dict(sd, model.arch, moe)
    else:
        config = custom_config(model_cfg, model.arch, moe, eos_id, dtype)
        sd = {f"model.{k}": v for k, v in sd.items()}  # modeling_ioe.py keeps this project's names
    bar.set_postfix_str(f"converting to {dtype}")
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in sd.items()}
    bar.update()
    bar.set_postfix_str(f"writing {output}")

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", {"bos_token_id": eos_id, "eos_token_id": eos_id})
        _write_safetensors(tmp, tensors, max_shard_bytes)
        if "auto_map" in config:
            for name in CODE_FILES:
                (tmp / name).write_text((resources.files("ioe_train.hf_code") / name).read_text())
        if tokenizer is not None:
            write_tokenizer(tokenizer, spec, eos_id, model.arch.max_seq_len, tmp)
        (tmp / "README.md").write_text(_readme(run_dir, step, config, spec, tokenizer is not None))
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600: a shared group must read the export
        if output.is_dir():
            output.rmdir()  # empty (checked above)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.update(bar.total - bar.n)
        bar.close()
    return output


def _run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{path}: not found; RUN_DIR is a training run's output_dir")
    return load_config(path)


def _steps_hint(run_dir: Path) -> str:
    steps = checkpoint_steps(run_dir / "checkpoints")
    return f" (checkpoints: {', '.join(map(str, steps))})" if steps else " (no checkpoints found)"


def _check_exportable(cfg: ModelConfig, run_dir: Path) -> None:
    if cfg.is_moe and cfg.moe.router not in CUSTOM_ROUTERS:
        raise ExportError(
            f"model.moe.router: {cfg.moe.router!r} is not in ioe_train/hf_code/modeling_ioe.py (it exports "
            f"{', '.join(CUSTOM_ROUTERS)}); add its forward there, or use the raw weights in "
            f"{run_dir / 'final' / 'model.pt'} (torch.load(path)['model'] into ioe_train.model.build_model)"
        )


def native_equivalent(cfg: ModelConfig, tokenizer: str | None) -> bool:
    """Whether transformers' Qwen2 / Qwen2MoE compute `cfg`'s model with its tokenizer: a dense or
    `topk` model, causal attention across documents (no block-causal mask), and a byte-level BPE
    tokenizer (transformers >= 5 rebuilds the tokenizer of a qwen2 model as Qwen's BPE)."""
    if cfg.attention != "causal" or (cfg.is_moe and cfg.moe.router != "topk"):
        return False
    return tokenizer is None or json.loads(tokenizer)["model"]["type"] == "BPE"


def custom_config(cfg: ModelConfig, arch: Arch, moe: MoEConfig | None, eos_id: int, dtype: str) -> dict[str, Any]:
    """config.json of modeling_ioe.IoeForCausalLM (ioe_train/hf_code) for any router."""
    config: dict[str, Any] = {
        "architectures": ["IoeForCausalLM"],
        "model_type": "ioe_pretrain",
        "auto_map": {"AutoConfig": "configuration_ioe.IoeConfig", "AutoModelForCausalLM": "modeling_ioe.IoeForCausalLM"},
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.dim,
        "intermediate_size": arch.hidden_dim,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "max_position_embeddings": arch.max_seq_len,
        "rope_theta": arch.rope_base,
        "rms_norm_eps": arch.norm_eps,
        "attention": cfg.attention,
        "router": "dense" if moe is None else moe.router,
        "tie_word_embeddings": False,  # IoeForCausalLM reads the embedding for its output itself
        "use_cache": False,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }  # fmt: skip
    if moe is not None:
        config.update({
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "expert_hidden_dim": moe.expert_hidden_dim,
            "shared_expert_hidden_dim": moe.shared_expert_hidden_dim,
            "renormalize": moe.renormalize,
            "ioe_segment_len": moe.ioe_segment_len,
            "ioe_document_reset": moe.ioe_document_reset,
            "ioe_merge_chunk": moe.ioe_merge_chunk,
        })  # fmt: skip
    return config


def hf_config(arch: Arch, moe: MoEConfig | None, eos_id: int, dtype: str, aux_loss_coef: float) -> dict[str, Any]:
    """config.json of Qwen2ForCausalLM (moe None) or Qwen2MoeForCausalLM (every layer sparse)."""
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if moe is None else "Qwen2MoeForCausalLM"],
        "model_type": "qwen2" if moe is None else "qwen2_moe",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.dim,
        "intermediate_size": arch.hidden_dim,  # MoE: unused (no dense layer) but required
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": arch.max_seq_len,
        "rope_theta": arch.rope_base,
        "rms_norm_eps": arch.norm_eps,
        "tie_word_embeddings": True,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "max_window_layers": arch.num_layers,
        "use_cache": True,
        "initializer_range": 0.02,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }
    if moe is not None:
        config.update({
            "qkv_bias": True,
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "moe_intermediate_size": moe.expert_hidden_dim,
            "shared_expert_intermediate_size": moe.shared_expert_hidden_dim or _NO_SHARED_WIDTH,
            # TopKRouter renormalises only for K > 1 (K = 1 keeps the raw top probability)
            "norm_topk_prob": moe.renormalize and moe.top_k > 1,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
            # the trainer's load_balancing_loss_weight; the z-loss has no Qwen2MoE field
            "router_aux_loss_coef": aux_loss_coef,
        })  # fmt: skip
    return config


def hf_state_dict(sd: dict[str, Tensor], arch: Arch, moe: MoEConfig | None) -> dict[str, Tensor]:
    """This project's state_dict under transformers' Qwen2 / Qwen2MoE names (fp32, views where
    possible). Raises if a tensor of `sd` has no place in the export (a new module's weights)."""
    sd = dict(sd)
    out = {"model.embed_tokens.weight": sd.pop("tok_embeddings.weight"), "model.norm.weight": sd.pop("norm.scale")}
    for i in range(arch.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in (("q_proj.weight", "q_proj.weight"), ("q_proj.bias", "q_proj.bias"),
                             ("k_proj.weight", "k_proj.weight"), ("k_proj.bias", "k_proj.bias"),
                             ("v_proj.weight", "v_proj.weight"), ("v_proj.bias", "v_proj.bias"),
                             ("output_proj.weight", "o_proj.weight")):  # fmt: skip
            out[f"{dst}self_attn.{theirs}"] = sd.pop(f"{src}attn.{ours}")
        out[f"{dst}input_layernorm.weight"] = sd.pop(f"{src}sa_norm.scale")
        out[f"{dst}post_attention_layernorm.weight"] = sd.pop(f"{src}mlp_norm.scale")
        if moe is None:
            out.update(_swiglu(sd, f"{src}mlp.", f"{dst}mlp."))
        else:
            out.update(_moe(sd, f"{src}mlp.", f"{dst}mlp.", arch.dim, moe))
    if sd:
        raise ExportError(f"no Hugging Face name for {sorted(sd)}: extend ioe_train/export.py::hf_state_dict")
    return out


def _swiglu(sd: dict[str, Tensor], src: str, dst: str, down_scale: float = 1.0) -> dict[str, Tensor]:
    """torchtune FeedForward w1/w3/w2 -> gate_proj/up_proj/down_proj (all [out, in] already)."""
    return {f"{dst}gate_proj.weight": sd.pop(f"{src}w1.weight"), f"{dst}up_proj.weight": sd.pop(f"{src}w3.weight"),
            f"{dst}down_proj.weight": sd.pop(f"{src}w2.weight") * down_scale}  # fmt: skip


def _moe(sd: dict[str, Tensor], src: str, dst: str, dim: int, moe: MoEConfig) -> dict[str, Tensor]:
    out = {f"{dst}gate.weight": sd.pop(f"{src}router.gate.weight")}  # [E, D]
    w_gate_up = sd.pop(f"{src}experts.w_gate_up")  # [E, D, 2H] = [gate | up] on the last dim
    w_down = sd.pop(f"{src}experts.w_down")  # [E, H, D]
    h = w_down.shape[1]
    for e in range(moe.num_experts):
        out[f"{dst}experts.{e}.gate_proj.weight"] = w_gate_up[e, :, :h].T  # [H, D]
        out[f"{dst}experts.{e}.up_proj.weight"] = w_gate_up[e, :, h:].T  # [H, D]
        out[f"{dst}experts.{e}.down_proj.weight"] = w_down[e].T  # [D, H]
    # Qwen2MoE adds sigmoid(x W_g) * shared(x); ours adds shared(x). W_g = 0 gives sigmoid = 1/2,
    # so the exported down_proj is doubled: 1/2 * (2 W) x is exact (powers of two, any dtype).
    out[f"{dst}shared_expert_gate.weight"] = torch.zeros(1, dim)
    if moe.shared_expert_hidden_dim:
        out.update(_swiglu(sd, f"{src}shared_expert.", f"{dst}shared_expert.", down_scale=2.0))
    else:
        for name, shape in (("gate_proj", (_NO_SHARED_WIDTH, dim)), ("up_proj", (_NO_SHARED_WIDTH, dim)),
                            ("down_proj", (dim, _NO_SHARED_WIDTH))):  # fmt: skip
            out[f"{dst}shared_expert.{name}.weight"] = torch.zeros(shape)
    return out


def _write_safetensors(directory: Path, tensors: dict[str, Tensor], max_shard_bytes: int) -> None:
    """model.safetensors, or shards in key order (a tensor never split) plus the index json."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(directory / "model.safetensors.index.json", index)


def _data_tokenizer(data: DataConfig) -> tuple[str | None, int]:
    """(tokenizer spec the run's data names, or None if unknown; its EOS id)."""
    if data.source == "streaming":
        spec = data.streaming.tokenizer
        if spec == DEFAULT_TOKENIZER or not Path(spec).exists():
            return spec, NUM_BASE_TOKENS
        from pile_prep.tokenizer import load_tokenizer

        return spec, load_tokenizer(spec).eos_id
    try:
        tok = json.loads((Path(data.train_dirs[0]) / "manifest.json").read_text())["tokenizer"]
    except (OSError, ValueError, KeyError, IndexError):
        return None, NUM_BASE_TOKENS  # data moved: Qwen2.5's <|endoftext|>
    name = tok["name"]
    return (name[3:] if name.startswith("hf:") else name), tok["eos_id"]


def _has_tokenizer(spec: str | None) -> bool:
    """Whether the tokenizer the run's data names is here to export: bundled or still on disk."""
    return spec is not None and (spec == DEFAULT_TOKENIZER or Path(spec).exists())


def _readme(run_dir: Path, step: int, config: dict[str, Any], spec: str | None, has_tokenizer: bool) -> str:
    lines = [f"# {config['architectures'][0]} exported by `ioe-train export`", "",
             f"Run: `{run_dir}`, step {step}, weights in {config['torch_dtype']}.", ""]  # fmt: skip
    if "auto_map" in config:
        lines += [f"Router `{config['router']}`: the model is defined by modeling_ioe.py and configuration_ioe.py "
                  "here (plain torch); load it with `trust_remote_code=True`:", "",
                  "    AutoModelForCausalLM.from_pretrained(THIS_DIR, trust_remote_code=True)",
                  "    lm_eval --model hf --model_args pretrained=THIS_DIR,trust_remote_code=True --tasks TASKS", ""]  # fmt: skip
    if has_tokenizer:
        lines += [f"Tokenizer: `{spec}`, the one the training data was tokenized with (tokenizer.json, "
                  "tokenizer_config.json, special_tokens_map.json). Literal added-token strings such as "
                  "`<|endoftext|>` inside a text are encoded as text (`split_special_tokens`), as in "
                  "training."]  # fmt: skip
    else:
        where = f"`{spec}`, which was not found" if spec else "a tokenizer this export could not find"
        lines += [f"No tokenizer files: the run's data names {where} (its shard manifest.json moved?). Export "
                  "again where the data's manifest.json and tokenizer are readable."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
