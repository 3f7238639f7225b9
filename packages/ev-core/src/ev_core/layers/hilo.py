"""HiLo attention (LITv2), exactly as the official layer, with attention through SDPA.

The ``h`` heads are split: ``h_lo = int(h·alpha)`` Lo-Fi heads and ``h_hi = h − h_lo`` Hi-Fi heads
(head dim ``d = C/h``, ``D_lo = h_lo·d``, ``D_hi = h_hi·d``).

* **Hi-Fi**: ``h_qkv`` (``C → 3·D_hi``), attention inside non-overlapping ``s×s`` windows,
  ``h_proj`` (``D_hi → D_hi``).
* **Lo-Fi**: queries ``l_q`` (``C → D_lo``) at every token; keys/values ``l_kv``
  (``C → 2·D_lo``) from the **block input average-pooled** ``s×s`` (before projection);
  global attention of every token over the ``N/s²`` pooled tokens; ``l_proj`` (``D_lo → D_lo``).
* Output ``concat([Hi-Fi, Lo-Fi])`` (Hi-Fi channels first): no shared output projection.
* ``window_size == 1``: every head is Lo-Fi and nothing is pooled -- plain global MSA under the
  Lo-Fi parameter names (LITv2 stage 4).
* Maps whose sides do not divide by ``s`` are zero-padded right/bottom (the official
  detection/segmentation backbone): the pad tokens are keys/values of their Hi-Fi windows and
  their zeros enter the Lo-Fi average pool; outputs are cropped back.

Both branches attend through :func:`ev_core.layers.attention.attention` with the backend
settled at construction (``backend=``; SDPA by default), except that with the default
(``"auto"``) backend the Hi-Fi windows of at most 16 tokens attend by explicit maths on the CPU
(measured faster than SDPA's flash kernel for such tiny problems).
"""

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn

from ev_core.layers.attention import attention, resolve_backend, settle_backend
from ev_core.layers.onednn import fusable, linear_act

__all__ = ["HiLo", "hilo_macs"]


def _split_heads(dim: int, num_heads: int, window_size: int, alpha: float) -> tuple[int, int]:
    """``(h_lo, h_hi)`` of a HiLo layer (``window_size == 1``: all heads Lo-Fi)."""
    if dim % num_heads != 0:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if window_size == 1:
        return num_heads, 0
    h_lo = int(num_heads * alpha)
    return h_lo, num_heads - h_lo


def hilo_macs(
    dim: int, num_heads: int, hw: tuple[int, int], window_size: int = 2, alpha: float = 0.5
) -> int:
    """Multiply-accumulates of one HiLo forward (per image), the LITv2 paper's formula.

    With ``Np`` the padded token count and ``s`` the window size::

        Hi-Fi = Np·C·3D_hi + (Np/s²)·s⁴·2D_hi + Np·D_hi²
        Lo-Fi = Np·C·D_lo + (Np/s²)·C·2D_lo + 2·Np·(Np/s²)·D_lo + Np·D_lo²

    (``window_size == 1``: no pooling, ``Np/s² = Np``). Pooling and softmax are not counted.

    Args:
        dim: channels ``C``.
        num_heads: heads ``h``.
        hw: ``(H, W)`` of the map (before padding).
        window_size: ``s``.
        alpha: Lo-Fi head fraction.

    Returns:
        MACs as an integer.
    """
    h_lo, h_hi = _split_heads(dim, num_heads, window_size, alpha)
    d = dim // num_heads
    d_lo, d_hi = h_lo * d, h_hi * d
    s = window_size
    H, W = hw
    Hp, Wp = -(-H // s) * s, -(-W // s) * s
    n = Hp * Wp
    groups = n // (s * s)
    hifi = 0
    if h_hi > 0:
        hifi = n * dim * 3 * d_hi + groups * s**4 * 2 * d_hi + n * d_hi * d_hi
    lofi = 0
    if h_lo > 0:
        lofi = n * dim * d_lo + groups * dim * 2 * d_lo + 2 * n * groups * d_lo + n * d_lo * d_lo
    return hifi + lofi


@register_notrace_module  # shape checks and padding: an FX leaf
class HiLo(nn.Module):
    """HiLo attention; ``forward(x: [B, N, C], hw) -> [B, N, C]``.

    (The branch calls carry ``type: ignore``: TorchScript cannot narrow optional submodules
    with asserts; the ``is None`` checks in :meth:`forward` guard them.)

    Parameter names match the official checkpoints: ``h_qkv``, ``h_proj`` (only when there are
    Hi-Fi heads), ``l_q``, ``l_kv``, ``l_proj`` (only when there are Lo-Fi heads).

    Args:
        dim: channels ``C``.
        num_heads: total heads ``h``.
        qkv_bias: bias on ``h_qkv``, ``l_q`` and ``l_kv``.
        qk_scale: logit scale override (default ``d ** -0.5``).
        attn_drop: attention dropout (the official layer ignores it; kept for signature
            compatibility and applied nowhere, matching it).
        proj_drop: unused by the official layer as well (kept for signature compatibility).
        window_size: Hi-Fi window / Lo-Fi pooling size ``s``; 1 = plain MSA.
        alpha: fraction of Lo-Fi heads (``h_lo = int(h·alpha)``).
        backend: attention backend (:func:`~ev_core.layers.attention.settle_backend`), settled
            at construction.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        window_size: int = 2,
        alpha: float = 0.5,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads if num_heads > 0 else 0
        self.l_heads, self.h_heads = _split_heads(dim, num_heads, window_size, alpha)
        self.l_dim = self.l_heads * self.head_dim
        self.h_dim = self.h_heads * self.head_dim
        self.ws = window_size
        self.alpha = alpha
        self.scale: float = qk_scale if qk_scale else self.head_dim**-0.5
        self.backend: str = settle_backend(backend)
        # default backend: the Hi-Fi windows (s² <= 16 tokens) attend by explicit maths on the
        # CPU, where SDPA's flash kernel is slower for such tiny problems (3x in bf16 for 2x2
        # windows; BENCHMARKS.md, issue 16)
        self.hifi_math: bool = resolve_backend(backend) == "auto" and window_size**2 <= 16
        # absent branches are None (not in the state dict; TorchScript prunes their code)
        self.l_q: nn.Linear | None = None
        self.l_kv: nn.Linear | None = None
        self.l_proj: nn.Linear | None = None
        self.h_qkv: nn.Linear | None = None
        self.h_proj: nn.Linear | None = None
        if self.l_heads > 0:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads > 0:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    @torch.jit.unused
    def _fusable(self, x: Tensor) -> bool:
        linears = [self.l_q, self.l_kv, self.l_proj, self.h_qkv, self.h_proj]
        return fusable(x, *[m for m in linears if m is not None])

    def _hifi(self, x: Tensor, fused: bool) -> Tensor:
        """Window attention. ``x: [B, H, W, C]`` (sides divisible by ``s``) → ``[B, H, W, D_hi]``."""
        B, H, W = x.shape[0], x.shape[1], x.shape[2]
        s, h, d = self.ws, self.h_heads, self.head_dim
        gh, gw = H // s, W // s
        qkv = (
            linear_act(x, self.h_qkv.weight, self.h_qkv.bias)  # type: ignore[union-attr]
            if fused
            else self.h_qkv(x)  # type: ignore[misc]
        )  # per-token projection first: 3·D_hi channels are permuted, not C
        qkv = qkv.reshape(B, gh, s, gw, s, 3, h, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
        qkv = qkv.reshape(3, B * gh * gw, h, s * s, d)
        backend = "math" if self.hifi_math and x.device.type == "cpu" else self.backend
        out = attention(qkv[0], qkv[1], qkv[2], None, self.scale, 0.0, backend)
        out = out.reshape(B, gh, gw, h, s, s, d).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(B, H, W, self.h_dim)
        return (
            linear_act(out, self.h_proj.weight, self.h_proj.bias)  # type: ignore[union-attr]
            if fused
            else self.h_proj(out)  # type: ignore[misc]
        )

    def _lofi(self, x: Tensor, fused: bool) -> Tensor:
        """Attention to pooled tokens. ``x: [B, H, W, C]`` → ``[B, H, W, D_lo]``."""
        B, H, W = x.shape[0], x.shape[1], x.shape[2]
        s, h, d = self.ws, self.l_heads, self.head_dim
        q = (
            linear_act(x, self.l_q.weight, self.l_q.bias)  # type: ignore[union-attr]
            if fused
            else self.l_q(x)  # type: ignore[misc]
        )
        q = q.reshape(B, H * W, h, d).transpose(1, 2)
        pooled = x
        if s > 1:  # s×s average pool on a channels-last view (no layout copy in or out)
            pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
        kv = (
            linear_act(pooled, self.l_kv.weight, self.l_kv.bias)  # type: ignore[union-attr]
            if fused
            else self.l_kv(pooled)  # type: ignore[misc]
        )
        # k and v as slices (not a reshape to [..., 2, h, d] + select: with a dynamic batch,
        # inductor's view of that select guards on batch > 1 and batch 1 would recompile)
        kv = kv.reshape(B, -1, 2 * h, d)
        k, v = kv[:, :, :h].transpose(1, 2), kv[:, :, h:].transpose(1, 2)
        out = attention(q, k, v, None, self.scale, 0.0, self.backend)
        out = out.transpose(1, 2).reshape(B, H, W, self.l_dim)
        return (
            linear_act(out, self.l_proj.weight, self.l_proj.bias)  # type: ignore[union-attr]
            if fused
            else self.l_proj(out)  # type: ignore[misc]
        )

    def forward(self, x: Tensor, hw: tuple[int, int] | None) -> Tensor:
        """Args:
            x: ``[B, N, C]`` tokens of an ``H × W`` map (row-major).
            hw: ``(H, W)`` (required; ``Optional`` only for the uniform block interface).

        Returns:
            ``[B, N, C]``.
        """
        if hw is None:
            raise ValueError("HiLo needs the map size hw=(H, W)")
        B, N, C = x.shape[0], x.shape[1], x.shape[2]
        H, W = hw[0], hw[1]
        if N != H * W:
            raise ValueError(f"got {N} tokens for a {H}x{W} map")
        if self.dim != C:
            raise ValueError(f"expected {self.dim} channels, got {C}")
        x = x.reshape(B, H, W, C)
        pad_b, pad_r = (-H) % self.ws, (-W) % self.ws
        padded = pad_b > 0 or pad_r > 0
        if padded:
            x = F.pad(x, [0, 0, 0, pad_r, 0, pad_b])
        fused = False if torch.jit.is_scripting() else self._fusable(x)
        # (one GEMM for h_qkv + l_q, which read the same x, measured 0.91-0.97x: slicing its
        # output for the two branches cost more than the saved pass; BENCHMARKS.md)
        if self.h_qkv is None:
            out = self._lofi(x, fused)
        elif self.l_q is None:
            out = self._hifi(x, fused)
        else:
            out = torch.cat((self._hifi(x, fused), self._lofi(x, fused)), dim=-1)
        if padded:
            out = out[:, :H, :W, :]
        return out.reshape(B, N, C)

    def macs(self, hw: tuple[int, int]) -> int:
        """MACs of one forward per image at map size ``hw`` (see :func:`hilo_macs`)."""
        return hilo_macs(self.dim, self.num_heads, hw, self.ws, self.alpha)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads} (lo={self.l_heads}, hi={self.h_heads}), "
            f"window_size={self.ws}, alpha={self.alpha}, backend={self.backend!r}"
        )
