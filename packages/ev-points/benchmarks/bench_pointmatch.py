"""PointMatch vs the labelled-points-only baseline on synthetic rooms, at 0.1 % and 0.01 % labels,
over several seeds (scenes, labels and weights all follow the seed).

Both methods train the tiny point U-Net for the same steps from the same labels; the EMA teacher
is evaluated for PointMatch, the student for the baseline, on held-out rooms (all points).
Writes a JSON with every run and prints mean ± std mIoU per setting.

    OMP_NUM_THREADS=2 python packages/ev-points/benchmarks/bench_pointmatch.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ev_core.repro import environment_info
from ev_core.training import EngineConfig
from ev_points.data import SYNTHETIC_CLASSES, SyntheticSceneConfig, make_synthetic_scenes
from ev_points.models import PointUNetConfig
from ev_points.pointmatch import PointMatchConfig, evaluate, train_pointmatch


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
    ap.add_argument("--train-scenes", type=int, default=12)
    ap.add_argument("--val-scenes", type=int, default=6)
    ap.add_argument("--scene-points", type=int, default=4096)
    ap.add_argument("--num-points", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench_pointmatch.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = len(SYNTHETIC_CLASSES)
    runs = []
    for seed in args.seeds:
        sc = SyntheticSceneConfig(num_points=args.scene_points)
        train = make_synthetic_scenes(args.train_scenes, 100 * seed, sc)
        val = make_synthetic_scenes(args.val_scenes, 100 * seed + 10_000, sc)
        for ratio in args.ratios:
            for method in ("labelled-only", "pointmatch"):
                cfg = PointMatchConfig(
                    method=method, label_ratio=None if ratio >= 1 else ratio,
                    points_per_class=int(ratio) if ratio >= 1 else None, label_seed=seed, num_points=args.num_points, batch_size=4,
                    steps=args.steps, lr=5e-3, ema_decay=0.99, model=PointUNetConfig.tiny(n),
                    engine=EngineConfig(device="cpu", amp="off", seed=seed, log_every=10**6, eval_every=0),
                )  # fmt: skip
                start = time.perf_counter()
                out = train_pointmatch(train, n, cfg)
                final = out.teacher if out.teacher is not None else out.model
                m = evaluate(final, val, n, SYNTHETIC_CLASSES)
                runs.append({"seed": seed, "ratio": ratio, "method": method, "miou": m["miou"], "oa": m["oa"],
                             "labelled_points": out.labelled_points, "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
                print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for ratio in args.ratios:
        for method in ("labelled-only", "pointmatch"):
            vals = [r["miou"] for r in runs if r["ratio"] == ratio and r["method"] == method]
            setting = f"{int(ratio)} per class" if ratio >= 1 else f"{100 * ratio:g}%"
            summary[f"{method} @ {setting}"] = {
                "miou_mean": statistics.mean(vals),
                "miou_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "runs": len(vals),
            }
    for k, v in summary.items():
        print(
            f"{k}: mIoU {100 * v['miou_mean']:.1f} ± {100 * v['miou_std']:.1f} ({v['runs']} seeds)"
        )
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "environment": environment_info(),
                                    "runs": runs, "summary": summary}, indent=2, default=str))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
