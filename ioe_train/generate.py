"""Sampling a continuation from a trained model (`ioe-train sample`): one process, no KV cache.

Each new token re-runs the model on the last `context` tokens (quadratic, fine for a look at what
a run learned). V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ioe_train.model import Decoder


def next_token_probs(logits: Tensor, temperature: float, top_p: float, allowed: int) -> Tensor:
    """Sampling distribution [V] from one position's logits [V]: ids >= `allowed` (padding past
    the tokenizer's, e.g. Qwen2.5's 151,665..151,935) never drawn; temperature 0 = greedy; top-p
    keeps the smallest set of most probable ids whose mass reaches p."""
    logits = logits.float().clone()
    logits[allowed:] = float("-inf")
    if temperature == 0:
        probs = torch.zeros_like(logits)
        probs[logits.argmax()] = 1.0
        return probs
    probs = (logits / temperature).softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more probable ids
        sorted_probs[before >= top_p] = 0  # the first id is always kept
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs / probs.sum()


@torch.no_grad()
def generate(model: Decoder, prompt: list[int], new_tokens: int, *, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, context: int, allowed: int,
             stop_id: int | None = None) -> list[int]:  # fmt: skip
    """Up to `new_tokens` ids after `prompt`, ending early after `stop_id` (e.g. EOS)."""
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    out: list[int] = []
    for _ in range(new_tokens):
        window = torch.tensor([ids[-context:]])  # [1, <= context]
        logits, _, _ = model(window)
        token = int(torch.multinomial(next_token_probs(logits[0, -1], temperature, top_p, allowed), 1,
                                      generator=gen))  # fmt: skip
        ids.append(token)
        out.append(token)
        if token == stop_id:
            break
    return out
