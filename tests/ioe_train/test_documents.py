"""Document boundaries in packed windows: where documents start, and block-causal attention that
equals running each document alone."""

from __future__ import annotations

import copy

import pytest
import torch

from ioe_train.blocks import document_mask, document_mask_mod
from ioe_train.config import ConfigError, load_config
from ioe_train.model import ModelConfig, build_model, document_starts, init_weights
from ioe_train.moe import MoEConfig

EOS = 7
MODELS = {
    "tiny_dense": ModelConfig(name="tiny_dense", vocab_size=64, eos_id=EOS, attention="block_causal"),
    "tiny_moe": ModelConfig(name="tiny_moe", vocab_size=64, eos_id=EOS, attention="block_causal",
                            moe=MoEConfig(num_experts=4, top_k=2)),  # fmt: skip
}

pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(cfg: ModelConfig):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    init_weights(model)
    return model


def documents(lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Documents of the given lengths, each ending with EOS (the last one cut off by the window)."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for i, n in enumerate(lengths):
        doc = torch.randint(8, 64, (n,), generator=gen)  # ids 8..63: no EOS inside
        if i < len(lengths) - 1:
            doc[-1] = EOS
        docs.append(doc)
    return docs


def test_document_starts_by_hand():
    tokens = torch.tensor([[EOS, 3, 4, EOS, EOS, 5], [1, 2, 3, 4, 5, EOS]])
    assert document_starts(tokens, EOS).int().tolist() == [[1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_block_causal_equals_each_document_run_alone(name):
    model = seeded(MODELS[name])
    rows = [documents([5, 9, 1, 6], seed=1), documents([12, 9], seed=2)]  # both 21 tokens
    packed = torch.stack([torch.cat(docs) for docs in rows])  # [2, 21]
    logits, _, _ = model(packed)
    for b, docs in enumerate(rows):
        start = 0
        for doc in docs:
            alone, _, _ = model(doc[None])
            got = logits[b, start : start + len(doc)]
            torch.testing.assert_close(got, alone[0], rtol=1e-5, atol=1e-5)
            start += len(doc)

    # The default lets the second document see the first: the comparison above can fail.
    crossing = copy.deepcopy(model)
    crossing.attention = "causal"
    first = len(rows[0][0])
    alone, _, _ = model(rows[0][1][None])
    assert not torch.allclose(crossing(packed)[0][0, first : first + 9], alone[0], atol=1e-3)


def test_ioe_document_reset_with_block_causal_equals_each_document_alone():
    # Documents that fill whole segments: with the reset, each one's first segment takes the prior
    # and its later segments are routed by its own tokens only, exactly as when run alone.
    cfg = ModelConfig(name="tiny_moe", vocab_size=64, eos_id=EOS, attention="block_causal",
                      moe=MoEConfig(num_experts=4, router="ioe", ioe_segment_len=4, ioe_document_reset=True))  # fmt: skip
    model = seeded(cfg)
    with torch.no_grad():
        model.layers[0].mlp.router.prior.normal_()  # a prior unlike the gate's choices
        model.layers[1].mlp.router.prior.normal_()
    rows = [documents([8, 4, 12], seed=3), documents([16, 8], seed=4)]  # 24 tokens, 6 segments each
    packed = torch.stack([torch.cat(docs) for docs in rows])
    logits, _, _ = model(packed)
    for b, docs in enumerate(rows):
        start = 0
        for doc in docs:
            alone, _, _ = model(doc[None])
            torch.testing.assert_close(logits[b, start : start + len(doc)], alone[0], rtol=1e-5, atol=1e-5)
            start += len(doc)

    no_reset = copy.deepcopy(model)
    no_reset.document_reset = False  # routes the second document by the first one's tail
    alone, _, _ = model(rows[0][1][None])
    assert not torch.allclose(no_reset(packed)[0][0, 8:12], alone[0], atol=1e-4)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # bf16 RMSNorm on CPU
def test_block_causal_blocks_compile_without_graph_breaks():
    model = seeded(MODELS["tiny_moe"]).to(torch.bfloat16)
    compiled = copy.deepcopy(model)
    for i, layer in enumerate(compiled.layers):
        compiled.layers[i] = torch.compile(layer, backend="aot_eager", fullgraph=True)
    tokens = torch.cat(documents([6, 10], seed=3))[None]
    for got, want in zip(compiled(tokens), model(tokens)):
        torch.testing.assert_close(got, want)


def test_flex_mask_mod_equals_the_sdpa_mask():
    """The FlexAttention path runs on CUDA only; its mask_mod is checked here on CPU."""
    from torch.nn.attention.flex_attention import create_mask

    doc_start = document_starts(torch.cat(documents([3, 6, 1, 6], seed=5)).repeat(2, 1), EOS)  # [2, 16]
    doc_start[1, 8] = True
    flex = create_mask(document_mask_mod(doc_start.cumsum(1)), 2, 1, 16, 16, device="cpu")  # [B, 1, S, S]
    assert torch.equal(flex[:, 0], document_mask(doc_start))
    assert document_mask(doc_start)[0].sum() == 6 + 21 + 1 + 21  # per document n (n + 1) / 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm device")
def test_flex_attention_block_mask_equals_each_document_alone():
    model = seeded(MODELS["tiny_dense"]).cuda()
    docs = documents([40, 88], seed=4)  # 128 tokens: one FlexAttention block
    logits, _, _ = model(torch.cat(docs)[None].cuda())
    alone, _, _ = model(docs[1][None].cuda())
    torch.testing.assert_close(logits[0, 40:], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "override,key",
    [("model.attention=sliding", "^model.attention: must be one of"),
     ("model.moe.ioe_document_reset=true", "^model.moe.ioe_document_reset: applies to router 'ioe' only")],  # fmt: skip
)
def test_config_rejects_bad_document_options(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["data.train_dirs=[x]", "eval.interval=0", override])


def test_selective_checkpointing_keeps_block_causal_attention():
    """Under selective AC attention is saved, not recomputed, for either block-causal kernel:
    FlexAttention (GPU; its backward does not run on CPU, so only the policy is checked here) and
    SDPA with the dense mask (CPU: counted, one call per block over forward and backward)."""
    from torch.utils.checkpoint import CheckpointPolicy
    from torch.utils._python_dispatch import TorchDispatchMode

    from ioe_train.parallelize import _KEEP_SELECTIVE, _checkpointed, _keep_policy

    flex = torch._higher_order_ops.flex_attention
    assert _keep_policy(_KEEP_SELECTIVE, None, flex) == CheckpointPolicy.MUST_SAVE
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func is sdpa
            return func(*args, **(kwargs or {}))

    model = seeded(MODELS["tiny_moe"])
    for i, block in enumerate(model.layers):
        model.layers[i] = _checkpointed(block, "selective")
    tokens = torch.cat(documents([6, 10], seed=3))[None]
    with Count():
        ce, router_loss, aux_loss = model(tokens[:, :-1], tokens[:, 1:])
        (ce + router_loss + aux_loss).backward()
    assert Count.calls == len(model.layers)
