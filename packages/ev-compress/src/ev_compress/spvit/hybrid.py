"""The exported SPViT model: plain inference modules, no gates and no search code.

An exported model is the original timm / ev model in which, block by block,

* ``"attention"`` keeps the original MSA,
* ``"conv3x3"`` / ``"conv1x1"`` replace it by a :class:`ConvBottleneck`
  (``Conv2d(C→d) → ReLU → Linear(d→C)``, batch norm folded into the conv by default),
* ``"skip"`` removes the attention and its norm (:class:`MlpOnlyBlock`, or an LITv2 block
  without attention),
* the FFN keeps only its selected hidden units (``fc1`` rows, ``fc2`` columns, LITv2's
  depth-wise conv channels).

Its architecture is a JSON-able dict (:func:`apply_arch` rebuilds it on a freshly created
model), saved beside the safetensors weights by :func:`save_exported` and read back by
:func:`load_exported`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ev_core.errors import EvError

__all__ = [
    "ARCH_FORMAT",
    "BLOCK_CHOICES",
    "ConvBottleneck",
    "MlpOnlyBlock",
    "SPViTArchError",
    "TokenLayout",
    "apply_arch",
    "block_family",
    "find_blocks",
    "load_exported",
    "on_token_map",
    "resize_ffn",
    "save_exported",
]

ARCH_FORMAT = "ev-spvit-hybrid/1"
BLOCK_CHOICES: tuple[str, ...] = ("skip", "conv1x1", "conv3x3", "attention")
"""Per-block choices, in the order of the cumulative gates (index = number of gates on)."""


class SPViTArchError(EvError):
    """An exported SPViT file or architecture config that cannot be used."""


@dataclass
class TokenLayout:
    """How an attention's input tokens form a 2-D map for the convolution.

    Attributes:
        kind: ``"vit"`` (``[B, P + H·W, C]``, prefix tokens pass through), ``"swin"``
            (``[B·nW, wh·ww, C]`` windows, each convolved with zero padding) or ``"lit"``
            (``[B, H·W, C]`` with ``hw`` passed to forward).
        num_prefix_tokens: cls/register tokens in front (``"vit"``).
        grid: nominal patch grid ``(H, W)`` (``"vit"``; square grids are inferred otherwise).
        window: window ``(wh, ww)`` (``"swin"``).
    """

    kind: str
    num_prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    window: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_prefix_tokens": self.num_prefix_tokens,
            "grid": list(self.grid) if self.grid else None,
            "window": list(self.window) if self.window else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenLayout:
        return cls(
            kind=str(d["kind"]),
            num_prefix_tokens=int(d.get("num_prefix_tokens", 0)),
            grid=(int(d["grid"][0]), int(d["grid"][1])) if d.get("grid") else None,
            window=(int(d["window"][0]), int(d["window"][1])) if d.get("window") else None,
        )


def _vit_grid(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None and grid[0] * grid[1] == n:
        return grid
    side = round(n**0.5)
    if side * side != n:
        raise ValueError(f"{n} patch tokens do not form the {grid} grid or a square one")
    return side, side


def on_token_map(
    x: Tensor,
    layout: TokenLayout,
    fn: Callable[[Tensor], Tensor],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Apply ``fn`` (``[B, H, W, C] → [B, H, W, C]``) to the 2-D map formed by the tokens.

    Prefix tokens (``"vit"``) are passed through unchanged: they bypass the convolution.

    Args:
        x: tokens ``[B, N, C]``.
        layout: the token layout.
        fn: the map function.
        args, kwargs: the attention's remaining forward arguments (``hw`` for ``"lit"``).

    Returns:
        ``[B, N, C]``.
    """
    B, N, C = x.shape
    if layout.kind == "vit":
        P = layout.num_prefix_tokens
        H, W = _vit_grid(N - P, layout.grid)
        out = fn(x[:, P:].reshape(B, H, W, C)).reshape(B, H * W, -1)
        return torch.cat((x[:, :P], out), dim=1) if P else out
    if layout.kind == "swin":
        if layout.window is None or layout.window[0] * layout.window[1] != N:
            raise ValueError(f"{N} tokens per window do not match the window {layout.window}")
        return fn(x.reshape(B, layout.window[0], layout.window[1], C)).reshape(B, N, -1)
    if layout.kind == "lit":
        hw = args[0] if args else (kwargs or {}).get("hw")
        if hw is None or hw[0] * hw[1] != N:
            raise ValueError(f"{N} tokens do not match the map size hw={hw}")
        return fn(x.reshape(B, hw[0], hw[1], C)).reshape(B, N, -1)
    raise ValueError(f"unknown token layout {layout.kind!r}")


class ConvBottleneck(nn.Module):
    """Drop-in replacement for an attention: ``k×k conv (C→d) → [BN] → ReLU → Linear(d→C)``.

    ``forward(x, *args, **kwargs)`` accepts the replaced attention's arguments (masks are
    ignored; ``hw`` is used by the ``"lit"`` layout).

    Args:
        dim: channels ``C``.
        mid: bottleneck width ``d`` (the MSA's head dim).
        kernel_size: 1 or 3.
        layout: how tokens form the map (:class:`TokenLayout`).
        batch_norm: keep a BatchNorm2d after the conv (``False``: folded into the conv).
    """

    def __init__(
        self, dim: int, mid: int, kernel_size: int, layout: TokenLayout, batch_norm: bool = False
    ) -> None:
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")
        self.layout = layout
        self.conv = nn.Conv2d(dim, mid, kernel_size, padding=kernel_size // 2, bias=True)
        self.bn = nn.BatchNorm2d(mid) if batch_norm else nn.Identity()
        self.act = nn.ReLU()
        self.proj = nn.Linear(mid, dim)

    def _map(self, x: Tensor) -> Tensor:
        z = self.act(self.bn(self.conv(x.permute(0, 3, 1, 2))))
        return self.proj(z.permute(0, 2, 3, 1))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``[B, N, C] → [B, N, C]`` (see :func:`on_token_map`)."""
        return on_token_map(x, self.layout, self._map, args, kwargs)

    def extra_repr(self) -> str:
        return f"layout={self.layout.kind}"


class MlpOnlyBlock(nn.Module):
    """A timm ViT / Swin block whose attention was removed: ``x + ls2(mlp(norm2(x)))``.

    Keeps the block's state-dict names (``norm2``, ``mlp``, ``ls2``).

    Args:
        norm2, mlp, ls2, drop_path2: the block's modules.
        channels_last_map: input is ``[B, H, W, C]`` (Swin) instead of ``[B, N, C]``.
    """

    def __init__(
        self,
        norm2: nn.Module,
        mlp: nn.Module,
        ls2: nn.Module,
        drop_path2: nn.Module,
        channels_last_map: bool = False,
    ) -> None:
        super().__init__()
        self.norm2 = norm2
        self.mlp = mlp
        self.ls2 = ls2
        self.drop_path2 = drop_path2
        self.channels_last_map = channels_last_map

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.channels_last_map:
            B, H, W, C = x.shape
            t = x.reshape(B, H * W, C)
            return (t + self.drop_path2(self.ls2(self.mlp(self.norm2(t))))).reshape(B, H, W, C)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def block_family(block: nn.Module) -> str | None:
    """``"vit"`` (timm ViT/DeiT block), ``"swin"`` (timm Swin block), ``"lit"`` (ev LITv2
    block) or ``None``."""
    from timm.layers import Attention
    from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
    from timm.models.vision_transformer import Block

    if isinstance(block, Block) and isinstance(block.attn, Attention):
        return "vit"
    if isinstance(block, SwinTransformerBlock) and isinstance(block.attn, WindowAttention):
        return "swin"
    try:
        from ev_core.layers.embed import LITBlock
        from ev_core.layers.hilo import HiLo
        from ev_core.layers.mlp import ConvFFN
    except ImportError:  # pragma: no cover - ev-core always ships them
        return None
    if (
        isinstance(block, LITBlock)
        and isinstance(block.mlp, ConvFFN)
        and (block.attn is None or isinstance(block.attn, HiLo))
    ):
        return "lit"
    return None


def find_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(name, block, family)`` of every supported transformer block, in module order."""
    for name, module in model.named_modules():
        family = block_family(module)
        if family is not None:
            yield name, module, family


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _linear_like(src: nn.Linear, out_idx: Tensor | None, in_idx: Tensor | None) -> nn.Linear:
    w = src.weight
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0], bias=src.bias is not None)
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if src.bias is not None and new.bias is not None:
            new.bias.copy_(src.bias if out_idx is None else src.bias[out_idx])
    return new


def resize_ffn(mlp: Any, keep: Tensor) -> nn.Module:
    """A copy of a timm ``Mlp`` / ev ``ConvFFN`` keeping only the hidden units ``keep``.

    Args:
        mlp: the feed-forward module (``fc1``, optional ``dwconv.dwconv``, ``fc2``).
        keep: 1-D long tensor of hidden-unit indices to keep.

    Returns:
        The smaller module (same class, same names).
    """
    new = copy.deepcopy(mlp)
    keep = keep.to(device=mlp.fc1.weight.device, dtype=torch.long)
    new.fc1 = _linear_like(mlp.fc1, keep, None)
    new.fc2 = _linear_like(mlp.fc2, None, keep)
    dw = getattr(getattr(mlp, "dwconv", None), "dwconv", None)
    if dw is not None:
        k = int(keep.numel())
        conv = nn.Conv2d(k, k, 3, padding=1, groups=k, bias=dw.bias is not None)
        conv = conv.to(device=dw.weight.device, dtype=dw.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(dw.weight[keep])
            if dw.bias is not None and conv.bias is not None:
                conv.bias.copy_(dw.bias[keep])
        new.dwconv.dwconv = conv
    return new


def _drop_attention(model: nn.Module, name: str, block: Any, family: str) -> None:
    if family == "lit":
        block.attn = None
        block.norm1 = None
        return
    ls2 = getattr(block, "ls2", nn.Identity())
    _set_child(
        model,
        name,
        MlpOnlyBlock(block.norm2, block.mlp, ls2, block.drop_path2, family == "swin"),
    )


def apply_arch(model: nn.Module, arch: Mapping[str, Any]) -> nn.Module:
    """Turn a freshly created model into the exported hybrid described by ``arch`` (in place).

    Weights are not set (load the exported state dict afterwards).

    Raises:
        SPViTArchError: if the blocks of ``model`` do not match ``arch``.
    """
    blocks: dict[str, tuple[Any, str]] = {name: (b, fam) for name, b, fam in find_blocks(model)}
    for entry in arch.get("blocks", []):
        name = entry["name"]
        if name not in blocks:
            raise SPViTArchError(f"the architecture names block {name!r}, the model has none")
        block, family = blocks[name]
        if family != entry["family"]:
            raise SPViTArchError(
                f"block {name!r} is {family}, the architecture says {entry['family']}"
            )
        hidden = int(entry["ffn_hidden"])
        block.mlp = resize_ffn(block.mlp, torch.arange(hidden))
        choice = entry["choice"]
        if choice is None:  # a block without attention (LITv2 stages 1-2)
            continue
        if choice not in BLOCK_CHOICES:
            raise SPViTArchError(f"block {name!r}: unknown choice {choice!r}")
        if choice in ("conv1x1", "conv3x3"):
            layout = TokenLayout.from_dict(entry["layout"])
            block.attn = ConvBottleneck(
                int(entry["dim"]),
                int(entry["mid"]),
                3 if choice == "conv3x3" else 1,
                layout,
                batch_norm=not bool(arch.get("bn_folded", True)),
            )
        elif choice == "skip":
            _drop_attention(model, name, block, family)
    return model


def save_exported(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save an exported model: ``path`` (safetensors weights) + ``path`` with ``.json``
    (the architecture, under ``"config"``).

    Raises:
        SPViTArchError: if ``model`` is not an exported SPViT model.
    """
    from ev_core.checkpoint import save_checkpoint

    arch = getattr(model, "spvit_arch", None)
    if not isinstance(arch, dict):
        raise SPViTArchError("the model is not an exported SPViT model (no spvit_arch)", path=path)
    if Path(path).suffix != ".safetensors":
        raise SPViTArchError("the exported model must be saved as a .safetensors file", path=path)
    return save_checkpoint(path, model.state_dict(), config=arch, metadata={"format": ARCH_FORMAT})


def load_exported(path: str | os.PathLike[str], map_location: str = "cpu") -> nn.Module:
    """Load a model written by :func:`save_exported` (no search code involved).

    Args:
        path: the ``.safetensors`` file (its ``.json`` must sit beside it).
        map_location: device of the loaded weights.

    Returns:
        The hybrid model in eval mode, with its architecture as ``model.spvit_arch``.

    Raises:
        SPViTArchError: missing/invalid files or weights that do not fit the architecture.
    """
    import timm

    import ev_core  # noqa: F401  (registers the ev models with timm)
    from ev_core.checkpoint import config_path_for, load_checkpoint

    p = Path(path)
    if not p.is_file():
        raise SPViTArchError("no exported SPViT model here", path=p)
    try:
        state, info = load_checkpoint(p, map_location=map_location)
    except Exception as exc:
        raise SPViTArchError(f"cannot read the weights: {exc}", path=p) from exc
    arch = info.get("config")
    if not isinstance(arch, dict) or arch.get("format") != ARCH_FORMAT:
        raise SPViTArchError(
            f"{config_path_for(p)} does not hold an SPViT architecture (format {ARCH_FORMAT})",
            path=p,
        )
    try:
        model = timm.create_model(arch["model_name"], pretrained=False, **arch["model_kwargs"])
        apply_arch(model, arch)
        model.load_state_dict(state, strict=True)
    except SPViTArchError as exc:
        raise SPViTArchError(str(exc), path=p) from exc
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SPViTArchError(f"weights do not fit the saved architecture: {exc}", path=p) from exc
    model.spvit_arch = arch  # type: ignore[assignment]
    return model.to(map_location).eval()
