"""Building blocks (attention family, token merging, MLPs) used by the ev models."""

from ev_core.layers.attention import (
    AttentionBackendError,
    MultiHeadSelfAttention,
    attend,
    attention,
    attention_backend,
    backend_support,
    set_attention_backend,
    settle_backend,
)
from ev_core.layers.dtm import DeformableTokenMerging, deform_merge_2x2
from ev_core.layers.embed import LITBlock, PatchEmbed
from ev_core.layers.hilo import HiLo, hilo_macs
from ev_core.layers.mlp import ConvFFN, Mlp
from ev_core.layers.relpos import RelPosAttention
from ev_core.layers.sra import SpatialReductionAttention
from ev_core.layers.window import WindowAttention, window_partition, window_reverse

__all__ = [
    "AttentionBackendError",
    "ConvFFN",
    "DeformableTokenMerging",
    "HiLo",
    "LITBlock",
    "Mlp",
    "MultiHeadSelfAttention",
    "PatchEmbed",
    "RelPosAttention",
    "SpatialReductionAttention",
    "WindowAttention",
    "attend",
    "attention",
    "attention_backend",
    "backend_support",
    "deform_merge_2x2",
    "hilo_macs",
    "set_attention_backend",
    "settle_backend",
    "window_partition",
    "window_reverse",
]
