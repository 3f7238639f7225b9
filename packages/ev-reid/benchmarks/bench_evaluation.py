"""Re-id evaluation at MSMT17 scale: chunked evaluation vs the full-matrix approach.

The baseline reimplements what torchreid's and fast-reid's python evaluators do: build the
whole query × gallery distance matrix, ``argsort`` every row of it, build the full match
matrix, then loop over queries in Python. Both sides get the same synthetic features (an
identity centre per person, a per-camera offset and per-image noise, MSMT17 sizes: 11,659
queries, 82,161 gallery images, 3,060 gallery identities, 15 cameras) and the same distances,
and the benchmark checks that the metrics are identical.

The baseline runs under an address-space limit (``--memory-limit-gb``) so that running out
of memory is recorded as a failure instead of waking the OOM killer.

A second baseline is the evaluator fast-reid users get by default: the Cython
``evaluate_cy`` of ``fastreid/evaluation/rank_cylib/rank_cy.pyx``. It is compiled here, in the
benchmark environment, from the installed ``fastreid`` wheel (``pip install fastreid==1.4.0
--no-deps cython``; or ``--rank-cy-pyx PATH``) with Cython and the system C compiler; when
that is impossible the row records exactly why. It works in float32 (its mAP may differ from
the float64 metrics in the last digits).

    python packages/ev-reid/benchmarks/bench_evaluation.py --quick
    python packages/ev-reid/benchmarks/bench_evaluation.py --scale 0.25 --out eval.json
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ev_core.benchmark import BenchmarkSuite
from ev_reid.evaluation import (
    RankResult,
    evaluate_features,
    evaluate_rank,
    pairwise_distance,
    prepare_features,
)

MSMT17 = {"queries": 11_659, "gallery": 82_161, "ids": 3_060, "cameras": 15}


def synthetic_features(
    scale: float, dim: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MSMT17-sized features whose ranking is neither trivial nor random (mAP around 0.6)."""
    nq, ng = round(MSMT17["queries"] * scale), round(MSMT17["gallery"] * scale)
    n_ids = max(10, round(MSMT17["ids"] * scale))
    g = torch.Generator().manual_seed(seed)
    spread = 0.25 + 0.35 * torch.rand(n_ids, 1, generator=g)  # some identities are harder
    centres = torch.randn(n_ids, dim, generator=g) / dim**0.5 * spread
    cams = torch.randn(MSMT17["cameras"], dim, generator=g) / dim**0.5 * 0.1
    q_pids = torch.randint(0, n_ids, (nq,), generator=g)
    g_pids = torch.randint(0, n_ids, (ng,), generator=g)
    q_cams = torch.randint(0, MSMT17["cameras"], (nq,), generator=g)
    g_cams = torch.randint(0, MSMT17["cameras"], (ng,), generator=g)
    qf = centres[q_pids] + cams[q_cams] + torch.randn(nq, dim, generator=g) / dim**0.5
    gf = centres[g_pids] + cams[g_cams] + torch.randn(ng, dim, generator=g) / dim**0.5
    return qf, gf, q_pids.numpy(), g_pids.numpy(), q_cams.numpy(), g_cams.numpy()


def full_matrix_ranking(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_cams: np.ndarray,
    g_cams: np.ndarray,
    max_rank: int = 50,
    stable: bool = False,
) -> tuple[np.ndarray, float, float]:
    """The torchreid/fast-reid python evaluator: argsort all rows, match matrix, query loop.

    They use numpy's default (unstable) argsort; ``stable=True`` orders equal distances by
    gallery index, which is the tie rule of :mod:`ev_reid.evaluation`.
    """
    indices = np.argsort(distmat, axis=1, kind="stable" if stable else None)  # [Q, G] int64
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)  # [Q, G]
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = indices[i]
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        raw = matches[i][keep]
        if not raw.any():
            continue
        cmc = raw.cumsum()
        cmcs.append(np.minimum(cmc, 1)[:max_rank])
        positions = np.flatnonzero(raw) + 1
        inps.append(raw.sum() / positions[-1])
        precision = cmc / np.arange(1, raw.size + 1)
        aps.append((precision * raw).sum() / raw.sum())
    return np.mean(cmcs, 0), float(np.mean(aps)), float(np.mean(inps))


def build_fastreid_cython(pyx: Path | None) -> tuple[Any | None, str]:
    """Compile fast-reid's ``rank_cy.pyx`` into a temporary folder and import it.

    Returns:
        ``(module, description)``, or ``(None, why it could not be built)``.
    """
    if pyx is None:
        spec = importlib.util.find_spec("fastreid")
        if spec is None or not spec.submodule_search_locations:
            return None, "fastreid is not installed (pip install fastreid==1.4.0 --no-deps)"
        pyx = Path(next(iter(spec.submodule_search_locations)))
        pyx = pyx / "evaluation/rank_cylib/rank_cy.pyx"
    if not pyx.is_file():
        return None, f"no rank_cy.pyx at {pyx}"
    if importlib.util.find_spec("Cython") is None:
        return None, "Cython is not installed (pip install cython)"
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler ({cc!r} not on PATH)"
    build = Path(tempfile.mkdtemp(prefix="rank_cy_"))
    shutil.copy(pyx, build / "rank_cy.pyx")
    env = dict(os.environ, CFLAGS=f"-O3 -I{np.get_include()}")
    proc = subprocess.run(
        [sys.executable, "-m", "Cython.Build.Cythonize", "-i", "-3", "rank_cy.pyx"],
        cwd=build,
        env=env,
        capture_output=True,
        text=True,
    )
    built = sorted(build.glob("rank_cy*.so"))
    if proc.returncode != 0 or not built:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return None, f"cythonize failed (exit {proc.returncode}): {' | '.join(tail)}"
    spec = importlib.util.spec_from_file_location("rank_cy", built[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import Cython

    return module, f"{pyx} compiled with Cython {Cython.__version__}"


def _vm_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


class MemoryCap:
    """Temporarily limit this process' address space so that over-allocation raises."""

    def __init__(self, extra_gb: float) -> None:
        self.extra = int(extra_gb * 2**30)

    def __enter__(self) -> None:
        self.saved = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + self.extra, self.saved[1]))

    def __exit__(self, *exc: Any) -> None:
        resource.setrlimit(resource.RLIMIT_AS, self.saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (smoke test)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of MSMT17 sizes")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"])
    parser.add_argument("--memory-limit-gb", type=float, default=12.0, help="baseline cap")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--ranking-only", action="store_true", help="also time distmat-in")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (both sides)")
    parser.add_argument(
        "--rank-cy-pyx", type=Path, default=None, help="fast-reid's rank_cy.pyx (default: found"
        " in the installed fastreid package)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.scale, args.dim = 0.02, 64
    os.environ.setdefault("EV_QUIET", "1")

    qf, gf, qp, gp, qc, gc = synthetic_features(args.scale, args.dim)
    shape = f"{qf.shape[0]}x{gf.shape[0]}x{args.dim}"
    suite = BenchmarkSuite("reid_evaluation", warmup=0, min_run_time=0.0)
    suite.notes.update(
        scale=args.scale,
        shape=shape,
        metric=args.metric,
        threads=torch.get_num_threads(),
        memory_limit_gb_for_baseline=args.memory_limit_gb,
    )
    results: dict[str, Any] = {}
    group = f"features->metrics {shape}"

    def ours() -> None:
        results["ours"] = evaluate_features(
            qf, gf, qp, gp, qc, gc, metric=args.metric, show_progress=False
        )

    def baseline(stable: bool = False) -> None:
        q, g = prepare_features(qf, args.metric), prepare_features(gf, args.metric)
        distmat = pairwise_distance(q, g, args.metric).numpy()
        results["baseline"] = full_matrix_ranking(distmat, qp, gp, qc, gc, stable=stable)

    if not args.skip_baseline:
        try:
            with MemoryCap(args.memory_limit_gb):
                baseline(stable=True)  # same tie rule as ours, for the identical-metrics check
        except (MemoryError, RuntimeError) as err:
            reason = f"out of memory under a {args.memory_limit_gb:g} GB cap ({type(err).__name__})"
            suite.add_failure("full matrix + argsort + loop (torchreid/fast-reid)", group, reason)
        else:
            results["baseline_stable"] = results["baseline"]
            with MemoryCap(args.memory_limit_gb):
                suite.add(
                    "full matrix + argsort + loop (torchreid/fast-reid)",
                    baseline,
                    group=group,
                    baseline=True,
                    memory=True,
                )
    rank_cy, how = build_fastreid_cython(args.rank_cy_pyx)
    suite.notes["fastreid_cython"] = how
    cy_name = "full matrix + fast-reid Cython evaluate_cy"
    if rank_cy is None:
        suite.add_failure(cy_name, group, how)
    else:

        def cython_full() -> None:
            q, g = prepare_features(qf, args.metric), prepare_features(gf, args.metric)
            distmat = pairwise_distance(q, g, args.metric).numpy()
            results["cython"] = rank_cy.evaluate_cy(distmat, qp, gp, qc, gc, 50)

        try:
            with MemoryCap(args.memory_limit_gb):
                suite.add(cy_name, cython_full, group=group, memory=True)
        except (MemoryError, RuntimeError) as err:
            reason = f"out of memory under a {args.memory_limit_gb:g} GB cap ({type(err).__name__})"
            suite.add_failure(cy_name, group, reason)
    suite.add("evaluate_features (chunked)", ours, group=group, memory=True)

    if args.ranking_only:
        q, g = prepare_features(qf, args.metric), prepare_features(gf, args.metric)
        distmat = pairwise_distance(q, g, args.metric)
        del q, g
        rgroup = f"distmat->metrics {shape}"
        suite.add(
            "argsort + loop (torchreid/fast-reid)",
            lambda: full_matrix_ranking(distmat.numpy(), qp, gp, qc, gc),
            group=rgroup,
            baseline=True,
            memory=True,
        )
        if rank_cy is not None:
            dist_np = distmat.numpy()
            suite.add(
                "fast-reid Cython evaluate_cy",
                lambda: rank_cy.evaluate_cy(dist_np, qp, gp, qc, gc, 50),
                group=rgroup,
                memory=True,
            )
        suite.add(
            "evaluate_rank (chunked)",
            lambda: evaluate_rank(distmat, qp, gp, qc, gc),
            group=rgroup,
            memory=True,
        )

    mine: RankResult = results["ours"]
    suite.notes["ours"] = mine.as_dict()
    if "baseline_stable" in results:
        cmc, mAP, mINP = results["baseline_stable"]
        suite.notes["baseline"] = {"rank1": float(cmc[0]), "mAP": mAP, "mINP": mINP}
        suite.notes["identical_metrics"] = bool(
            np.array_equal(cmc, mine.cmc) and mAP == mine.mAP and mINP == mine.mINP
        )
        suite.notes["max_abs_metric_difference"] = float(
            max(np.abs(cmc - mine.cmc).max(), abs(mAP - mine.mAP), abs(mINP - mine.mINP))
        )
    if "cython" in results:
        cmc_cy, ap_cy, inp_cy = results["cython"]
        suite.notes["fastreid_cython_metrics"] = {
            "rank1": float(cmc_cy[0]),
            "mAP": float(np.mean(ap_cy)),
            "mINP": float(np.mean(inp_cy)),
            "max_abs_difference_to_ours": float(
                max(
                    np.abs(cmc_cy[:50] - mine.cmc[: len(cmc_cy)]).max(),
                    abs(float(np.mean(ap_cy)) - mine.mAP),
                    abs(float(np.mean(inp_cy)) - mine.mINP),
                )
            ),
        }
    suite.print_table()
    print({k: v for k, v in suite.notes.items()})
    if args.out:
        suite.write_json(args.out)


if __name__ == "__main__":
    main()
