"""Mixture-of-Experts layer with swappable routers (top-k and Interpolation of Experts)."""

from ioe_train.moe.config import MoEConfig
from ioe_train.moe.experts import Experts, expert_path
from ioe_train.moe.layer import MoE, swiglu_mlp
from ioe_train.moe.losses import ReduceFn, entropy, load_balancing_loss, z_loss
from ioe_train.moe.router import ROUTERS, IoERouter, Routed, Router, TopKRouter

__all__ = [
    "ROUTERS",
    "Experts",
    "IoERouter",
    "MoE",
    "MoEConfig",
    "ReduceFn",
    "Routed",
    "Router",
    "TopKRouter",
    "entropy",
    "expert_path",
    "load_balancing_loss",
    "swiglu_mlp",
    "z_loss",
]
