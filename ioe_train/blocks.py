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
finally:
    _torchao_log.setLevel(_level)

__all__ = [
    "FeedForward",
    "MultiHeadAttention",
    "Qwen2RotaryPositionalEmbeddings",
    "RMSNorm",
    "TiedLinear",
]
