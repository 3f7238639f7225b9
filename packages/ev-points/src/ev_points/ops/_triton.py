"""The ``triton`` backend: neighbour selection and farthest-point sampling as Triton kernels.

Each kernel makes pytorch3d's decisions with pytorch3d's float32 arithmetic -- distances
accumulated one coordinate at a time, launched with ``enable_fp_fusion=False`` so that no
multiply-add is fused -- hence the same indices as the CPU kernels, ties included:

* ``knn``: a block of query rows scans ``p2`` in tiles; each distance and index pack into one
  int64 key (float32 bits << 32 | index: the order of (distance, index)); a tile that holds a
  key below a row's current K-th is merged into the running best with ``tl.topk``.
* ``ball``: a block of rows scans ``p2`` in index order; the points inside (``dist² < r²``)
  are written at each row's running count (a prefix sum over the tile); the scan stops when
  every row of the block has K.
* ``fps``: one program per cloud; per sample, one pass over the cloud updates the distance to
  the selected set (a float32 scratch buffer) and takes the first maximum.

Only the indices come from the kernels: distances and gathered points are recomputed by torch
from them (:mod:`ev_points.ops._native`), so gradients are the other backends'. Inputs are
float32 (k-NN, ball query) on a CUDA device; ``TRITON_INTERPRET=1`` runs the kernels on CPU
tensors in Triton's interpreter (the tests do).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["ball_idx", "fps_idx", "interpreted", "knn_idx", "unavailable"]

#: Query rows per program (k-NN, ball query) and points per tile.
BLOCK_ROWS = 32
BLOCK_POINTS = 128
#: Points per tile of the farthest-point sampling pass.
BLOCK_FPS = 1024
_BIG = (1 << 63) - 1


@functools.cache
def _import_error() -> str | None:
    try:
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def interpreted() -> bool:
    """Whether ``TRITON_INTERPRET=1`` (kernels run on CPU tensors in Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "").strip() == "1"


def unavailable(device: torch.device | None, dtype: torch.dtype | None) -> str | None:
    """Why the Triton kernels cannot run on ``device`` / ``dtype`` (None when they can)."""
    why = _import_error()
    if why is not None:
        return why
    if device is None:
        if not torch.cuda.is_available() and not interpreted():
            return "the Triton kernels need a CUDA device and none is available"
    elif device.type != "cuda" and not (device.type == "cpu" and interpreted()):
        return (
            f"the Triton kernels run on CUDA devices, inputs are on {device.type!r} "
            "(TRITON_INTERPRET=1 runs them on CPU tensors in Triton's interpreter)"
        )
    if dtype is not None and dtype != torch.float32:
        return f"the Triton kernels compute in float32 (pytorch3d's arithmetic), got {dtype}"
    return None


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def _launch_options() -> dict[str, Any]:
    # no fused multiply-add: the float32 roundings of pytorch3d's CPU kernels (and of native)
    return {} if interpreted() else {"enable_fp_fusion": False}


@functools.cache
def _kernels() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def knn_kernel(  # type: ignore[no-untyped-def]  # triton kernel
        p1, p2, len1, len2, out, D, K, s1n, s1p, s1d, s2n, s2p, s2d, son, sop,
        NORM: tl.constexpr, BQ: tl.constexpr, BP: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BQ + tl.arange(0, BQ).to(tl.int64)
        l1 = tl.load(len1 + n)
        l2 = tl.load(len2 + n)
        live = rows < l1
        lane = tl.arange(0, BP)
        big = tl.full([BQ, BP], 0x7FFFFFFFFFFFFFFF, tl.int64)
        best = big
        kth = tl.full([BQ], 0x7FFFFFFFFFFFFFFF, tl.int64)
        for start in range(0, l2, BP):
            cols = start + lane.to(tl.int64)
            inb = cols < l2
            dist = tl.zeros([BQ, BP], tl.float32)
            for c in range(D):
                q = tl.load(p1 + n * s1n + rows * s1p + c * s1d, mask=live, other=0.0)
                p = tl.load(p2 + n * s2n + cols * s2p + c * s2d, mask=inb, other=0.0)
                diff = q[:, None] - p[None, :]
                if NORM == 2:
                    dist = dist + diff * diff
                else:
                    dist = dist + tl.abs(diff)
            key = (dist.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols[None, :]
            key = tl.where(inb[None, :], key, big)
            if tl.sum((tl.min(key, axis=1) < kth).to(tl.int32), axis=0) > 0:
                best = tl.topk(tl.cat(best, key, dim=1), BP, dim=1, descending=False)
                kth = tl.sum(tl.where(lane[None, :] == K - 1, best, 0), axis=1)
        idx = tl.where(best == big, -1, best & 0xFFFFFFFF)
        dest = out + n * son + rows[:, None] * sop + lane[None, :]
        tl.store(dest, idx, mask=live[:, None] & (lane[None, :] < K))

    @triton.jit
    def ball_kernel(  # type: ignore[no-untyped-def]  # triton kernel
        p1, p2, len1, len2, out, D, K, r2, s1n, s1p, s1d, s2n, s2p, s2d, son, sop,
        BQ: tl.constexpr, BP: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BQ + tl.arange(0, BQ).to(tl.int64)
        l1 = tl.load(len1 + n)
        l2 = tl.load(len2 + n)
        live = rows < l1
        count = tl.where(live, 0, K)  # rows past lengths1 count as full
        start = l2 * 0
        while (start < l2) & (tl.min(count, axis=0) < K):
            cols = start + tl.arange(0, BP).to(tl.int64)
            inb = cols < l2
            dist = tl.zeros([BQ, BP], tl.float32)
            for c in range(D):
                q = tl.load(p1 + n * s1n + rows * s1p + c * s1d, mask=live, other=0.0)
                p = tl.load(p2 + n * s2n + cols * s2p + c * s2d, mask=inb, other=0.0)
                diff = q[:, None] - p[None, :]
                dist = dist + diff * diff
            inside = (dist < r2) & inb[None, :] & live[:, None]
            hits = inside.to(tl.int32)
            slot = count[:, None] + tl.cumsum(hits, axis=1) - 1
            dest = out + n * son + rows[:, None] * sop + slot
            tl.store(dest, cols[None, :] + slot * 0, mask=inside & (slot < K))
            count = count + tl.sum(hits, axis=1)
            start = start + BP

    @triton.jit
    def fps_kernel(  # type: ignore[no-untyped-def]  # triton kernel
        pts, lengths, ks, starts, mind, out, P, D, sn, sp, sd, son, BP: tl.constexpr
    ):
        n = tl.program_id(0).to(tl.int64)
        length = tl.load(lengths + n)
        k = tl.minimum(tl.load(ks + n), length)
        sel = tl.load(starts + n)
        tl.store(out + n * son, sel, mask=k > 0)
        lane = tl.arange(0, BP).to(tl.int64)
        for s in range(1, k):
            best_v = (sel * 0).to(tl.float32) - 2.0  # below every distance and the -1 padding
            best_i = sel * 0
            for start in range(0, length, BP):
                cols = start + lane
                inb = cols < length
                d = tl.zeros([BP], tl.float32)
                for c in range(D):
                    x = tl.load(pts + n * sn + cols * sp + c * sd, mask=inb, other=0.0)
                    diff = x - tl.load(pts + n * sn + sel * sp + c * sd)
                    d = d + diff * diff
                m = tl.minimum(tl.load(mind + n * P + cols, mask=inb, other=-1.0), d)
                tl.store(mind + n * P + cols, m, mask=inb)
                m = tl.where(inb, m, -1.0)
                tile_v = tl.max(m, axis=0)
                tile_i = start + tl.argmax(m, axis=0, tie_break_left=True)
                take = tile_v > best_v  # strictly: an earlier tile keeps a tie
                best_i = tl.where(take, tile_i, best_i)
                best_v = tl.where(take, tile_v, best_v)
            sel = best_i
            tl.store(out + n * son + s, sel)

    return {"knn": knn_kernel, "ball": ball_kernel, "fps": fps_kernel}


def _pair_args(p1: Tensor, p2: Tensor, lengths1: Tensor, lengths2: Tensor) -> tuple:
    return (
        p1,
        p2,
        lengths1.to(device=p1.device, dtype=torch.int64).contiguous(),
        lengths2.to(device=p1.device, dtype=torch.int64).contiguous(),
    )


@torch.no_grad()
def knn_idx(
    p1: Tensor, p2: Tensor, lengths1: Tensor, lengths2: Tensor, norm: int, K: int
) -> Tensor:
    """Indices ``[N, P1, K]`` of the K nearest valid ``p2`` points (ascending (distance, index)),
    0 where padded -- the native backend's layout."""
    n, P1, d = p1.shape
    idx = torch.full((n, P1, K), -1, dtype=torch.int64, device=p1.device)
    if n and P1 and p2.shape[1]:
        a, b, l1, l2 = _pair_args(p1.detach(), p2.detach(), lengths1, lengths2)
        grid = (-(-P1 // BLOCK_ROWS), n)
        bp = max(BLOCK_POINTS, _pow2(K))
        _kernels()["knn"][grid](
            a, b, l1, l2, idx, d, K, *a.stride(), *b.stride(), idx.stride(0), idx.stride(1),
            NORM=norm, BQ=BLOCK_ROWS, BP=bp, **_launch_options(),
        )  # fmt: skip
    return idx.clamp_min_(0)


@torch.no_grad()
def ball_idx(
    p1: Tensor, p2: Tensor, lengths1: Tensor, lengths2: Tensor, K: int, radius: float
) -> Tensor:
    """First K indices, in index order, of valid ``p2`` points with ``dist² < radius²`` (float32,
    the squared radius rounded as pytorch3d rounds it); ``[N, P1, K]`` padded with -1."""
    n, P1, d = p1.shape
    idx = torch.full((n, P1, K), -1, dtype=torch.int64, device=p1.device)
    if n and P1 and p2.shape[1]:
        a, b, l1, l2 = _pair_args(p1.detach(), p2.detach(), lengths1, lengths2)
        r2 = float(torch.tensor(radius, dtype=torch.float32).square())
        grid = (-(-P1 // BLOCK_ROWS), n)
        _kernels()["ball"][grid](
            a, b, l1, l2, idx, d, K, r2, *a.stride(), *b.stride(), idx.stride(0), idx.stride(1),
            BQ=BLOCK_ROWS, BP=BLOCK_POINTS, **_launch_options(),
        )  # fmt: skip
    return idx


@torch.no_grad()
def fps_idx(points: Tensor, lengths: Tensor, K: Tensor, start: Tensor) -> Tensor:
    """Farthest-point sampling ``idx [N, max(K)]`` (float32 distances, first maximum), padded
    with -1 -- the native backend's semantics."""
    n, P, d = points.shape
    max_k = int(K.max()) if K.numel() else 0
    idx = torch.full((n, max_k), -1, dtype=torch.int64, device=points.device)
    if max_k == 0 or n == 0:
        return idx
    pts = points.detach().to(torch.float32)
    lengths = lengths.to(device=points.device, dtype=torch.int64).contiguous()
    valid = torch.arange(P, device=points.device)[None] < lengths[:, None]
    mind = torch.where(valid, float("inf"), -1.0).to(torch.float32).contiguous()
    _kernels()["fps"][(n,)](
        pts, lengths, K.to(device=points.device, dtype=torch.int64).contiguous(),
        start.to(device=points.device, dtype=torch.int64).contiguous(), mind, idx, P, d,
        *pts.stride(), idx.stride(0), BP=BLOCK_FPS, **_launch_options(),
    )  # fmt: skip
    return idx
