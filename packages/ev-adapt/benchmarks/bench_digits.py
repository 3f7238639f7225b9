"""MCL vs source-only, FixMatch and MME on the digits domain shift (1 and 3 shots, several seeds).

Usage::

    python packages/ev-adapt/benchmarks/bench_digits.py --seeds 5 --out adapt_digits.json

Writes a JSON (per run: method, shots, seed, final raw/EMA target test accuracy, the EMA
accuracy at the best EMA validation step, seconds) with machine metadata, and prints a
markdown table of mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ev_adapt import METHODS, AdaptConfig, AdaptModelConfig, build_model, train_adaptation
from ev_adapt.data import digits_shift
from ev_core.repro import environment_info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=None, help="default: the digits preset's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("adapt_digits.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("EV_QUIET", "1")
    model_config = AdaptModelConfig(
        backbone="digits_cnn", num_classes=10, bottleneck_dim=64, in_chans=1
    )
    runs = []
    for shots in args.shots:
        for seed in range(args.seeds):
            data = digits_shift(seed=seed, shots=shots)
            for method in args.methods:
                overrides: dict[str, object] = {"method": method, "seed": seed, "device": "cpu"}
                if args.steps is not None:
                    overrides["steps"] = args.steps
                config = AdaptConfig.preset("digits", **overrides)
                torch.manual_seed(seed)
                start = time.perf_counter()
                result = train_adaptation(
                    data, build_model(model_config), config, None, model_config
                )
                runs.append(
                    {
                        "method": method,
                        "shots": shots,
                        "seed": seed,
                        "test_acc": result.final["test_acc"],
                        "ema_test_acc": result.final["ema_test_acc"],
                        "selected_ema_test_acc": result.best_ema_val["ema_test_acc"],
                        "seconds": round(time.perf_counter() - start, 2),
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
    table = [
        "| shots | method | raw test acc (%) | EMA test acc (%) | EMA acc at best EMA val (%) | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for shots in args.shots:
        for method in args.methods:
            rows = [r for r in runs if r["shots"] == shots and r["method"] == method]

            def stat(key: str, rows: list[dict] = rows) -> str:
                values = [r[key] for r in rows]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):.1f} ± {sd:.1f}"

            secs = statistics.mean(r["seconds"] for r in rows)
            table.append(
                f"| {shots} | {method} | {stat('test_acc')} | {stat('ema_test_acc')} | {stat('selected_ema_test_acc')} | {secs:.0f} |"
            )
    print("\n".join(table))
    args.out.write_text(
        json.dumps(
            {
                "environment": environment_info(),
                "threads": args.threads,
                "args": vars(args) | {"out": str(args.out)},
                "runs": runs,
                "table": table,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
