"""Mesa: memory-saving training with 8-bit activations (arXiv 2111.11124), pure PyTorch.

The forward pass is exact; the tensors each op saves for backward are stored as per-group
uint8 codes (head-wise for attention tensors, channel groups otherwise, layer-norm inputs
normalised per token) with running range/minimum estimates and stochastic rounding, and
dequantised in backward::

    from ev_compress import mesa

    model = timm.create_model("deit_small_patch16_224")
    mesa.convert(model)                      # in place; default policy (patch embedding exact)
    print(mesa.summary(model, torch.randn(2, 3, 224, 224)))
    ...train as usual (fp32, fp16/bf16 autocast, checkpointing, DDP, model EMA)...
    mesa.revert(model)                       # back to the original model

What is compressed, per op kind: :data:`OP_KINDS` (one registry, :mod:`ev_compress.mesa.ops`).
Only training-mode forwards with gradients are compressed. ``torch.compile(model,
fullgraph=True)`` captures a converted model in one graph: every compressed op is a custom op of
the ``ev_mesa`` library (:mod:`ev_compress.mesa.ops._library`).
"""

from ev_compress.mesa.core import (
    convert,
    is_converted,
    mesa_disabled,
    revert,
    running_estimates,
    strip_state_dict,
)
from ev_compress.mesa.policy import (
    OP_KINDS,
    LayerRule,
    MesaPolicy,
    ModulePolicy,
    OpSettings,
    load_policy,
)
from ev_compress.mesa.quant import (
    GroupLayout,
    QTensor,
    dequantize,
    make_layout,
    mix_seed,
    pack_bits,
    quantize,
    unpack_bits,
    update_running_range,
)
from ev_compress.mesa.records import FullPrecisionRecord, SavedTensorMeter, SlotRecord
from ev_compress.mesa.summary import MesaSummary, summary

__all__ = [
    "OP_KINDS",
    "FullPrecisionRecord",
    "GroupLayout",
    "LayerRule",
    "MesaPolicy",
    "MesaSummary",
    "ModulePolicy",
    "OpSettings",
    "QTensor",
    "SavedTensorMeter",
    "SlotRecord",
    "convert",
    "dequantize",
    "is_converted",
    "load_policy",
    "make_layout",
    "mesa_disabled",
    "mix_seed",
    "pack_bits",
    "quantize",
    "revert",
    "running_estimates",
    "strip_state_dict",
    "summary",
    "unpack_bits",
    "update_running_range",
]
