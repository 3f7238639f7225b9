"""Mesa: memory-saving training with 8-bit activations (arXiv 2111.11124), pure PyTorch.

The forward pass is exact; the tensors each op saves for backward are stored as per-group
uint8 codes (head-wise for attention tensors, channel groups otherwise) with running
range/minimum estimates and stochastic rounding, and dequantised in backward::

    from ev_compress import mesa

    model = timm.create_model("deit_small_patch16_224")
    mesa.convert(model)                      # in place; default policy: everything supported
    print(mesa.summary(model, torch.randn(2, 3, 224, 224)))
    ...train as usual (fp32, fp16/bf16 autocast, checkpointing, DDP)...
    mesa.revert(model)                       # back to the original model

Compressed: linear/conv inputs, layer-norm and batch-norm inputs (+ fp32 statistics),
GELU/SiLU inputs, softmax outputs, matmul operands, ``F.scaled_dot_product_attention``
q/k/v (backward recomputes attention from them) and ReLU as a 1-bit mask — whether called by
``nn`` modules or functionally inside timm and ev blocks (see :mod:`ev_compress.mesa.core`).
"""

from ev_compress.mesa.core import (
    MesaSummary,
    SavedTensorMeter,
    SlotRecord,
    convert,
    is_converted,
    mesa_disabled,
    revert,
    strip_state_dict,
    summary,
)
from ev_compress.mesa.policy import OP_KINDS, MesaPolicy
from ev_compress.mesa.quant import (
    GroupLayout,
    QTensor,
    dequantize,
    make_layout,
    pack_bits,
    quantize,
    unpack_bits,
    update_running_range,
)

__all__ = [
    "OP_KINDS",
    "GroupLayout",
    "MesaPolicy",
    "MesaSummary",
    "QTensor",
    "SavedTensorMeter",
    "SlotRecord",
    "convert",
    "dequantize",
    "is_converted",
    "make_layout",
    "mesa_disabled",
    "pack_bits",
    "quantize",
    "revert",
    "strip_state_dict",
    "summary",
    "unpack_bits",
    "update_running_range",
]
