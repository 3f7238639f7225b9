"""Multiplications, additions and energy of one forward pass, counted from the ATen ops it runs.

:func:`count_energy` runs the model once under a ``TorchDispatchMode`` (the mechanism of
:class:`torch.utils.flop_counter.FlopCounterMode`) and prices every ATen op from its shapes:
nothing is a hand-kept per-module formula, so any model (timm, ev, custom) is counted as it
actually executes.

Counting rules (``n`` = output elements unless stated):

=============================================  ==========================================
matmul ``[M,K]·[K,N]`` (``mm``/``bmm``/einsum)  ``M·N·K`` mul + ``M·N·K`` add (one MAC = one
                                               mul + one add, the paper's convention)
``addmm``/``baddbmm``, convolution with bias    the matmul/conv MACs + ``n`` adds for the bias
convolution                                     ``n · C_in/groups · kernel`` MACs
torchvision ``deform_conv2d``                   the conv's MACs + 4 MACs per bilinear sample
``ev_compress::code_matmul`` (±1 codes · x)     ``M·N·K`` **adds**, no mul (binary-code
                                               products are sign flips + accumulation)
SDPA kernels                                    ``q·kᵀ`` and ``p·v`` MACs, the scale (mul),
                                               softmax (below) on the ``L×S`` logits
add / sub, sum (n_in − n_out), cumsum           adds
mul / div / reciprocal / square                 muls
mean                                            sum's adds + ``n`` muls
layer norm (per input element)                  4 add + 3 mul with affine (2 add + 2 mul
                                               for the statistics, 1 + 1 to normalise,
                                               1 mul + 1 add affine)
batch norm (inference)                          2 add + 2 mul per element
softmax (per element)                           2 add (max-shift, sum) + 1 mul + 1 exp
GELU (per element)                              3 mul + 1 add + 1 erf/tanh
exp, log, sqrt, rsqrt, erf, tanh, sigmoid, …    ``other`` (transcendental, not priced)
average pooling                                 input adds + output muls
embedding bag (weighted gather-sum)             one MAC per gathered value
=============================================  ==========================================

Data movement (views, copies, cat, indexing, padding), comparisons, max/min, ReLU, sign,
clamping and RNG are free. Any other op is listed in :attr:`EnergyReport.uncounted`, so
nothing is silently dropped. Energy = ``mul · 3.7 pJ + add · 0.9 pJ`` (45 nm fp32, Horowitz
2014, as in the EcoFormer paper).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ADD_PJ", "MUL_PJ", "EnergyReport", "LayerEnergy", "count_energy"]

MUL_PJ = 3.7  # pJ per fp32 multiplication, 45 nm
ADD_PJ = 0.9  # pJ per fp32 addition, 45 nm

aten = torch.ops.aten


@dataclass
class LayerEnergy:
    """Counts of the ops run directly by one module (not by its children)."""

    name: str
    type: str
    mul: int = 0
    add: int = 0
    other: int = 0


@dataclass
class EnergyReport:
    """Result of :func:`count_energy`.

    Attributes:
        mul: multiplications of one forward pass.
        add: additions.
        other: transcendental evaluations (exp, erf, sqrt, ...), not priced.
        layers: per-module rows (ops attributed to the innermost running module), in order of
            first use; the root module is ``""``.
        uncounted: ATen ops that have no counting rule, with their call counts.
        mul_pj, add_pj: prices used for :attr:`picojoules`.
    """

    mul: int
    add: int
    other: int
    layers: list[LayerEnergy] = field(default_factory=list)
    uncounted: dict[str, int] = field(default_factory=dict)
    mul_pj: float = MUL_PJ
    add_pj: float = ADD_PJ

    @property
    def picojoules(self) -> float:
        """Energy of the arithmetic in pJ: ``mul·mul_pj + add·add_pj``."""
        return self.mul * self.mul_pj + self.add * self.add_pj

    def table(self, max_rows: int | None = None) -> str:
        """Per-layer markdown table (rows with no arithmetic are left out)."""
        rows = [r for r in self.layers if r.mul or r.add or r.other]
        if max_rows is not None:
            rows = sorted(rows, key=lambda r: -(r.mul * self.mul_pj + r.add * self.add_pj))[
                :max_rows
            ]
        lines = [
            "| layer | type | mul | add | other | energy (µJ) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            e = (r.mul * self.mul_pj + r.add * self.add_pj) / 1e6
            lines.append(
                f"| {r.name or '(model)'} | {r.type} | {r.mul:,} | {r.add:,} | {r.other:,} | {e:.3f} |"
            )
        lines.append(
            f"| **total** | | {self.mul:,} | {self.add:,} | {self.other:,} | {self.picojoules / 1e6:.3f} |"
        )
        if self.uncounted:
            lines.append("")
            lines.append(
                "Uncounted ops: " + ", ".join(f"{k} ×{v}" for k, v in self.uncounted.items())
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with ``picojoules``)."""
        d = asdict(self)
        d["picojoules"] = self.picojoules
        return d


def _numel(t: Any) -> int:
    return t.numel() if isinstance(t, Tensor) else 0


def _out(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _matmul(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    a = args[0]
    k = a.shape[-1]
    macs = _numel(_out(out)) * k
    return macs, macs, 0


def _addmm(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    a = args[1]
    n = _numel(out)
    macs = n * a.shape[-1]
    return macs, macs + n, 0


def _conv(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    x, w, bias = args[0], args[1], args[2]
    transposed = bool(args[6]) if len(args) > 6 else False
    kernel = math.prod(w.shape[2:])
    if transposed:  # each input element scatters into C_out/groups · kernel outputs
        macs = _numel(x) * w.shape[1] * kernel
    else:
        macs = _numel(_out(out)) * w.shape[1] * kernel
    return macs, macs + (_numel(_out(out)) if bias is not None else 0), 0


def _code_matmul(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    return 0, _numel(out) * args[0].shape[-1], 0


def _sdpa(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    q, k, v = args[0], args[1], args[2]
    logits = _numel(q) // q.shape[-1] * k.shape[-2]
    macs = logits * (q.shape[-1] + v.shape[-1])
    # MACs, the scale, softmax (2 add + 1 mul + 1 exp per logit)
    return macs + logits + logits, macs + 2 * logits, logits


def _elementwise(
    mul: int, add: int, other: int
) -> Callable[[tuple[Any, ...], Any], tuple[int, int, int]]:
    def rule(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
        n = _numel(_out(out))
        return mul * n, add * n, other * n

    return rule


def _sum(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    return 0, max(_numel(args[0]) - _numel(out), 0), 0


def _mean(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    return _numel(out), max(_numel(args[0]) - _numel(out), 0), 0


def _layer_norm(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    n = _numel(args[0])
    weight = args[2] if len(args) > 2 else None
    bias = args[3] if len(args) > 3 else None
    rows = n // max(math.prod(args[1]), 1)
    return (2 + (weight is not None)) * n, (3 + (bias is not None)) * n, rows


def _batch_norm(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    n = _numel(args[0])
    return 2 * n, 2 * n, 0


def _vector_norm(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    n = _numel(args[0])
    return n, n, _numel(out)


def _pool(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    return _numel(_out(out)), _numel(args[0]), 0


def _embedding_bag(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    """Weighted bag sums (e.g. bilinear sampling as in ev-core's DTM): one MAC per gathered value."""
    weight, indices = args[0], args[1]
    n = _numel(indices) * weight.shape[-1]
    per_sample = args[6] if len(args) > 6 else None
    return (n if per_sample is not None else 0), n, 0


def _deform_conv(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    """torchvision ``deform_conv2d``: bilinear sampling (4 MACs per sampled value) + the conv."""
    x, w, bias = args[0], args[1], args[4]
    o = _numel(_out(out))
    kernel = math.prod(w.shape[2:])
    sampled = o // w.shape[0] * x.shape[1] * kernel  # B·Ho·Wo · C_in · k²
    macs = o * w.shape[1] * kernel + 4 * sampled
    return macs, macs + (o if bias is not None and _numel(bias) else 0), 0


def _scalar_pow(args: tuple[Any, ...], out: Any) -> tuple[int, int, int]:
    n = _numel(out)
    if len(args) > 1 and isinstance(args[1], (int, float)) and args[1] == 2:
        return n, 0, 0
    return 0, 0, n


_RULES: dict[Any, Callable[[tuple[Any, ...], Any], tuple[int, int, int]]] = {}


def _register(ops: list[Any], rule: Callable[[tuple[Any, ...], Any], tuple[int, int, int]]) -> None:
    for op in ops:
        _RULES[op] = rule


_register([aten.mm, aten.bmm, aten.matmul, aten.dot, aten.mv], _matmul)
_register([aten.addmm, aten.baddbmm, aten._addmm_activation], _addmm)
_register([aten.convolution, aten._convolution], _conv)
_register(
    [
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention,
        aten._scaled_dot_product_efficient_attention,
        aten._scaled_dot_product_cudnn_attention,
    ],
    _sdpa,
)
_register([aten.add, aten.add_, aten.sub, aten.sub_, aten.rsub, aten.cumsum], _elementwise(0, 1, 0))
_register(
    [aten.mul, aten.mul_, aten.div, aten.div_, aten.reciprocal, aten.square], _elementwise(1, 0, 0)
)
_register([aten.addcmul, aten.addcdiv, aten.lerp], _elementwise(1, 1, 0))
_register([aten.sum], _sum)
_register([aten.mean], _mean)
_register([aten.native_layer_norm], _layer_norm)
_register(
    [
        aten._native_batch_norm_legit_no_training,
        aten._native_batch_norm_legit,
        aten.native_batch_norm,
    ],
    _batch_norm,
)
_register([aten.linalg_vector_norm, aten.norm], _vector_norm)
_register([aten._softmax, aten._log_softmax, aten._safe_softmax], _elementwise(1, 2, 1))
_register([aten.gelu], _elementwise(3, 1, 1))
_register([aten.silu, aten.hardswish, aten.hardsigmoid, aten.mish], _elementwise(1, 1, 1))
_register(
    [
        aten.exp,
        aten.log,
        aten.sqrt,
        aten.rsqrt,
        aten.erf,
        aten.tanh,
        aten.sigmoid,
        aten.sin,
        aten.cos,
        aten.log1p,
        aten.expm1,
    ],
    _elementwise(0, 0, 1),
)
_register([aten.pow], _scalar_pow)
_register([aten._embedding_bag_forward_only, aten._embedding_bag], _embedding_bag)
_register(
    [
        aten.avg_pool2d,
        aten.avg_pool1d,
        aten.avg_pool3d,
        aten._adaptive_avg_pool2d,
        aten.adaptive_avg_pool1d,
        aten._adaptive_avg_pool3d,
    ],
    _pool,
)

_FREE = {
    getattr(aten, n)
    for n in [
        "view",
        "_unsafe_view",
        "reshape",
        "permute",
        "transpose",
        "t",
        "expand",
        "expand_as",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "index_select",
        "gather",
        "scatter",
        "scatter_",
        "masked_fill",
        "masked_fill_",
        "clone",
        "copy_",
        "_to_copy",
        "contiguous",
        "detach",
        "alias",
        "cat",
        "stack",
        "split",
        "split_with_sizes",
        "unbind",
        "unfold",
        "flatten",
        "as_strided",
        "zeros",
        "zeros_like",
        "ones",
        "ones_like",
        "empty",
        "empty_like",
        "empty_strided",
        "full",
        "full_like",
        "fill_",
        "new_zeros",
        "new_ones",
        "new_empty",
        "new_full",
        "zero_",
        "arange",
        "randperm",
        "rand",
        "randn",
        "rand_like",
        "randn_like",
        "bernoulli",
        "bernoulli_",
        "native_dropout",
        "lift_fresh",
        "where",
        "clamp",
        "clamp_",
        "clamp_min",
        "clamp_max",
        "clamp_min_",
        "maximum",
        "minimum",
        "max",
        "min",
        "amax",
        "amin",
        "argmax",
        "argmin",
        "topk",
        "sort",
        "eq",
        "ne",
        "ge",
        "gt",
        "le",
        "lt",
        "logical_and",
        "logical_or",
        "logical_not",
        "abs",
        "neg",
        "sign",
        "relu",
        "relu_",
        "threshold",
        "hardtanh",
        "bitwise_and",
        "bitwise_or",
        "bitwise_xor",
        "bitwise_left_shift",
        "__rshift__",
        "__lshift__",
        "bitwise_right_shift",
        "constant_pad_nd",
        "pad",
        "reflection_pad2d",
        "replicate_pad2d",
        "index",
        "index_put",
        "index_put_",
        "roll",
        "flip",
        "repeat",
        "im2col",
        "col2im",
        "max_pool2d_with_indices",
        "grid_sampler_2d",
        "upsample_nearest2d",
        "upsample_bilinear2d",
        "_local_scalar_dense",
        "_unsafe_index",
        "isfinite",
        "isnan",
        "any",
        "all",
        "nonzero",
        "one_hot",
        "_assert_async",
        "item",
        "diagonal",
        "tril",
        "triu",
        "block_diag",
        "embedding",
        "promote_types",
        "result_type",
        "floor",
        "ceil",
        "round",
        "trunc",
    ]
    if hasattr(aten, n)
}


def _extra_rules() -> dict[Any, Callable[[tuple[Any, ...], Any], tuple[int, int, int]]]:
    rules: dict[Any, Callable[[tuple[Any, ...], Any], tuple[int, int, int]]] = {}
    ev_ops = getattr(torch.ops, "ev_compress", None)
    if ev_ops is not None and hasattr(ev_ops, "code_matmul"):
        rules[ev_ops.code_matmul] = _code_matmul
    tv_ops = getattr(torch.ops, "torchvision", None)
    with contextlib.suppress(AttributeError, RuntimeError):  # torchvision ops not loaded
        rules[tv_ops.deform_conv2d] = _deform_conv  # type: ignore[union-attr]
    return rules


class _Counter(TorchDispatchMode):
    def __init__(self, stack: list[str], rows: dict[str, LayerEnergy]) -> None:
        super().__init__()
        self.stack, self.rows = stack, rows
        self.uncounted: dict[str, int] = {}
        self.rules = {**_RULES, **_extra_rules()}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        rule = self.rules.get(packet)
        if rule is None:
            if packet not in _FREE:
                name = str(packet).removeprefix("aten.")
                self.uncounted[name] = self.uncounted.get(name, 0) + 1
            return out
        mul, add, other = rule(args, out)
        row = self.rows[self.stack[-1]]
        row.mul += mul
        row.add += add
        row.other += other
        return out


@torch.no_grad()
def count_energy(
    model: nn.Module,
    example_input: Any,
    mul_pj: float = MUL_PJ,
    add_pj: float = ADD_PJ,
    warmup: bool = True,
) -> EnergyReport:
    """Count multiplications/additions of ``model(example_input)`` and price them.

    Args:
        model: any module (put it in the mode you want counted, usually ``eval()``).
        example_input: a tensor, or a tuple of positional arguments.
        mul_pj, add_pj: energy per multiplication/addition (default 45 nm fp32: 3.7 / 0.9 pJ).
        warmup: run one uncounted forward first, so that one-off work (kernel autotuning such
            as ev-core's DTM path choice, lazy initialisation) is not counted.

    Returns:
        :class:`EnergyReport` for the whole input batch (divide by the batch size for per-image
        figures).
    """
    import ev_compress.ecoformer.functional  # noqa: F401  (registers ev_compress::code_matmul)

    names = {id(m): n for n, m in model.named_modules()}
    rows: dict[str, LayerEnergy] = {}
    stack: list[str] = [""]
    rows[""] = LayerEnergy("", type(model).__name__)

    def pre(mod: nn.Module, _args: Any) -> None:
        name = names.get(id(mod), type(mod).__name__)
        if name not in rows:
            rows[name] = LayerEnergy(name, type(mod).__name__)
        stack.append(name)

    def post(mod: nn.Module, _args: Any, _out: Any) -> None:
        if len(stack) > 1:
            stack.pop()

    handles = []
    for _, m in model.named_modules():
        if m is model:
            continue
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if warmup:
        model(*args)
    counter = _Counter(stack, rows)
    try:
        with counter:
            model(*args)
    finally:
        for h in handles:
            h.remove()
    layers = list(rows.values())
    return EnergyReport(
        mul=sum(r.mul for r in layers),
        add=sum(r.add for r in layers),
        other=sum(r.other for r in layers),
        layers=layers,
        uncounted=counter.uncounted,
        mul_pj=mul_pj,
        add_pj=add_pj,
    )
