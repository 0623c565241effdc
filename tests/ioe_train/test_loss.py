"""The fused chunked output projection + cross-entropy against the full-logits reference."""

from __future__ import annotations

import pytest
import torch

from ioe_train.loss import linear_cross_entropy, token_ce_sum
from ioe_train.model import init_weights, tiny_moe
from ioe_train.moe import MoEConfig

pytestmark = pytest.mark.usefixtures("one_thread")
T, D, V = 37, 16, 301  # T not a multiple of the chunk: the last chunk is short


def _inputs(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(T, D, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=gen) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=gen)
    return h, w, labels


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_sum_and_gradients_equal_full_logits(chunk):
    h, w, labels = _inputs(torch.float32)
    scale = 0.37  # backward of a scaled loss, as the trainer's ce_sum / tokens
    want = token_ce_sum((h @ w.t())[None], labels[None])
    (want * scale).backward()
    want_h, want_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, labels, chunk)
    (got * scale).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h.grad, want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, want_w, rtol=1e-5, atol=1e-6)


def test_bf16_matches_full_logits_to_bf16_rounding():
    h, w, labels = _inputs(torch.bfloat16)
    want = token_ce_sum((h @ w.t())[None], labels[None])
    want.backward()
    want_h, want_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, labels, 8)
    got.backward()
    assert got.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad, want_h, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad, want_w, rtol=2e-2, atol=2e-3)


def test_per_token_losses_for_evaluation():
    h, w, labels = _inputs(torch.float32)
    with torch.no_grad():
        got = linear_cross_entropy(h, w, labels, 8, reduction="none")
        want = torch.nn.functional.cross_entropy(h @ w.t(), labels, reduction="none")
    torch.testing.assert_close(got, want)
    with torch.no_grad():  # the sum without the gradients' matmuls
        torch.testing.assert_close(linear_cross_entropy(h, w, labels, 8), want.sum())
    with pytest.raises(RuntimeError, match="is for evaluation"):
        linear_cross_entropy(h, w, labels, 8, reduction="none")


def test_model_with_labels_equals_logits_then_ce():
    torch.manual_seed(0)
    model = tiny_moe(MoEConfig(num_experts=4, top_k=2), vocab_size=300)
    model.ce_chunk_tokens = 7
    init_weights(model)
    tokens = torch.randint(0, 300, (2, 13))
    logits, router_loss, aux_loss = model(tokens[:, :-1])
    want = token_ce_sum(logits, tokens[:, 1:])
    (want + router_loss).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got, router_loss2, _ = model(tokens[:, :-1], tokens[:, 1:])
    (got + router_loss2).backward()
    torch.testing.assert_close(got, want)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        per_token, _, _ = model(tokens[:, :-1], tokens[:, 1:], reduction="none")
    assert per_token.shape == (2, 12)
    torch.testing.assert_close(per_token.sum(), want.detach())
