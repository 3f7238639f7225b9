"""What a converted model saved for backward: compressed slots, what stayed in full precision,
and a meter of saved-for-backward bytes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FullPrecisionRecord", "SavedTensorMeter", "SlotRecord", "param_derived"]


@dataclass
class SlotRecord:
    """One compressed tensor of one intercepted call (as last seen).

    Attributes:
        module: qualified name of the owning module.
        kind: op kind (``"linear"``, ``"sdpa"``, ...).
        slot: ``kind`` + call index inside the module's forward.
        operand: role of the tensor (``"input"``, ``"q"``, ``"saved0"``, ...).
        shape: tensor shape.
        dtype: tensor dtype.
        groups: quantisation groups.
        original_bytes: bytes of the tensor in its dtype.
        quantised_bytes: bytes of its codes plus per-group parameters (0 when rebuilt).
        rebuilt: ``""``, or how backward rebuilds the tensor from the codes of the op that
            produced it (``"gelu:none"``: a GELU output, from the GELU's input codes).
    """

    module: str
    kind: str
    slot: str
    operand: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    groups: int
    original_bytes: int
    quantised_bytes: int
    rebuilt: str = ""


@dataclass
class FullPrecisionRecord:
    """A tensor autograd kept in full precision in a converted model's training forward.

    Attributes:
        module: qualified name of the module running the op.
        op: the op (function name; ``"autograd.Function"`` for custom functions).
        shape: tensor shape.
        dtype: tensor dtype.
        nbytes: its bytes (per step: saved once per training forward).
        reason: why it was not compressed.
    """

    module: str
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    reason: str


_VIEW_LIKE = frozenset(
    {
        "ToCopyBackward0",
        "TBackward0",
        "ViewBackward0",
        "PermuteBackward0",
        "TransposeBackward0",
        "ExpandBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "ReshapeAliasBackward0",
        "UnsafeViewBackward0",
        "AliasBackward0",
    }
)


def param_derived(t: Tensor, storages: set[int]) -> bool:
    """Whether ``t`` is a parameter/buffer (by storage) or a cast/view of a parameter (autocast's
    bf16 weight copy, ``weight.t()``): kept for backward anyway or a copy of a parameter,
    never an activation."""
    fn = t.grad_fn
    for _ in range(4):
        if fn is None:
            return False
        name = type(fn).__name__
        if name == "AccumulateGrad":
            variable = getattr(fn, "variable", None)
            return variable is not None and variable.untyped_storage().data_ptr() in storages
        if name not in _VIEW_LIKE or not fn.next_functions:
            return False
        fn = fn.next_functions[0][0]
    return False


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward inside a ``with`` block.

    Tensors are de-duplicated by storage (views of one tensor count once); storages of the
    ``exclude`` tensors (typically the model's parameters, kept anyway by the model, also when
    an op saves a view such as ``weight.t()``) are not counted. With ``activations_only``,
    casts of those tensors (autocast's bf16 weight copies, held for backward but not
    activations) are counted apart, in :attr:`param_cast_bytes`, not in :attr:`total_bytes`.

    Args:
        exclude: tensors whose storages are not counted (e.g. ``model.parameters()``).
        activations_only: count parameter casts apart.

    Attributes:
        total_bytes: bytes of the distinct storages saved so far.
        by_dtype: the same split by dtype.
        param_cast_bytes: bytes of parameter casts (``activations_only``).
    """

    def __init__(self, exclude: Iterable[Tensor] = (), *, activations_only: bool = False) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._activations_only = activations_only
        self._storages: dict[int, tuple[int, torch.dtype]] = {}
        self._casts: dict[int, int] = {}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self._exclude:
            return t
        if self._activations_only and param_derived(t, self._exclude):
            self._casts[ptr] = storage.nbytes()
        else:
            self._storages[ptr] = (storage.nbytes(), t.dtype)
        return t

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    @property
    def total_bytes(self) -> int:
        return sum(n for n, _ in self._storages.values())

    @property
    def param_cast_bytes(self) -> int:
        return sum(self._casts.values())

    @property
    def by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, dtype in self._storages.values():
            key = str(dtype).replace("torch.", "")
            out[key] = out.get(key, 0) + n
        return out

    def __enter__(self) -> SavedTensorMeter:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
