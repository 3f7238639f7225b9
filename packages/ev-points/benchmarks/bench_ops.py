"""Point-op timings: ev-points' native backend vs pytorch3d vs the plain-torch code a user would
otherwise write, on the CPU (and CUDA when present: then also the Triton kernels).

Ops (batch 8, uniform points in the unit cube): ``knn_points`` K=16 (p1 = p2), ``ball_query``
K=16 with a radius holding ~32 points on average, ``sample_farthest_points`` to P/4.
The naive rows are the direct formulations: full ``cdist`` + ``topk`` for k-NN, full ``cdist``
+ first-K mask for the ball query, a Python loop over clouds for FPS (pytorch3d's
``sample_farthest_points_naive`` algorithm); they run only where their O(P²) memory / time is
affordable (``--naive-max``). Every row's indices are compared with the native result
(``same_idx_as_native`` in the JSON); native rows record the neighbour-selection path
(``kdtree`` / ``brute``), every row the load average before and after it. The native ball
query of a cloud against itself uses the kd-tree's self-join; the extra row "native, p2 a copy"
times the general path (p2 a different tensor holding the same points).

``--single-call`` times each row with exactly one call, whose result is also the one compared
(pytorch3d at 64k points takes minutes per call; the default timer calls at least twice).

    OMP_NUM_THREADS=1 python packages/ev-points/benchmarks/bench_ops.py --sizes 4096 16384
    OMP_NUM_THREADS=1 python packages/ev-points/benchmarks/bench_ops.py --sizes 65536 \\
        --ops knn,ball --single-call --naive-max 0
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ev_core.benchmark import BenchmarkRow, BenchmarkSuite
from ev_points.ops import _native, backend_status, ball_query, knn_points, sample_farthest_points


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
    pts: torch.Tensor, qry: torch.Tensor, size: int, radius: float
) -> dict[str, tuple[Callable, Callable, tuple]]:
    """Per op: (backend name -> zero-arg call returning idx, naive function, its extra args)."""

    def knn(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: knn_points(qry, pts, K=16, backend=backend).idx

    copy = pts.clone()

    def ball(backend: str) -> Callable[[], torch.Tensor]:
        p2 = copy if backend == "native-copy" else pts
        name = "native" if backend == "native-copy" else backend
        return lambda: ball_query(qry, p2, K=16, radius=radius, return_nn=False, backend=name).idx

    def fps(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: sample_farthest_points(pts, K=size // 4, backend=backend)[1]

    return {
        "knn": (knn, naive_knn, (16,)),
        "ball": (ball, naive_ball, (16, radius)),
        "fps": (fps, naive_fps, (size // 4,)),
    }


class _Runner:
    """Adds rows to the suite: timed by the suite, or by one call (``single``); returns the
    indices of a call so they can be compared with native's."""

    def __init__(self, suite: BenchmarkSuite, single: bool, batch: int) -> None:
        self.suite, self.single, self.batch = suite, single, batch

    def add(self, name: str, fn: Callable[[], torch.Tensor], group: str, baseline: bool,
            **extra: object) -> torch.Tensor:  # fmt: skip
        before = os.getloadavg()
        if self.single:
            if self.suite.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if self.suite.device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) * 1e3
            row = BenchmarkRow(name, group, ms, 0.0, 1, baseline=baseline,
                               items_per_call=self.batch, extra=dict(extra))  # fmt: skip
            self.suite.rows.append(row)
        else:
            out = fn()
            row = self.suite.add(name, fn, group=group, baseline=baseline,
                                 items_per_call=self.batch, **extra)  # fmt: skip
        row.extra["loadavg_before"] = before
        row.extra["loadavg_after"] = os.getloadavg()
        self._ratios(group)
        return out

    def _ratios(self, group: str) -> None:
        rows = [r for r in self.suite.rows if r.group == group and r.runs]
        base = next((r for r in rows if r.baseline), None)
        for r in rows:
            r.ratio_vs_baseline = base.median_ms / r.median_ms if base else None


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ops", default="knn,ball,fps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--naive-max", type=int, default=4096, help="largest P for the naive rows")
    ap.add_argument(
        "--queries",
        type=int,
        default=None,
        help="k-NN / ball-query centres per cloud, other random points (default: p1 = p2)",
    )
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--single-call", action="store_true", help="one timed call per row")
    ap.add_argument("--no-pytorch3d", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench_ops.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    suite = BenchmarkSuite(
        "ev-points ops", device=dev, min_run_time=args.min_run_time, warmup=args.warmup
    )
    import scipy

    suite.notes.update(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        scipy=scipy.__version__,
        loadavg_start=os.getloadavg(),
        single_call=args.single_call,
    )
    runner = _Runner(suite, args.single_call, args.batch)
    p3d_reason = (
        "disabled (--no-pytorch3d)"
        if args.no_pytorch3d
        else backend_status(dev, torch.float32)["pytorch3d"]
    )
    triton_reason = backend_status(dev, torch.float32)["triton"]
    suite.notes["triton"] = triton_reason or "available"
    ops = set(args.ops.split(","))
    for size in args.sizes:
        g = torch.Generator().manual_seed(size)
        pts = torch.rand(args.batch, size, 3, generator=g).to(dev)
        if args.queries is None:
            qry = pts
        else:
            qry = torch.rand(args.batch, args.queries, 3, generator=g).to(dev)
        radius = (2 * 16 * 3 / (4 * math.pi * size)) ** (1 / 3)
        path, why = _native.selection_path(qry, pts)
        suite.notes[f"native_path_P{size}"] = f"{path}: {why}"
        for op, (make, naive, nargs) in _op_runs(pts, qry, size, radius).items():
            if op not in ops:
                continue
            group = f"{op} P={size} B={args.batch}"
            if args.queries is not None and op != "fps":
                group += f" Q={args.queries}"
            extra = {"path": path if op != "fps" else "vectorised FPS"}
            reference = runner.add(f"native {group}", make("native"), group, False, **extra)
            if op == "ball" and qry is pts:  # the general path, without the self-join
                idx = runner.add(f"native, p2 a copy {group}", make("native-copy"), group, False)
                suite.rows[-1].extra["same_idx_as_native"] = bool(torch.equal(idx, reference))
            if triton_reason is None:
                idx = runner.add(f"triton {group}", make("triton"), group, False)
                suite.rows[-1].extra["same_idx_as_native"] = bool(torch.equal(idx, reference))
            if p3d_reason is None:
                idx = runner.add(f"pytorch3d {group}", make("pytorch3d"), group, True)
                suite.rows[-1].extra["same_idx_as_native"] = bool(torch.equal(idx, reference))
            else:
                suite.add_failure(
                    f"pytorch3d {group}", group, f"pytorch3d unavailable: {p3d_reason}"
                )
            if size <= args.naive_max and dev.type == "cpu" and qry is pts:
                fn = functools.partial(naive, pts, *nargs)
                idx = runner.add(f"naive {group}", fn, group, p3d_reason is not None)
                suite.rows[-1].extra["same_idx_as_native"] = bool(torch.equal(idx, reference))
            suite.print_table()
            suite.write_json(args.out)  # after every group: a killed long run keeps its rows
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
