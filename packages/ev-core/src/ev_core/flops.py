"""FLOP / MAC counting for any ev (or timm) model with :class:`torch.utils.flop_counter.FlopCounterMode`.

``FlopCounterMode`` counts matmuls and convolutions at the ATen level. Two gaps are filled here:

* the CPU SDPA kernel (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward) has
  no formula upstream and would count as zero -- it gets the standard SDPA formula
  (``4·B·h·Nq·Nk·d``: QKᵀ and AV);
* ``torchvision::deform_conv2d`` (the DTM reference path) is a custom op -- it is counted as the
  convolution it is (``2·B·C_out·Ho·Wo·C_in·kh·kw``).

The DTM fast path is a gather plus a GEMM; the GEMM is counted (the same MACs as the
convolution), the bilinear interpolation (element-wise) is not, like every element-wise op.
LIT/LITv2 papers report MACs as "FLOPs": compare :attr:`FlopCount.gmacs` with them.

Example::

    from ev_core.flops import count_flops
    report = count_flops(timm.create_model("litv2_s"), (3, 224, 224))
    print(report.gmacs)  # ≈ 3.7 (the paper's "3.7 GFLOPs")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["FlopCount", "count_flops", "extra_flop_formulas"]


def _sdpa_cpu_flop(
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def _sdpa_cpu_backward_flop(
    grad_out_shape: Sequence[int],
    query_shape: Sequence[int],
    key_shape: Sequence[int],
    value_shape: Sequence[int],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    return int(sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape))


def _deform_conv2d_flop(
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    # out [B, C_out, Ho, Wo]; weight [C_out, C_in / groups, kh, kw]
    return 2 * prod(out_shape) * prod(weight_shape[1:])


def extra_flop_formulas() -> dict[Any, Any]:
    """The ``custom_mapping`` for :class:`FlopCounterMode` that :func:`count_flops` uses."""
    mapping: dict[Any, Any] = {}
    aten = torch.ops.aten
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flop
    try:
        import torchvision  # noqa: F401  (registers torch.ops.torchvision)

        mapping[torch.ops.torchvision.deform_conv2d] = _deform_conv2d_flop
    except (ImportError, AttributeError, RuntimeError):  # torchvision without its C++ ops
        pass
    return mapping


@dataclass
class FlopCount:
    """Result of :func:`count_flops` (per forward of one batch)."""

    flops: int
    input_shape: tuple[int, ...]
    by_operator: dict[str, int] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        """Multiply-accumulates (``flops / 2``), what the LIT/LITv2/Swin papers call FLOPs."""
        return self.flops // 2

    @property
    def gmacs(self) -> float:
        """MACs per image in units of 10⁹."""
        return self.macs / self.input_shape[0] / 1e9

    @property
    def gflops(self) -> float:
        """FLOPs per image in units of 10⁹."""
        return self.flops / self.input_shape[0] / 1e9


def count_flops(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    sample_shape: bool | None = None,
) -> FlopCount:
    """Count the FLOPs of one forward pass (eval mode, no grad).

    Args:
        model: any module taking one batch.
        input_size: ``(C, H, W)`` or a full ``(B, C, H, W)`` shape; any rank with
            ``sample_shape=True`` (e.g. a video clip ``(C, T, H, W)``).
        batch_size: batch when ``input_size`` has 3 entries (or is a sample shape).
        sample_shape: ``True``: ``input_size`` never includes the batch; ``None``: 3 entries
            are a sample, 4 a full shape (images).
        device: where to run (default: the model's parameters' device).

    Returns:
        A :class:`FlopCount` (total FLOPs, per-operator breakdown, MACs/GMACs per image).
    """
    shape = tuple(int(s) for s in input_size)
    if sample_shape or (sample_shape is None and len(shape) == 3):
        shape = (batch_size, *shape)
    elif len(shape) != 4:
        raise ValueError(f"input_size must be (C, H, W) or (B, C, H, W), got {input_size}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(shape, device=device)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
        with counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    totals = counter.get_flop_counts().get("Global", {})
    by_op = {str(k): int(v) for k, v in totals.items()}
    return FlopCount(flops=int(counter.get_total_flops()), input_shape=shape, by_operator=by_op)
