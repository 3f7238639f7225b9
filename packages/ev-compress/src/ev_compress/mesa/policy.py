"""Which ops of which modules Mesa compresses, and how."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

__all__ = ["OP_KINDS", "MesaPolicy"]

#: Op kinds Mesa can compress, with what each saves for backward in 8 bits.
OP_KINDS: dict[str, str] = {
    "linear": "input (F.linear, nn.Linear)",
    "conv": "input (F.conv1d/2d/3d, nn.Conv*d)",
    "layer_norm": "input + fp32 mean/rstd (F.layer_norm, nn.LayerNorm and subclasses)",
    "batch_norm": "input + fp32 mean/invstd (F.batch_norm, nn.BatchNorm*d)",
    "gelu": "input (F.gelu, nn.GELU)",
    "silu": "input (F.silu, nn.SiLU)",
    "relu": "1-bit mask (F.relu, torch.relu, Tensor.relu, nn.ReLU)",
    "softmax": "output (F.softmax, torch.softmax, Tensor.softmax, nn.Softmax)",
    "matmul": "both operands (torch.matmul, @, torch.bmm)",
    "sdpa": "q, k, v; backward recomputes attention (F.scaled_dot_product_attention)",
}


@dataclass
class MesaPolicy:
    """What :func:`ev_compress.mesa.convert` compresses.

    Ops are attributed to the innermost module whose ``forward`` runs them (an ``nn.Linear``
    owns its ``F.linear``; a timm ``Attention`` owns its ``F.scaled_dot_product_attention``),
    and ``include``/``exclude`` are ``fnmatch`` patterns over those modules' qualified names
    (``""`` is the root).

    Attributes:
        ops: op kinds to compress (keys of :data:`OP_KINDS`); default all.
        include: module-name patterns whose ops are compressed (default all).
        exclude: module-name patterns left in full precision (wins over ``include``), e.g.
            ``("patch_embed*",)`` keeps the patch-embedding conv exact like the Mesa DeiT demo.
        bits: code width (8 = Mesa; fewer bits keep one byte per value but coarser codes).
        channel_groups: groups of the channel layouts (linear/conv/norm/activation inputs).
        head_groups: head groups of attention tensors; ``None`` = one group per head.
        momentum: ``λ`` of the running range/minimum estimates (first batch initialises).
        stochastic_rounding: unbiased stochastic rounding (``False``: round to nearest).
        reuse: quantise a tensor once when several ops save it (softmax output → ``attn @ v``).
        seed: seed of Mesa's own random generator (``None``: ``torch.initial_seed()``); Mesa
            never draws from the global generators, so dropout masks are unchanged.
    """

    ops: tuple[str, ...] = tuple(OP_KINDS)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    bits: int = 8
    channel_groups: int = 8
    head_groups: int | None = None
    momentum: float = 0.9
    stochastic_rounding: bool = True
    reuse: bool = True
    seed: int | None = None
    _ops: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops)
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        unknown = sorted(set(self.ops) - set(OP_KINDS))
        if unknown:
            raise ValueError(f"unknown op kinds {unknown}; known: {sorted(OP_KINDS)}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if self.channel_groups < 1:
            raise ValueError(f"channel_groups must be >= 1, got {self.channel_groups}")
        if self.head_groups is not None and self.head_groups < 1:
            raise ValueError(f"head_groups must be >= 1 or None, got {self.head_groups}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        self._ops = frozenset(self.ops)

    def ops_for(self, module_name: str) -> frozenset[str]:
        """Op kinds compressed inside the module called ``module_name`` (empty if excluded)."""
        if any(fnmatch.fnmatchcase(module_name, p) for p in self.exclude):
            return frozenset()
        if not any(fnmatch.fnmatchcase(module_name, p) for p in self.include):
            return frozenset()
        return self._ops

    def to_dict(self) -> dict[str, object]:
        """JSON-able fields (for run configs)."""
        return {
            "ops": list(self.ops),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "bits": self.bits,
            "channel_groups": self.channel_groups,
            "head_groups": self.head_groups,
            "momentum": self.momentum,
            "stochastic_rounding": self.stochastic_rounding,
            "reuse": self.reuse,
            "seed": self.seed,
        }
