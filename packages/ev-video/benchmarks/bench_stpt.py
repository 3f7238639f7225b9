"""STPT cost: GFLOPs and CPU throughput of local-window-early STPT vs global attention everywhere.

The paper's argument (SYSTEMS.md §4.1): global attention on early tokens is prohibitive, so the
early stages attend inside (8, 6, 6) windows. Measured here for ``stpt_s`` at 64x96x96
(T x H x W): FLOPs from ``torch.utils.flop_counter`` on the meta device (exact for the graph),
and eager fp32 CPU forward time (batch 1) of both variants (plus the GPU when present).

    python packages/ev-video/benchmarks/bench_stpt.py [--frames 64] [--size 96]
"""

from __future__ import annotations

import argparse

import torch

from ev_core.benchmark import BenchmarkSuite
from ev_video.models import count_video_flops, create

GLOBAL = (None, None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--model", default="stpt_s")
    ap.add_argument("--min-run-time", type=float, default=2.0)
    ap.add_argument("--out", default="benchmark-results/ev_video_stpt.json")
    args = ap.parse_args()
    shape = (3, args.frames, args.size, args.size)
    variants = {
        "global attention in every stage": {"windows": GLOBAL},
        f"{args.model} (local early, global late)": {},
    }
    flops = {}
    for name, kw in variants.items():
        with torch.device("meta"):
            m = create(args.model, num_classes=20, **kw)
        flops[name] = count_video_flops(m, shape) / 2e9  # GMACs
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    suites = []
    for dev in devices:
        suite = BenchmarkSuite(
            f"ev_video_stpt_{dev}", device=dev, min_run_time=args.min_run_time, warmup=1
        )
        for i, (name, kw) in enumerate(variants.items()):
            torch.manual_seed(0)
            model = create(args.model, num_classes=20, **kw).eval().to(dev)
            x = torch.randn(1, *shape, device=dev)

            def run(model: torch.nn.Module = model, x: torch.Tensor = x, dev: str = dev) -> None:
                with (
                    torch.no_grad(),
                    torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"),
                ):
                    model(x)

            try:
                suite.add(name, run, group=f"{args.model} {args.frames}x{args.size}x{args.size} {dev}", baseline=i == 0,
                          memory=True, items_per_call=1, gmacs=round(flops[name], 2))  # fmt: skip
            except RuntimeError as exc:  # e.g. out of memory for global attention
                suite.add_failure(
                    name,
                    f"{args.model} {dev}",
                    str(exc).splitlines()[0],
                    gmacs=round(flops[name], 2),
                )
        suite.notes["gmacs"] = {k: round(v, 2) for k, v in flops.items()}
        suite.notes["machine"] = "CPU rows: 2 cores shared with other jobs (busy)"
        suite.print_table()
        print("written:", suite.write_json(args.out.replace(".json", f"_{dev}.json")))
        suites.append(suite)
    for k, v in flops.items():
        print(f"{k}: {v:.1f} GMACs")
    g = list(flops.values())
    print(f"local/global GMACs: {g[1] / g[0]:.3f} ({(1 - g[1] / g[0]) * 100:.1f}% fewer)")


if __name__ == "__main__":
    main()
