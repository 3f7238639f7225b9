"""SPViT (TPAMI'24, arXiv 2111.11802): single-path pruning of self-attention into convolutions.

Every MSA shares its value/output weights with a 3×3 and a 1×1 bottleneck convolution through a
learnable per-tap head mixture; gates pick attention / 3×3 / 1×1 / skip per block and keep or
drop each FFN hidden unit, searched against a FLOPs target. ``export`` then builds a physically
smaller hybrid model::

    import timm, ev_core
    from ev_compress import spvit

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    spvit.convert(model)                                   # unified attention + gates
    result = spvit.search(model, loader, target_gflops=3.2, config=spvit.SearchConfig(...))
    small = spvit.export(model)                            # fewer params and FLOPs
    spvit.save_exported(small, "deit_s_spvit.safetensors")
    again = spvit.load_exported("deit_s_spvit.safetensors")  # no search code needed

"FLOPs" are multiply-accumulates, as in the paper.
"""

from ev_compress.spvit.convert import (
    SPViTMeta,
    convert,
    default_gate_settings,
    force_choice,
    is_converted,
)
from ev_compress.spvit.export import export, fold_batch_norm, load_searched, save_searched
from ev_compress.spvit.flops import BlockCosts, block_costs, model_gflops, model_macs
from ev_compress.spvit.gates import cumulative_gates, flops_indicator, relaxed_bernoulli_st
from ev_compress.spvit.hybrid import (
    BLOCK_CHOICES,
    ConvBottleneck,
    MlpOnlyBlock,
    SPViTArchError,
    TokenLayout,
    apply_arch,
    load_exported,
    save_exported,
)
from ev_compress.spvit.layers import GatedFFN, UnifiedAttention
from ev_compress.spvit.ops import centre_tap, conv_kernels, head_mixture, tap_positions
from ev_compress.spvit.search import SearchConfig, SearchResult, block_choices, search, spvit_loss

__all__ = [
    "BLOCK_CHOICES",
    "BlockCosts",
    "ConvBottleneck",
    "GatedFFN",
    "MlpOnlyBlock",
    "SPViTArchError",
    "SPViTMeta",
    "SearchConfig",
    "SearchResult",
    "TokenLayout",
    "UnifiedAttention",
    "apply_arch",
    "block_choices",
    "block_costs",
    "centre_tap",
    "conv_kernels",
    "convert",
    "cumulative_gates",
    "default_gate_settings",
    "export",
    "flops_indicator",
    "fold_batch_norm",
    "force_choice",
    "head_mixture",
    "is_converted",
    "load_exported",
    "load_searched",
    "model_gflops",
    "model_macs",
    "relaxed_bernoulli_st",
    "save_exported",
    "save_searched",
    "search",
    "spvit_loss",
    "tap_positions",
]
