"""Patch embedding and the generic LIT-family transformer block.

* :class:`PatchEmbed` -- ``p×p`` stride-``p`` conv + LayerNorm, images → tokens ``[B, N, C]``;
  optionally pads right/bottom to a multiple of ``p`` (LITv2 at arbitrary sizes).
* :class:`LITBlock` -- pre-norm residual block ``x + DropPath(attn(norm1(x)))`` (when it has an
  attention) then ``x + DropPath(mlp(norm2(x)))``; LIT/LITv2 stages 1–2 have no attention (the
  deformable token merging is their only token mixing).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_module
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ev_core.layers.onednn import plain_modules

__all__ = ["LITBlock", "PatchEmbed"]


@register_notrace_module  # input-size checks and padding: an FX leaf
class PatchEmbed(nn.Module):
    """Image → patch tokens: ``proj`` (Conv2d, kernel = stride = ``patch_size``) and ``norm``.

    Args:
        patch_size: patch side ``p``.
        in_chans: image channels.
        embed_dim: token channels.
        norm_layer: normalisation on the tokens (``None`` for none).
        pad: zero-pad images whose sides are not multiples of ``p`` (else raise).
        img_size: the only image size accepted (resolution-locked models), or ``None``.
        model: the model's name for the error message of a locked size.
    """

    def __init__(
        self,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Callable[[int], nn.Module] | None = nn.LayerNorm,
        pad: bool = False,
        img_size: tuple[int, int] | None = None,
        model: str = "this model",
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.pad = pad
        self.locked_size: tuple[int, int] = img_size if img_size is not None else (0, 0)
        self.model = model
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Args:
            x: ``[B, C_in, H, W]`` images.

        Returns:
            ``([B, (H/p)·(W/p), C], (H/p, W/p))`` (sides rounded up when padding).
        """
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {x.shape}")
        p = self.patch_size
        H, W = x.shape[-2], x.shape[-1]
        locked = self.locked_size
        if locked[0] > 0 and (locked[0] != H or locked[1] != W):
            raise ValueError(
                f"{self.model} is resolution-locked: built for {locked[0]}x{locked[1]}, got "
                f"{H}x{W} images (create the model with img_size=...)"
            )
        if H % p != 0 or W % p != 0:
            if not self.pad:
                raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
            x = F.pad(x, [0, (-W) % p, 0, (-H) % p])
        if not torch.jit.is_scripting() and self._compile_gemm():
            x, (h, w) = self._proj_gemm(x)
            return self.norm(x), (h, w)
        x = self.proj(x)
        B, C, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        x = x.permute(0, 2, 3, 1).reshape(B, h * w, C)  # free for channels-last inputs
        return self.norm(x), (h, w)

    @torch.jit.unused
    def _compile_gemm(self) -> bool:
        return torch.compiler.is_compiling() and plain_modules(self.proj)

    def _proj_gemm(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``proj`` as one GEMM over the ``p×p`` patches (equal to the strided conv to float
        rounding), used under ``torch.compile``: the graph then holds no ``aten.convolution``,
        whose fake-tensor memory-format rule guards on ``batch >= 2`` (batch 1 would
        recompile a dynamic-batch graph).

        ``[B, C_in, H, W]`` (sides divisible by ``p``) → ``([B, h·w, C], (h, w))``.
        """
        B, c, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        p = self.patch_size
        h, w = H // p, W // p
        patches = x.reshape(B, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, -1)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # [C, c·p·p]
        return F.linear(patches, weight, self.proj.bias), (h, w)


class LITBlock(nn.Module):
    """Pre-norm block with an optional attention: official names ``norm1``, ``attn``,
    ``norm2``, ``mlp``.

    Args:
        dim: channels.
        mlp: feed-forward module with ``forward(x, hw)``.
        attn: attention module with ``forward(x, hw)``, or ``None`` (MLP-only block).
        norm_layer: normalisation constructor.
        drop_path: stochastic-depth rate.
    """

    def __init__(
        self,
        dim: int,
        mlp: nn.Module,
        attn: nn.Module | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1: nn.Module = norm_layer(dim) if attn is not None else nn.Identity()
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp
        self.grad_checkpointing = False

    def forward(self, x: Tensor, hw: tuple[int, int] | None) -> Tensor:
        """The block; with ``grad_checkpointing`` (training with gradients, eager) its
        activations are recomputed in the backward pass instead of being kept."""
        if torch.jit.is_scripting():
            return self.forward_block(x, hw)
        else:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                out: Tensor = checkpoint(self.forward_block, x, hw, use_reentrant=False)
                return out
            return self.forward_block(x, hw)

    def forward_block(self, x: Tensor, hw: tuple[int, int] | None) -> Tensor:
        """Args:
            x: ``[B, N, C]``.
            hw: ``(H, W)`` of the token map (``None`` for token sets without one, e.g. with a
                cls token; only global attention and plain MLPs accept that).

        Returns:
            ``[B, N, C]``.
        """
        if self.attn is not None:
            x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))
