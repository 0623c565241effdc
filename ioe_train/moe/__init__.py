"""Mixture-of-Experts layer with swappable routers (top-k and Interpolation of Experts)."""

from ioe_train.moe.config import MoEConfig
from ioe_train.moe.experts import Experts, expert_path
from ioe_train.moe.layer import MoE, balances_from_load, swiglu_mlp, update_router_biases, use_local_counts
from ioe_train.moe.losses import ReduceFn, entropy, load_balancing_loss, z_loss
from ioe_train.moe.router import (
    ROUTERS,
    ROUTING_OVERRIDES,
    IoERouter,
    Routed,
    Router,
    Routing,
    TopKBiasRouter,
    TopKRouter,
)

__all__ = [
    "ROUTERS",
    "ROUTING_OVERRIDES",
    "Experts",
    "IoERouter",
    "MoE",
    "MoEConfig",
    "ReduceFn",
    "Routed",
    "Router",
    "Routing",
    "TopKBiasRouter",
    "TopKRouter",
    "balances_from_load",
    "entropy",
    "expert_path",
    "load_balancing_loss",
    "swiglu_mlp",
    "update_router_biases",
    "use_local_counts",
    "z_loss",
]
