"""Sparse upcycling: start a model from a dense checkpoint (`model.init_from`).

Komatsuzaki et al. 2023: attention, norms and embeddings are copied, and every expert starts as
a copy of its layer's dense MLP, so the MoE starts where the dense model ended instead of at
random. Sources, neither able to run code:
- this project's `final/model.pt` ({"model": state_dict, ...}), read with
  `torch.load(weights_only=True)`;
- a Hugging Face Qwen2.5 directory (`model.safetensors`, or shards listed in
  `model.safetensors.index.json`), its names mapped to ours by role.

H dense hidden dim, H_e expert hidden dim, D model dim, E experts. Experts as wide as the dense
MLP (H_e = H) are whole copies; narrower ones (H = n * H_e) take hidden slice e mod n, so the n
distinct slices sum to the dense MLP (SwiGLU is a sum over hidden units). Routers, IoE priors and
shared experts keep their fresh initialisation; a dense target is a plain warm start.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ioe_train.config import ConfigError

# Hugging Face Qwen2 parameter names -> ours (torchtune's names).
_HF_ROLES = [
    (r"model\.embed_tokens\.weight", r"tok_embeddings.weight"),
    (r"model\.norm\.weight", r"norm.scale"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"layers.\1.attn.\2_proj.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attn.output_proj.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.mlp.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.mlp.w3.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.mlp.w2.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.sa_norm.scale"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.scale"),
]
_EXPERTS = re.compile(r"^(layers\.\d+\.mlp\.)experts\.(w_gate_up|w_down)$")
# Kept from the target's own initialisation: nothing dense corresponds to them.
_FRESH = re.compile(r"^layers\.\d+\.mlp\.(router|shared_expert)\.")


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def load_dense(path: str | Path) -> dict[str, Tensor]:
    """The dense state dict (our names, fp32, CPU) at `path`: a model.pt or a HF directory."""
    p = Path(path)
    if p.is_dir():
        return _load_hf(p)
    if not p.is_file():
        raise ConfigError(f"model.init_from: {p}: no such file or directory")
    try:
        obj = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:  # unpickling refused, or not a torch file at all
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model.init_from: {p}: cannot be loaded with weights_only=True ({why})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise ConfigError(f"model.init_from: {p}: expected a dict with a 'model' state dict (final/model.pt)")
    return {k: v.float() for k, v in obj["model"].items()}


def _load_hf(d: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file  # only upcycling from Hugging Face needs it

    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"model.init_from: {d}: no model.safetensors or model.safetensors.index.json")
    hf: dict[str, Tensor] = {}
    for name in files:
        hf.update(load_file(d / name))
    return hf_to_ours(hf, str(d))


def hf_to_ours(hf: dict[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Map Hugging Face Qwen2 names to ours (fp32). Our output layer is tied to the embeddings:
    an `lm_head.weight` must equal `model.embed_tokens.weight` (Qwen2.5-0.5B ties them)."""
    out, unknown = {}, []
    for name, tensor in hf.items():
        if name == "lm_head.weight":
            if not torch.equal(tensor, hf.get("model.embed_tokens.weight", tensor.new_empty(0))):
                raise ConfigError(f"model.init_from: {source}: lm_head.weight differs from "
                                  "model.embed_tokens.weight; only tied output layers are supported")  # fmt: skip
            continue
        for pattern, ours in _HF_ROLES:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, ours, name)] = tensor.float()
                break
        else:
            unknown.append(name)
    if unknown:
        raise ConfigError(f"model.init_from: {source}: unknown Hugging Face weights {_names(unknown)}")
    return out


def upcycle(dense: dict[str, Tensor], target: nn.Module, noise: float = 0.0, seed: int = 0,
            source: str = "checkpoint") -> Iterator[tuple[str, Tensor]]:  # fmt: skip
    """Full tensors for `target`'s parameters that come from `dense`, one at a time (name, tensor).

    `target` only supplies names and shapes (a meta-device model is enough). Every mismatch is
    checked before the first tensor is yielded: one ConfigError names the missing, unexpected
    and wrongly shaped keys. noise > 0 adds noise * std(W) * N(0, 1) to each expert's copy of W
    (drawn from `seed`: every rank makes the same tensors).
    """
    shapes = {name: p.shape for name, p in target.named_parameters()}
    used, missing, wrong = set(), [], []
    for name, shape in shapes.items():
        if _FRESH.match(name):
            continue
        if m := _EXPERTS.match(name):
            keys = [f"{m.group(1)}{w}.weight" for w in ("w1", "w3", "w2")]  # gate, up, down
            missing += [k for k in keys if k not in dense and k not in missing]
            used.update(k for k in keys if k in dense)
            if all(k in dense for k in keys) and (
                problem := _expert_problem(*(dense[k] for k in keys), m.group(2), shape)
            ):
                wrong.append(f"{name} {tuple(shape)}: {problem}")
        elif name not in dense:
            missing.append(name)
        else:
            used.add(name)
            if dense[name].shape != shape:
                wrong.append(f"{name} {tuple(dense[name].shape)} vs the model's {tuple(shape)}")
    unexpected = sorted(set(dense) - used)
    problems = [f"{what} {_names(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape:", wrong)) if keys]  # fmt: skip
    if problems:
        raise ConfigError(f"model.init_from: {source} does not fit the model: " + "; ".join(problems))
    return _tensors(dense, shapes, noise, seed)


def _expert_problem(gate: Tensor, up: Tensor, down: Tensor, kind: str, shape: torch.Size) -> str | None:
    """Why experts `kind` of `shape` (w_gate_up [E, D, 2H_e] or w_down [E, H_e, D]) cannot
    come from this dense MLP (gate, up [H, D], down [D, H])."""
    hidden, dim = gate.shape
    model_dim, h_e = (shape[1], shape[2] // 2) if kind == "w_gate_up" else (shape[2], shape[1])
    if up.shape != gate.shape or down.shape != (dim, hidden) or dim != model_dim:
        return f"the dense MLP is {tuple(gate.shape)} / {tuple(down.shape)} (gate / down)"
    if hidden % h_e:
        return f"the dense hidden size {hidden} is not a multiple of the experts' {h_e}"
    return None


def _tensors(dense: dict[str, Tensor], shapes: dict[str, torch.Size], noise: float,
             seed: int) -> Iterator[tuple[str, Tensor]]:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if _FRESH.match(name):
            continue
        m = _EXPERTS.match(name)
        if m is None:
            yield name, dense[name]
            continue
        mlp, num_experts = m.group(1), shape[0]
        gate, up, down = (dense[f"{mlp}{w}.weight"] for w in ("w1", "w3", "w2"))  # [H, D], [H, D], [D, H]
        h_e = shape[2] // 2 if m.group(2) == "w_gate_up" else shape[1]
        n = gate.shape[0] // h_e  # distinct hidden slices
        experts = []
        for e in range(num_experts):
            s = slice((e % n) * h_e, (e % n + 1) * h_e)
            if m.group(2) == "w_gate_up":
                w = torch.cat([gate[s].T, up[s].T], dim=1)  # [D, 2H_e]: gate | up, as swiglu splits it
            else:
                w = down[:, s].T  # [H_e, D]
            if noise:
                w = w + noise * w.std() * torch.randn(w.shape, generator=gen)
            experts.append(w)
        yield name, torch.stack(experts)  # [E, D, 2H_e] or [E, H_e, D]
