"""Configuration of an ioe-pretrain decoder exported by `ioe-train export --format hf`.

Written into the export next to modeling_ioe.py; needs only transformers.
"""

from transformers import PretrainedConfig

ROUTERS = ("dense", "topk", "topk_bias", "ioe")


class IoeConfig(PretrainedConfig):
    """A Qwen2.5-architecture decoder whose MLPs are dense or MoE layers with one of ROUTERS."""

    model_type = "ioe_pretrain"

    def __init__(self, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, attention="causal", router="dense", num_experts=8,
                 num_experts_per_tok=2, expert_hidden_dim=0, shared_expert_hidden_dim=0, renormalize=True, ioe_segment_len=64,
                 ioe_document_reset=False, ioe_merge_chunk=16, eos_token_id=151643, bos_token_id=None,
                 **kwargs):  # fmt: skip
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size  # D
        self.intermediate_size = intermediate_size  # dense SwiGLU hidden size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention = attention  # "causal" | "block_causal" (a token sees its own document only)
        self.router = router
        self.num_experts = num_experts  # E
        self.num_experts_per_tok = num_experts_per_tok  # K (topk, topk_bias); not `top_k`, a generation setting
        self.expert_hidden_dim = expert_hidden_dim  # H
        self.shared_expert_hidden_dim = shared_expert_hidden_dim  # 0 = no shared expert
        self.renormalize = renormalize  # topk, K > 1: gate weights rescaled to sum to 1
        self.ioe_segment_len = ioe_segment_len  # ioe: tokens per segment sharing one merged expert
        self.ioe_document_reset = ioe_document_reset  # ioe: a document's first segment uses the prior
        self.ioe_merge_chunk = ioe_merge_chunk  # ioe: merged experts held at a time
        kwargs.setdefault("tie_word_embeddings", False)  # the output projection reads the embedding itself
        super().__init__(eos_token_id=eos_token_id, bos_token_id=bos_token_id, **kwargs)
