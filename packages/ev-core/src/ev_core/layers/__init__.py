"""Building blocks (attention family, token merging, MLPs) used by the ev models."""

from ev_core.layers.attention import (
    AttentionBackendError,
    MultiHeadSelfAttention,
    attend,
    attention_backend,
    backend_support,
    set_attention_backend,
    set_fused_attention,
)
from ev_core.layers.sra import SpatialReductionAttention
from ev_core.layers.window import WindowAttention, window_partition, window_reverse

__all__ = [
    "AttentionBackendError",
    "MultiHeadSelfAttention",
    "SpatialReductionAttention",
    "WindowAttention",
    "attend",
    "attention_backend",
    "backend_support",
    "set_attention_backend",
    "set_fused_attention",
    "window_partition",
    "window_reverse",
]
