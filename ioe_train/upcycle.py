"""Sparse upcycling: start a model from a dense checkpoint (`model.init_from`).

Komatsuzaki et al. 2023: attention, norms and embeddings are copied, and every expert starts as
a copy of its layer's dense MLP, so the MoE starts where the dense model ended instead of at
random. Sources, neither able to run code:
- this project's `final/model.pt` ({"model": state_dict, ...}), read with
  `torch.load(weights_only=True)`;
- a Hugging Face Qwen2.5 directory (`model.safetensors`, or shards listed in
  `model.safetensors.index.json`), its names mapped to ours by role.

H dense hidden dim, H_e expert hidden dim, n = H / H_e hidden slices, D model dim, E experts,
K experts per token. `model.upcycle` says what the experts become and what the MoE keeps of the
dense function (`upcycle_check`):
- "copies": every expert a whole copy (H_e = H). A top-k router with renormalised weights (they
  sum to 1) or an IoE merge (of identical experts) then computes the dense MLP exactly.
- "slices": expert e holds hidden slice e mod n; the n distinct slices sum to the dense MLP
  (SwiGLU is a sum over hidden units), but top-K sums K of them with weights summing to 1, and
  IoE merges their parameters: neither is the dense MLP.
- "exact": whole copies where they are exact; for top-k with n = K also slices, with each
  expert's down projection scaled by K and a zero gate: every token then picks the same K
  experts (torch.topk's tie-break on this device, `zero_gate_choice`), which hold the K distinct
  slices, with weights 1/K each: K * sum_k (1/K) slice_k = the dense MLP. Refused where no
  layout is exact.
Routers (except exact's zero gate), IoE priors and shared experts keep their fresh
initialisation; a dense target is a plain warm start.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ioe_train.config import ConfigError
from ioe_train.moe.router import ROUTERS, IoERouter, TopKRouter

if TYPE_CHECKING:
    from ioe_train.model import ModelConfig

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
_GATE = re.compile(r"^layers\.\d+\.mlp\.router\.gate\.weight$")  # zeroed by "exact" with n > 1
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


def upcycle_check(cfg: ModelConfig) -> str | None:
    """What `cfg.upcycle` keeps of the dense function for this MoE model (see the module doc).

    Raises ConfigError naming model.upcycle where the mode cannot do what it says; returns the
    warning line for a mode that does not keep the dense function, None for one that does.
    """
    moe, hidden = cfg.moe, cfg.arch().hidden_dim
    router = ROUTERS[moe.router]
    h_e = moe.expert_hidden_dim or hidden // router.active_experts(moe)
    if hidden % h_e:
        raise ConfigError(f"model.upcycle: the dense hidden size {hidden} is not a multiple of the experts' {h_e}")
    n, k = hidden // h_e, moe.top_k
    if cfg.upcycle == "copies" and n > 1:
        raise ConfigError(f"model.upcycle: 'copies' needs model.moe.expert_hidden_dim = the dense hidden size "
                          f"{hidden}, got {h_e}; narrower experts take 'slices' or 'exact'")  # fmt: skip
    lost = []  # why the upcycled MoE does not compute the dense function at init
    if moe.shared_expert_hidden_dim:
        lost.append("the fresh shared expert adds its output")
    if cfg.init_noise:
        lost.append(f"init_noise {cfg.init_noise} perturbs every expert")
    if issubclass(router, TopKRouter) and k == 1:
        lost.append("top-1 weighs its expert by its softmax probability (< 1), not 1")
    elif issubclass(router, TopKRouter) and not moe.renormalize:
        lost.append(f"the top-{k} softmax weights do not sum to 1 (renormalize: false)")
    if n > 1 and issubclass(router, IoERouter):
        lost.append(f"IoE merges the {n} hidden slices' parameters, and a SwiGLU is not linear in its weights "
                    "(exact needs whole copies: expert_hidden_dim = the dense hidden size)")  # fmt: skip
    elif n > 1 and not (cfg.upcycle == "exact" and n == k):
        lost.append(f"a token sums {k} of the {n} hidden slices with weights summing to 1, not all {n} with weight 1"
                    + ("" if cfg.upcycle == "slices" else f" (exact needs n = {hidden} / {h_e} = top_k or 1)"))
    if not lost:
        return None
    if cfg.upcycle == "exact":
        raise ConfigError(f"model.upcycle: 'exact' is impossible here: {'; '.join(lost)}")
    return f"model.upcycle={cfg.upcycle} does not keep the dense function at init: {'; '.join(lost)}"


def zero_gate_choice(num_experts: int, top_k: int, tokens: int, device: torch.device) -> list[int]:
    """The K experts, ascending, a top-K router with a zero gate picks for each of `tokens` tokens.

    All E probabilities are then 1/E and torch.topk's tie-break decides, which torch does not
    specify (the CPU picks 5 and 6 of 8 for top-2): `upcycle` gives these K experts the K slices.
    Raises ConfigError if the tokens' choices differ.
    """
    logits = torch.zeros(tokens, num_experts, device=device)  # [T, E]: F.linear(x, zero gate)
    picks = logits.softmax(dim=-1).topk(top_k, dim=-1).indices.sort(dim=-1).values  # [T, K]
    if not torch.equal(picks, picks[:1].expand_as(picks)):
        raise ConfigError(f"model.upcycle: 'exact' needs every token to pick the same experts at a zero gate; "
                          f"torch.topk on {device} breaks the ties differently across tokens")  # fmt: skip
    return picks[0].tolist()


def upcycle(dense: dict[str, Tensor], target: nn.Module, mode: str = "exact", noise: float = 0.0, seed: int = 0,
            source: str = "checkpoint", device: torch.device = torch.device("cpu"),
            tokens: int = 1024) -> Iterator[tuple[str, Tensor]]:  # fmt: skip
    """Full tensors for `target`'s parameters that come from `dense`, one at a time (name, tensor).

    `target` only supplies names and shapes (a meta-device model is enough). Every mismatch is
    checked before the first tensor is yielded: one ConfigError names the missing, unexpected
    and wrongly shaped keys. `mode` is `model.upcycle` (checked against the router by
    `upcycle_check`); "exact" with n > 1 slices gives them to the n experts that a zero gate
    picks for `tokens` tokens on `device`, the training device (`zero_gate_choice`). noise > 0
    adds noise * std(W) * N(0, 1) to each expert's copy of W (drawn from `seed`: every rank makes
    the same tensors).
    """
    shapes = {name: p.shape for name, p in target.named_parameters()}
    used, missing, wrong = set(), [], []
    slices = 1
    for name, shape in shapes.items():
        if _FRESH.match(name):
            continue
        if m := _EXPERTS.match(name):
            keys = [f"{m.group(1)}{w}.weight" for w in ("w1", "w3", "w2")]  # gate, up, down
            missing += [k for k in keys if k not in dense and k not in missing]
            used.update(k for k in keys if k in dense)
            if all(k in dense for k in keys):
                if problem := _expert_problem(*(dense[k] for k in keys), m.group(2), shape):
                    wrong.append(f"{name} {tuple(shape)}: {problem}")
                else:  # n = H / H_e
                    slices = dense[keys[0]].shape[0] // (shape[2] // 2 if m.group(2) == "w_gate_up" else shape[1])
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
    if slices > 1 and mode == "copies":
        raise ConfigError(f"model.upcycle: 'copies' needs experts as wide as the dense MLP; {source}'s is "
                          f"{slices}x theirs")  # fmt: skip
    selected = []
    if mode == "exact" and slices > 1:  # upcycle_check: a top-k router with K = n
        num_experts = next(shape[0] for name, shape in shapes.items() if _EXPERTS.match(name))
        selected = zero_gate_choice(num_experts, slices, tokens, device)
    return _tensors(dense, shapes, noise, seed, selected)


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


def _slice_of_expert(num_experts: int, n: int, selected: list[int]) -> list[int]:
    """Hidden slice of each expert: selected[k] holds slice k, the others slices 0..n-1 in turn
    (e mod n when nothing is selected)."""
    order = selected + [e for e in range(num_experts) if e not in selected]
    slice_of = [0] * num_experts
    for i, e in enumerate(order):
        slice_of[e] = i % n
    return slice_of


def _tensors(dense: dict[str, Tensor], shapes: dict[str, torch.Size], noise: float, seed: int,
             selected: list[int]) -> Iterator[tuple[str, Tensor]]:  # fmt: skip
    """selected: non-empty for "exact" with n > 1 slices; its experts hold the n slices, every
    expert's down projection is scaled by n and the routers' gates are zero."""
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if selected and _GATE.match(name):
            yield name, torch.zeros(shape)  # all probs 1/E: every token picks `selected`, weights 1/n
            continue
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
        for i in _slice_of_expert(num_experts, n, selected):
            s = slice(i * h_e, (i + 1) * h_e)
            if m.group(2) == "w_gate_up":
                w = torch.cat([gate[s].T, up[s].T], dim=1)  # [D, 2H_e]: gate | up, as swiglu splits it
            else:
                w = down[:, s].T * (n if selected else 1)  # [H_e, D]; n * (1/n weights) = slice sum
            if noise:
                w = w + noise * w.std() * torch.randn(w.shape, generator=gen)
            experts.append(w)
        yield name, torch.stack(experts)  # [E, D, 2H_e] or [E, H_e, D]
