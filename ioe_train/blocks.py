"""The torchtune seam: every torchtune component this project builds with, imported here only.

torchtune 0.6.1 is its last release; keeping it behind this one module means a replacement (or a
vendored block) is a change here, not in the model code.
"""

from __future__ import annotations

import logging

# torchtune imports torchao, whose __init__ warns (on every import, on every rank) that its C++
# kernels do not match a CPU build of torch. None of them is used here: hide that one import's
# warnings, then restore the logger as it was.
_torchao_log = logging.getLogger("torchao")
_level = _torchao_log.level
_torchao_log.setLevel(logging.ERROR)
try:
    from torchtune.models.qwen2 import Qwen2RotaryPositionalEmbeddings
    from torchtune.modules import FeedForward, MultiHeadAttention, RMSNorm, TiedLinear
    from torchtune.modules.attention_utils import _SUPPORTS_FLEX_ATTENTION
finally:
    _torchao_log.setLevel(_level)

import torch
from torch import Tensor

if _SUPPORTS_FLEX_ATTENTION:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

__all__ = [
    "FeedForward",
    "MultiHeadAttention",
    "Qwen2RotaryPositionalEmbeddings",
    "RMSNorm",
    "TiedLinear",
    "document_mask",
    "document_mask_mod",
]


def document_mask(doc_start: Tensor) -> Tensor | BlockMask:
    """Block-causal attention mask for `MultiHeadAttention(..., mask=)`: position q attends to
    kv <= q of its own document only. doc_start: [B, S] bool, True where a document begins.

    A FlexAttention BlockMask where torchtune runs FlexAttention (CUDA/ROCm, capability >= 7.5):
    it skips the fully masked blocks, where SDPA with a dense mask still computes them. Elsewhere
    (CPU) a boolean [B, S, S] mask for SDPA.
    """
    doc = doc_start.cumsum(dim=1)  # [B, S] index of each position's document
    b, s = doc.shape
    if _SUPPORTS_FLEX_ATTENTION and doc.device.type == "cuda":
        return create_block_mask(document_mask_mod(doc), b, None, s, s, device=doc.device)
    causal = torch.ones(s, s, dtype=torch.bool, device=doc.device).tril()  # [S, S]
    return causal & (doc[:, :, None] == doc[:, None, :])  # [B, S, S]


def document_mask_mod(doc: Tensor):
    """FlexAttention mask_mod of `document_mask`; doc: [B, S] document index of each position."""

    def same_document_causal(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (kv <= q) & (doc[b, q] == doc[b, kv])

    return same_document_causal
