"""The MoE layer: expert paths against a naive per-token reference, routing and loss formulas by
hand, causality of every router, the global load-balancing variant, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ioe_train.moe import (
    ROUTERS,
    MoE,
    MoEConfig,
    expert_path,
    load_balancing_loss,
    swiglu_mlp,
    z_loss,
)
from ioe_train.moe import experts as experts_module

D, H = 8, 16


# Tiny tensors: intra-op threads only add sync cost (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_moe(seed: int = 0, **cfg) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(D, MoEConfig(expert_hidden_dim=H, **cfg))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return moe


def naive_topk(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-slot reference for the top-k MoE, written from the formulas. x: [B, S, D]."""
    w_r = moe.router.gate.weight
    w_gu, w_d = moe.experts.w_gate_up, moe.experts.w_down
    rows = []
    for token in x.reshape(-1, D):
        probs = torch.softmax(w_r @ token, dim=-1)
        top = torch.topk(probs, moe.cfg.top_k)
        weights = top.values / top.values.sum() if moe.cfg.renormalize else top.values
        y = torch.zeros(D)
        for w, e in zip(weights, top.indices):
            gate, up = (token @ w_gu[e]).chunk(2)
            y = y + w * ((F.silu(gate) * up) @ w_d[e])
        if moe.shared_expert is not None:
            y = y + moe.shared_expert(token)
        rows.append(y)
    return torch.stack(rows).view_as(x)


def grads(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("path", ["grouped", "loop", "loop compiled"])
@pytest.mark.parametrize("num_experts,top_k,shared,renormalize", [(4, 2, 0, True), (8, 2, 12, False), (8, 3, 0, True)])
def test_expert_paths_match_naive_reference(path, num_experts, top_k, shared, renormalize):
    moe = make_moe(num_experts=num_experts, top_k=top_k, shared_expert_hidden_dim=shared, renormalize=renormalize,
                   grouped_mm=path.split()[0])  # fmt: skip
    x = torch.randn(2, 3, D, requires_grad=True)  # 6 tokens x K slots: some experts get none
    target = torch.randn(2, 3, D)

    # compiled, the loop is one op (experts.expert_loop) with its own backward
    out, _, _ = torch.compile(moe, backend="aot_eager", fullgraph=True)(x) if "compiled" in path else moe(x)
    (out * target).sum().backward()
    got = grads(moe, x)

    x.grad = None
    moe.zero_grad()
    want_out = naive_topk(moe, x)
    (want_out * target).sum().backward()
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, grads(moe, x)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_expert_loop_op_registration():
    x, counts = torch.randn(7, D), torch.tensor([3, 0, 4])  # expert 1 without rows
    w_gu, w_d = torch.randn(3, D, 2 * H, requires_grad=True), torch.randn(3, H, D, requires_grad=True)
    torch.library.opcheck(experts_module.expert_loop, (x.requires_grad_(), w_gu, w_d, counts))


def test_topk_selection_and_weights_by_hand():
    moe = make_moe(num_experts=4, top_k=2)
    moe.router.gate.weight.data = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]]).repeat(1, D // 2)
    x = torch.tensor([[2.0, 1.0] + [0.0] * (D - 2)])  # logits [2, 1, -2, -1]
    _, probs, weights, indices = moe.router.route(x)
    z = math.exp(2) + math.exp(1) + math.exp(-2) + math.exp(-1)
    assert indices.tolist() == [[0, 1]]
    torch.testing.assert_close(probs, torch.tensor([[math.exp(2), math.exp(1), math.exp(-2), math.exp(-1)]]) / z)
    # renormalised: e^2 / (e^2 + e^1) = sigmoid(1)
    torch.testing.assert_close(weights, torch.tensor([[1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]]))
    moe.router.renormalize = False
    torch.testing.assert_close(moe.router.route(x)[2], torch.tensor([[math.exp(2) / z, math.exp(1) / z]]))


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: log 2, log 4
    assert z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_load_balancing_loss_by_hand():
    uniform = torch.full((6, 3), 1 / 3)
    assert load_balancing_loss(uniform, torch.tensor([4, 4, 4])).item() == pytest.approx(1.0)
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])  # P = [0.7, 0.3]
    assert load_balancing_loss(probs, torch.tensor([2, 0])).item() == pytest.approx(2 * 0.7)
    collapsed = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 5)
    assert load_balancing_loss(collapsed, torch.tensor([5, 0, 0, 0])).item() == pytest.approx(4.0)


def test_layer_losses_are_the_documented_formulas():
    moe = make_moe(num_experts=4, top_k=2, z_loss_coef=0.1)
    x = torch.randn(2, 5, D)
    logits = x.reshape(-1, D) @ moe.router.gate.weight.T
    probs = logits.softmax(-1)
    counts = torch.zeros(4).index_add_(0, probs.topk(2).indices.reshape(-1), torch.ones(20))
    _, router_loss, aux_loss = moe(x)
    want_z = 0.1 * (torch.logsumexp(logits, -1) ** 2).mean()
    want_aux = 4 * (counts / 20 * probs.mean(0)).sum()
    torch.testing.assert_close(router_loss, want_z)
    torch.testing.assert_close(aux_loss, want_aux)


def test_global_aux_loss_uses_reduced_counts():
    moe = make_moe(num_experts=4, top_k=2, aux_loss_scope="global")
    x, other = torch.randn(1, 6, D), torch.randn(1, 6, D)
    with pytest.raises(RuntimeError, match="reduce_counts"):
        moe(x)
    moe.reduce_counts = lambda c: c  # identity: a single process
    local = moe.forward_with_stats(x)
    other_counts = moe.forward_with_stats(other).tokens_per_expert
    moe.reduce_counts = lambda c: c + other_counts  # a fake all-reduce over two ranks
    _, _, aux = moe(x)
    probs = (x.reshape(-1, D) @ moe.router.gate.weight.T).softmax(-1)
    total = local.tokens_per_expert + other_counts
    torch.testing.assert_close(aux, 4 * (total / total.sum() * probs.mean(0)).sum())
    assert not torch.allclose(aux, local.aux_loss)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_router_is_causal(router):
    moe = make_moe(router=router, ioe_segment_len=4)
    x = torch.randn(2, 18, D)
    out, _, _ = moe(x)
    for t in [0, 2, 3, 4, 7, 8, 13, 16]:
        changed = x.clone()
        changed[:, t + 1 :] = torch.randn(2, 18 - t - 1, D)
        out2, _, _ = moe(changed)
        torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out2[:, t + 1 :], out[:, t + 1 :])


def test_ioe_merges_parameters_from_the_previous_segment():
    moe = make_moe(router="ioe", num_experts=3, ioe_segment_len=4)
    x = torch.randn(1, 10, D)  # segments [0, 4), [4, 8), [8, 10)
    out, _, _ = moe(x)
    experts, gate = moe.experts, moe.router.gate.weight

    def merged_swiglu(xs, g):
        w_gu = torch.einsum("e,edh->dh", g, experts.w_gate_up)
        w_d = torch.einsum("e,ehd->hd", g, experts.w_down)
        up_gate = xs @ w_gu
        return (F.silu(up_gate[:, :H]) * up_gate[:, H:]) @ w_d

    g0 = torch.softmax(moe.router.prior, -1)
    g1 = torch.softmax(gate @ x[0, 0:4].mean(0), -1)
    g2 = torch.softmax(gate @ x[0, 4:8].mean(0), -1)
    torch.testing.assert_close(out[0, 0:4], merged_swiglu(x[0, 0:4], g0))
    torch.testing.assert_close(out[0, 4:8], merged_swiglu(x[0, 4:8], g1))
    torch.testing.assert_close(out[0, 8:10], merged_swiglu(x[0, 8:10], g2))


def ioe_unchunked(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The IoE formula as first written: every merged expert at once, autograd through it all."""
    b, s, d = x.shape
    seg = moe.router.segment_len
    n, e = -(-s // seg), moe.experts.num_experts
    xs = F.pad(x, (0, 0, 0, n * seg - s)).view(b, n, seg, d)
    probs = F.linear(xs[:, :-1].mean(dim=2), moe.router.gate.weight).softmax(-1)  # [B, N-1, E]
    g = torch.cat([moe.router.prior.softmax(-1).expand(b, 1, e), probs], dim=1).reshape(b * n, e)
    w_gu = torch.einsum("me,edh->mdh", g, moe.experts.w_gate_up)
    w_d = torch.einsum("me,ehd->mhd", g, moe.experts.w_down)
    gate, up = torch.bmm(xs.reshape(b * n, seg, d), w_gu).chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, w_d).view(b, n * seg, d)[:, :s]


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_ioe_equals_the_unchunked_formula_with_gradients(chunk):
    moe = make_moe(router="ioe", num_experts=3, ioe_segment_len=4, ioe_merge_chunk=chunk)
    x = torch.randn(2, 19, D, requires_grad=True)  # 5 segments per sequence, the last of 3 tokens
    dy = torch.randn(2, 19, D)
    want = ioe_unchunked(moe, x)
    want_grads = torch.autograd.grad((want * dy).sum(), [x, *moe.parameters()])
    got, _, _ = moe(x)
    got_grads = torch.autograd.grad((got * dy).sum(), [x, *moe.parameters()])
    torch.testing.assert_close(got, want)
    names = ["x", *(name for name, _ in moe.named_parameters())]
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, msg=name)


def test_ioe_keeps_no_merged_expert_for_backward():
    moe = make_moe(router="ioe", num_experts=4, ioe_segment_len=4, ioe_merge_chunk=2)
    x = torch.randn(2, 16, D, requires_grad=True)  # M = 8 merged experts of D x 2H + H x D
    params = {p.data_ptr() for p in moe.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        moe(x)
    assert max(saved) <= x.numel()  # x itself; a merged chunk would be 2 x D x 2H = 2 x x.numel()
    assert sum(saved) < 8 * 3 * D * H  # less than the M merged experts together


def ioe_and_dense_at_init(ioe_expert_init: str, dim: int = 128, hidden: int = 512, std: float = 0.02):
    """An E = 8 IoE layer and a dense SwiGLU of the expert width, initialised as init_weights does
    (the router's gate random, so segments merge with different weights)."""
    torch.manual_seed(0)
    cfg = MoEConfig(router="ioe", num_experts=8, expert_hidden_dim=hidden, ioe_segment_len=16,
                    ioe_expert_init=ioe_expert_init)  # fmt: skip
    moe, dense = MoE(dim, cfg), swiglu_mlp(dim, hidden)
    for module in (moe.experts, moe.router):
        module.init_params(std)
    for p in (*dense.parameters(), moe.router.gate.weight):
        torch.nn.init.normal_(p, std=std)
    return moe, dense


@pytest.mark.parametrize("ioe_expert_init,expert_std", [("sqrt_e", 0.02 * 8**0.5), ("unit", 0.02), ("identical", 0.02)])
def test_ioe_expert_init_sets_the_experts_std(ioe_expert_init, expert_std):
    experts = ioe_and_dense_at_init(ioe_expert_init)[0].experts
    for w in (experts.w_gate_up, experts.w_down):
        assert w.std().item() == pytest.approx(expert_std, rel=0.03)
        copies = [torch.equal(w[e], w[0]) for e in range(1, 8)]
        assert all(copies) if ioe_expert_init == "identical" else not any(copies)


# Output std of the merged expert / a dense MLP's: a SwiGLU's output scales as its weights cubed,
# and a uniform merge of E independent experts of std s has std s / sqrt(E).
@pytest.mark.parametrize(
    "ioe_expert_init,low,high", [("sqrt_e", 0.7, 1.4), ("unit", 0.03, 0.06), ("identical", 0.7, 1.4)]
)
def test_ioe_expert_init_sets_the_merged_expert_scale(ioe_expert_init, low, high):
    moe, dense = ioe_and_dense_at_init(ioe_expert_init)
    x = torch.randn(4, 64, 128)
    ratio = (moe(x)[0].std() / dense(x).std()).item()
    assert low < ratio < high, ratio  # unit: 8^-1.5 = 0.044


def test_ioe_identical_experts_merge_to_expert_zero_whatever_the_weights():
    moe, _ = ioe_and_dense_at_init("identical")
    x = torch.randn(4, 64, 128)
    w_gu, w_d = moe.experts.w_gate_up[0], moe.experts.w_down[0]
    gate, up = (x @ w_gu).chunk(2, dim=-1)
    torch.testing.assert_close(moe(x)[0], (F.silu(gate) * up) @ w_d, rtol=1e-5, atol=1e-7)


def test_ioe_document_reset_routes_by_the_prior_after_a_boundary():
    moe = make_moe(router="ioe", num_experts=3, ioe_segment_len=4, z_loss_coef=0.5)
    x = torch.randn(1, 18, D)  # segments [0,4) [4,8) [8,12) [12,16) [16,18)
    doc_start = torch.zeros(1, 18, dtype=torch.bool)
    doc_start[0, [0, 4, 6, 12]] = True  # 4: starts segment 1 with its own doc; 6: inside segment 1
    routed = moe.router(x, moe.experts, None, doc_start)
    # segment 1: token 4 starts a document -> prior; 2: segment 1 holds a start after its first
    # token -> prior; 3: token 12 starts a document -> prior; 4: segment 3 is one document -> routed
    reset = [True, True, True, True, False]
    gate, prior = moe.router.gate.weight, torch.softmax(moe.router.prior, -1)
    for s, by_prior in enumerate(reset):
        g = prior if by_prior else torch.softmax(gate @ x[0, 4 * s - 4 : 4 * s].mean(0), -1)
        w_gu = torch.einsum("e,edh->dh", g, moe.experts.w_gate_up)
        w_d = torch.einsum("e,ehd->hd", g, moe.experts.w_down)
        gate_up = x[0, 4 * s : 4 * s + 4] @ w_gu
        torch.testing.assert_close(routed.out[0, 4 * s : 4 * s + 4], (F.silu(gate_up[:, :H]) * gate_up[:, H:]) @ w_d)
    logits = gate @ x[0, 12:16].mean(0)  # the one routed segment: the losses cover it alone
    torch.testing.assert_close(routed.router_loss, 0.5 * torch.logsumexp(logits, -1) ** 2)
    torch.testing.assert_close(routed.aux_loss, 3 * logits.softmax(-1).max())

    only_first = torch.zeros(1, 18, dtype=torch.bool)
    only_first[0, 0] = True  # one document: the same as no reset
    torch.testing.assert_close(moe.router(x, moe.experts, None, only_first).out, moe(x)[0], rtol=0, atol=0)


def test_ioe_losses_and_stats():
    moe = make_moe(router="ioe", num_experts=4, ioe_segment_len=4, z_loss_coef=0.5)
    x = torch.randn(2, 11, D)  # 3 segments, the last of 3 tokens: 2 x 2 routed segments
    routed = moe.forward_with_stats(x)
    summary = x[:, :8].reshape(2, 2, 4, D).mean(2).reshape(4, D)  # segments 0 and 1 route 1 and 2
    logits = summary @ moe.router.gate.weight.T
    probs = logits.softmax(-1)
    counts = torch.zeros(4).index_add_(0, probs.argmax(-1), torch.ones(4))
    torch.testing.assert_close(routed.router_loss, 0.5 * (torch.logsumexp(logits, -1) ** 2).mean())
    torch.testing.assert_close(routed.aux_loss, 4 * (counts / 4 * probs.mean(0)).sum())
    assert routed.tokens_per_expert.sum().item() == pytest.approx(22)  # soft counts sum to B * S

    one_segment = moe.forward_with_stats(x[:, :4])
    assert one_segment.router_loss.item() == 0.0 and one_segment.aux_loss.item() == 0.0


def test_topk_stats_count_routed_slots():
    moe = make_moe(num_experts=4, top_k=2)
    routed = moe.forward_with_stats(torch.randn(3, 5, D))
    assert routed.tokens_per_expert.sum().item() == 30
    assert 0 < routed.entropy.item() <= math.log(4)
    assert not routed.tokens_per_expert.requires_grad and not routed.entropy.requires_grad


def test_auto_path_table():
    assert expert_path(torch.device("cpu"), torch.float32) == "grouped"
    assert expert_path(torch.device("meta"), torch.bfloat16) == "loop"


def test_auto_never_picks_grouped_where_parity_failed(monkeypatch):
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    monkeypatch.setattr(experts_module, "GROUPED_MM_FAILURES", (("cpu", "1.0"),))  # another torch: no effect
    assert expert_path(torch.device("cpu"), torch.bfloat16) == "grouped"
    monkeypatch.setattr(experts_module, "GROUPED_MM_FAILURES", (("cpu", minor),))
    assert expert_path(torch.device("cpu"), torch.bfloat16) == "loop"

    def broken(*args, **kwargs):
        raise AssertionError("auto called torch._grouped_mm on a device listed as failing")

    monkeypatch.setattr(torch, "_grouped_mm", broken)
    moe = make_moe()  # grouped_mm="auto"
    moe(torch.randn(2, 5, D))
    monkeypatch.setattr(experts_module, "GROUPED_MM_FAILURES", (("cpu", ""),))  # "": any torch
    moe(torch.randn(2, 5, D))


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_compiles_without_graph_breaks(router):
    # bf16: the dtype of GPU training, and the only one _grouped_mm traces with.
    moe = make_moe(router=router, grouped_mm="grouped", ioe_segment_len=4).to(torch.bfloat16)
    x = torch.randn(2, 9, D, dtype=torch.bfloat16)
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x), moe(x)):
        torch.testing.assert_close(got, want)


def test_auto_path_compiles_in_fp32():
    moe = make_moe()
    x = torch.randn(2, 9, D)
    for got, want in zip(torch.compile(moe, backend="aot_eager")(x), moe(x)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_experts", 0),
        ("top_k", 9),
        ("router", "nope"),
        ("jitter", 1.0),
        ("grouped_mm", "fast"),
        ("aux_loss_scope", "sequence"),
        ("ioe_segment_len", 0),
        ("ioe_merge_chunk", 0),
        ("z_loss_coef", -1.0),
        ("ioe_expert_init", "zero"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{field: value})


def test_ioe_identical_experts_separate_through_their_gradients():
    # Expert e receives sum_s g_se dW_s: the merge weights g differ per segment, so do the gradients.
    moe, _ = ioe_and_dense_at_init("identical")
    moe(torch.randn(2, 64, 128))[0].square().sum().backward()  # 4 segments per sequence
    grad = moe.experts.w_gate_up.grad
    assert all((grad[e] - grad[0]).norm() > 1e-3 * grad[0].norm() for e in range(1, 8))


def test_ioe_expert_init_is_refused_for_other_routers():
    with pytest.raises(ValueError, match=r"^ioe_expert_init applies to router 'ioe' only"):
        MoEConfig(router="topk", ioe_expert_init="identical")
    MoEConfig(router="ioe", ioe_expert_init="identical")


def test_top1_gate_learns_from_the_output():
    # Renormalising one weight would make it exactly 1: the gate would learn from aux/z-loss only.
    moe = make_moe(num_experts=4, top_k=1, z_loss_coef=0.0)
    out, _, _ = moe(torch.randn(2, 8, D))
    out.square().sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 1e-3
