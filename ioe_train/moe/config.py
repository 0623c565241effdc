"""Configuration of one Mixture-of-Experts layer (every MoE layer of a model shares it)."""

from __future__ import annotations

from dataclasses import dataclass

from ioe_train.moe.router import ROUTERS

EXPERT_PATHS = ("auto", "grouped", "loop")
AUX_LOSS_SCOPES = ("microbatch", "global")
IOE_EXPERT_INITS = ("sqrt_e", "unit", "identical")


@dataclass
class MoEConfig:
    """A MoE layer: experts, the router that picks or merges them, and the router's losses."""

    num_experts: int = 8  # E: SwiGLU experts per layer
    top_k: int = 2  # K: experts per token for the `topk` router (IoE merges all E instead)
    # SwiGLU hidden size of one expert; 0 = the dense MLP's hidden size divided by the router's
    # active experts (4864 / 2 = 2432 for Qwen2.5-0.5B with top-2): the dense model's active FLOPs.
    expert_hidden_dim: int = 0
    shared_expert_hidden_dim: int = 0  # hidden size of an always-on shared SwiGLU expert; 0 = none
    router: str = "topk"  # a key of ioe_train.moe.router.ROUTERS: "topk" | "ioe" | "topk_bias"
    renormalize: bool = True  # topk, K > 1: rescale the K gate weights to sum to 1 (Mixtral, Qwen-MoE)
    z_loss_coef: float = 1e-3  # weight of the ST-MoE router z-loss inside `router_loss`
    jitter: float = 0.0  # training-time router input noise x * U(1 - j, 1 + j) (Switch); 0 = off
    ioe_segment_len: int = 64  # ioe: tokens per segment sharing one merged expert
    # ioe: segments merged at a time; bounds the transient merged weights to chunk x 3DH (x2 in
    # backward, with their gradients): 16 x 13.1M = 0.42 GB bf16 at D 896, H 4864.
    ioe_merge_chunk: int = 16
    # Expert matmuls: "grouped" (torch._grouped_mm), "loop" (one matmul per expert on its slice of
    # the expert-sorted tokens; exact, host-syncs), or "auto" (per device: experts.expert_path).
    grouped_mm: str = "auto"
    # Tokens the load-balancing counts cover: "microbatch" (this rank's forward) or "global"
    # (counts summed over data-parallel ranks by MoE.reduce_counts, as Megatron's global_aux_loss).
    aux_loss_scope: str = "microbatch"
    # ioe: route each document's first segment by the learned prior, not by the previous
    # document's tail (needs model.eos_id to mark document ends; docs/MOE.md).
    ioe_document_reset: bool = False
    # ioe: the experts' init, s the model's init std: "sqrt_e" = std s * sqrt(E), the uniform
    # merge at init at the dense MLP's scale; "unit" = std s, the merge's output E^-1.5 smaller;
    # "identical" = all E experts one N(0, s^2) draw, any merge equals it at init (docs/MOE.md).
    ioe_expert_init: str = "sqrt_e"
    # topk_bias: change of each expert's selection bias per optimizer step, towards balance
    # (DeepSeek-V3's gamma = 0.001; the bias acts on softmax probs, which lie in [0, 1]).
    bias_update_rate: float = 1e-3

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.expert_hidden_dim < 0:
            raise ValueError(f"expert_hidden_dim must be >= 0, got {self.expert_hidden_dim}")
        if self.shared_expert_hidden_dim < 0:
            raise ValueError(f"shared_expert_hidden_dim must be >= 0, got {self.shared_expert_hidden_dim}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {self.router!r}")
        if self.z_loss_coef < 0:
            raise ValueError(f"z_loss_coef must be >= 0, got {self.z_loss_coef}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if self.ioe_segment_len < 1:
            raise ValueError(f"ioe_segment_len must be >= 1, got {self.ioe_segment_len}")
        if self.ioe_merge_chunk < 1:
            raise ValueError(f"ioe_merge_chunk must be >= 1, got {self.ioe_merge_chunk}")
        if self.grouped_mm not in EXPERT_PATHS:
            raise ValueError(f"grouped_mm must be one of {EXPERT_PATHS}, got {self.grouped_mm!r}")
        if self.aux_loss_scope not in AUX_LOSS_SCOPES:
            raise ValueError(f"aux_loss_scope must be one of {AUX_LOSS_SCOPES}, got {self.aux_loss_scope!r}")
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.ioe_document_reset and self.router != "ioe":
            raise ValueError(f"ioe_document_reset applies to router 'ioe' only, got router {self.router!r}")
        if self.ioe_expert_init not in IOE_EXPERT_INITS:
            raise ValueError(f"ioe_expert_init must be one of {IOE_EXPERT_INITS}, got {self.ioe_expert_init!r}")
        if self.ioe_expert_init != "sqrt_e" and self.router != "ioe":
            raise ValueError(f"ioe_expert_init applies to router 'ioe' only (leave it 'sqrt_e'), "
                             f"got {self.ioe_expert_init!r} with router {self.router!r}")  # fmt: skip
