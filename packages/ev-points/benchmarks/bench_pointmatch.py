"""PointMatch vs the labelled-points-only baseline on synthetic rooms, at 0.1 % and 0.01 % labels
(and N points per class), over several seeds (scenes, labels and weights all follow the seed).

Every row trains the tiny point U-Net for the same steps from the same labelled points with the
same supervised term (CE on the weak and the strong view) and the same EMA of the weights; every
run is evaluated with its EMA weights (PointMatch's teacher) and its raw weights (the student) on
held-out rooms (all points). Rows (``--rows``): ``labelled-only`` (the baseline),
``pointmatch``, ``labelled-only-weak`` (the baseline on the weak view only) and
``pointmatch-plain`` (PointMatch without the distribution alignment and class balancing). The label ratio is applied to dense training rooms (``--train-points``, like a
grid-subsampled room) while the model trains on ``--num-points`` subsets of them. Writes a JSON
with every run (per-class IoU, pseudo-label coverage/accuracy traces, the load average) and
prints mean ± std mIoU and the paired PointMatch − baseline gain per setting.

    OMP_NUM_THREADS=1 python packages/ev-points/benchmarks/bench_pointmatch.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ev_core.repro import environment_info
from ev_core.training import EngineConfig
from ev_points.data import SYNTHETIC_CLASSES, SyntheticSceneConfig, make_synthetic_scenes
from ev_points.models import PointUNetConfig
from ev_points.pointmatch import PointMatchConfig, evaluate, train_pointmatch

TRACE_KEYS = ("pseudo_coverage", "pseudo_acc", "teacher_acc", "loss_pseudo")
ROWS = {  # row -> (method, labelled_views, alignment and balancing)
    "labelled-only": ("labelled-only", "both", True),
    "pointmatch": ("pointmatch", "both", True),
    "labelled-only-weak": ("labelled-only", "weak", True),
    "pointmatch-plain": ("pointmatch", "both", False),
}


def _setting(ratio: float) -> str:
    return f"{int(ratio)} per class" if ratio >= 1 else f"{100 * ratio:g}%"


def _stats(vals: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
    }


def run_one(args: argparse.Namespace, seed: int, ratio: float, row: str) -> dict:
    method, views, prior = ROWS[row]
    n = len(SYNTHETIC_CLASSES)
    train = make_synthetic_scenes(
        args.train_scenes, 100 * seed, SyntheticSceneConfig(num_points=args.train_points)
    )
    val = make_synthetic_scenes(
        args.val_scenes, 100 * seed + 10_000, SyntheticSceneConfig(num_points=args.val_points)
    )
    cfg = PointMatchConfig(
        method=method, label_ratio=None if ratio >= 1 else ratio,
        points_per_class=int(ratio) if ratio >= 1 else None, label_seed=seed,
        num_points=args.num_points, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
        labelled_views=views, threshold=args.threshold,
        distribution_alignment=prior, class_balance=prior,
        model=PointUNetConfig.tiny(n),
        engine=EngineConfig(device="cpu", amp="off", seed=seed, log_every=10, eval_every=0),
    )  # fmt: skip
    start = time.perf_counter()
    out = train_pointmatch(train, n, cfg)
    seconds = time.perf_counter() - start
    assert out.teacher is not None
    ema = evaluate(out.teacher, val, n, SYNTHETIC_CLASSES)
    student = evaluate(out.model, val, n, SYNTHETIC_CLASSES)
    trace = [
        {"step": h["step"], **{k: round(h[k], 4) for k in TRACE_KEYS if k in h}}
        for h in out.history
        if "pseudo_coverage" in h
    ]
    return {"seed": seed, "ratio": ratio, "setting": _setting(ratio), "row": row,
            "method": method, "labelled_views": views, "miou": ema["miou"], "oa": ema["oa"], "iou": ema["iou"],
            "miou_student": student["miou"], "labelled_points": out.labelled_points,
            "seconds": round(seconds, 1), "loadavg": os.getloadavg(), "trace": trace}  # fmt: skip


def summarise(runs: list[dict], ratios: list[float], rows: list[str]) -> dict[str, Any]:
    """mean ± std mIoU per (setting, row) and the paired PointMatch − baseline gains."""
    summary: dict[str, Any] = {}
    for ratio in ratios:
        setting = _setting(ratio)
        by_row = {
            row: {r["seed"]: r for r in runs if r["ratio"] == ratio and r["row"] == row}
            for row in rows
        }
        entry: dict[str, Any] = {}
        for row, per_seed in by_row.items():
            if per_seed:
                entry[row] = {
                    "miou": _stats([r["miou"] for r in per_seed.values()]),
                    "miou_student": _stats([r["miou_student"] for r in per_seed.values()]),
                    "per_seed": {s: round(r["miou"], 4) for s, r in sorted(per_seed.items())},
                }
        base = by_row.get("labelled-only", {})
        for row in ("pointmatch", "pointmatch-plain"):
            pm = by_row.get(row, {})
            seeds = sorted(set(pm) & set(base))
            if seeds:
                gains = [pm[s]["miou"] - base[s]["miou"] for s in seeds]
                entry[f"gain {row}"] = _stats(gains) | {
                    "wins": sum(g > 0 for g in gains),
                    "seeds": seeds,
                }
        summary[setting] = entry
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.001, 0.0001],
        help="label ratios; a value >= 1 means N points per class",
    )
    ap.add_argument("--train-scenes", type=int, default=8)
    ap.add_argument("--val-scenes", type=int, default=4)
    ap.add_argument("--train-points", type=int, default=16384, help="points per training room")
    ap.add_argument("--val-points", type=int, default=2048, help="points per held-out room")
    ap.add_argument("--num-points", type=int, default=1024, help="points per training sample")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument(
        "--rows", nargs="+", choices=list(ROWS), default=["labelled-only", "pointmatch"]
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench_pointmatch.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = list(dict.fromkeys(args.rows))
    runs: list[dict] = []
    for seed in args.seeds:
        for ratio in args.ratios:
            for row in rows:
                runs.append(run_one(args, seed, ratio, row))
                short = {k: v for k, v in runs[-1].items() if k not in ("iou", "trace")}
                print(json.dumps(short), flush=True)
                summary = summarise(runs, args.ratios, rows)
                args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "environment": environment_info(),
                                                "runs": runs, "summary": summary}, indent=2, default=str))  # fmt: skip
    for setting, entry in summary.items():
        for row in rows:
            if row in entry:
                m = entry[row]["miou"]
                print(f"{setting} {row}: mIoU {100 * m['mean']:.1f} ± {100 * m['std']:.1f}")
        for key in (k for k in entry if k.startswith("gain")):
            g = entry[key]
            print(f"{setting} {key} over labelled-only: {100 * g['mean']:+.1f} ± {100 * g['std']:.1f} "
                  f"(min {100 * g['min']:+.1f}, wins {g['wins']}/{len(g['seeds'])})")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
