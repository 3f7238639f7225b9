"""Point-op timings: ev-points' native backend vs pytorch3d vs the plain-torch code a user would
otherwise write, on the CPU (and CUDA when present).

Ops (batch 8, uniform points in the unit cube): ``knn_points`` K=16 (p1 = p2), ``ball_query``
K=16 with a radius holding ~32 points on average, ``sample_farthest_points`` to P/4.
The naive rows are the direct formulations: full ``cdist`` + ``topk`` for k-NN, full ``cdist``
+ first-K mask for the ball query, a Python loop over clouds for FPS (pytorch3d's
``sample_farthest_points_naive`` algorithm); they run only where their O(P²) memory / time is
affordable (``--naive-max``). Each row checks its indices against the native result.

    OMP_NUM_THREADS=2 python packages/ev-points/benchmarks/bench_ops.py --sizes 4096 16384
    python packages/ev-points/benchmarks/bench_ops.py --sizes 65536 --ops fps --min-run-time 0
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ev_core.benchmark import BenchmarkSuite
from ev_points.ops import backend_status, ball_query, knn_points, sample_farthest_points


def naive_knn(p: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cdist(p, p).topk(k, dim=2, largest=False).indices


def naive_ball(p: torch.Tensor, k: int, radius: float) -> torch.Tensor:
    d2 = torch.cdist(p, p).square()
    pos = torch.arange(p.shape[1], dtype=p.dtype)
    key = torch.where(d2 < radius * radius, pos, pos + p.shape[1])
    vals, idx = key.topk(k, dim=2, largest=False)
    return torch.where(vals < p.shape[1], idx, -1)


def naive_fps(p: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.empty(p.shape[0], k, dtype=torch.int64)
    for b in range(p.shape[0]):
        best = torch.full((p.shape[1],), float("inf"))
        sel = 0
        out[b, 0] = 0
        for i in range(1, k):
            best = torch.minimum(best, ((p[b] - p[b, sel]) ** 2).sum(-1))
            sel = int(best.argmax())
            out[b, i] = sel
    return out


def _op_runs(
    pts: torch.Tensor, size: int, radius: float
) -> dict[str, tuple[Callable, Callable, tuple]]:
    """Per op: (backend name -> zero-arg call returning idx, naive function, its extra args)."""

    def knn(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: knn_points(pts, pts, K=16, backend=backend).idx

    def ball(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: (
            ball_query(pts, pts, K=16, radius=radius, return_nn=False, backend=backend).idx
        )

    def fps(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: sample_farthest_points(pts, K=size // 4, backend=backend)[1]

    return {
        "knn": (knn, naive_knn, (16,)),
        "ball": (ball, naive_ball, (16, radius)),
        "fps": (fps, naive_fps, (size // 4,)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ops", default="knn,ball,fps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--naive-max", type=int, default=4096, help="largest P for the naive rows")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-pytorch3d", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench_ops.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    suite = BenchmarkSuite(
        "ev-points ops", device=dev, min_run_time=args.min_run_time, warmup=args.warmup
    )
    p3d_reason = (
        "disabled (--no-pytorch3d)"
        if args.no_pytorch3d
        else backend_status(dev, torch.float32)["pytorch3d"]
    )
    ops = set(args.ops.split(","))
    for size in args.sizes:
        g = torch.Generator().manual_seed(size)
        pts = torch.rand(args.batch, size, 3, generator=g).to(dev)
        radius = (2 * 16 * 3 / (4 * math.pi * size)) ** (1 / 3)
        runs = _op_runs(pts, size, radius)
        for op, (make, naive, nargs) in runs.items():
            if op not in ops:
                continue
            group = f"{op} P={size} B={args.batch}"
            native = make("native")
            reference = native()
            suite.add(f"native {group}", native, group=group, items_per_call=args.batch)
            if p3d_reason is None:
                fn = make("pytorch3d")
                same = bool(torch.equal(fn(), reference))
                suite.add(
                    f"pytorch3d {group}",
                    fn,
                    group=group,
                    baseline=True,
                    items_per_call=args.batch,
                    same_idx_as_native=same,
                )
            else:
                suite.add_failure(
                    f"pytorch3d {group}", group, f"pytorch3d unavailable: {p3d_reason}"
                )
            if size <= args.naive_max and dev.type == "cpu":
                fn = functools.partial(naive, pts, *nargs)
                same = bool(torch.equal(fn(), reference))
                suite.add(f"naive {group}", fn, group=group, baseline=p3d_reason is not None, items_per_call=args.batch,
                          same_idx_as_native=same)  # fmt: skip
            suite.print_table()
            suite.write_json(args.out)  # after every group: a killed long run keeps its rows
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
