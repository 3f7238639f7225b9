"""Mesa's fused CPU kernels against the torch path, one tensor at a time.

Times each quantisation step Mesa runs per compressed tensor on the CPU:
* per-group min/max;
* min/max plus quantise, with stochastic rounding and to nearest (what one Mesa call costs);
* dequantise;
* GELU rebuilt from codes, and GELU's backward read from codes.
Each runs through the inductor-compiled kernels of ``ev_compress.mesa._fused`` and, as the
group's baseline, the vectorised torch path (``EV_MESA_FUSED=0``: what Mesa runs without a C++
compiler). The tensor is ``[pre, G, rest]`` grouped like a ViT-S MLP hidden activation at batch 32
(default ``[6304, 8, 192]``, 9.7 M elements), in float32 and bf16.

    python packages/ev-compress/benchmarks/bench_mesa_kernels.py --threads 2 \\
        --out mesa_kernels.json
    python packages/ev-compress/benchmarks/bench_mesa_kernels.py --quick
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch

from ev_compress.mesa import GroupLayout, _fused, dequantize, quantize
from ev_compress.mesa.ops import _library
from ev_compress.mesa.quant import _batch_range
from ev_core.benchmark import BenchmarkSuite

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _use_fused(on: bool) -> None:
    """Mesa's CPU kernels on, or forced to the torch path."""
    os.environ["EV_MESA_FUSED"] = "1" if on else "0"
    _fused.status.cache_clear()


def _steps(xg: torch.Tensor, seed: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """One call of each step, through the public entry points Mesa's ops use."""
    layout = GroupLayout(1, xg.shape[1])
    qt = quantize(xg, layout, seed=seed)
    grad = torch.randn(xg.shape, dtype=xg.dtype)
    shape = xg.shape
    return {
        "min/max": lambda: _batch_range(xg),
        "min/max + quantise (stochastic)": lambda: quantize(xg, layout, seed=seed),
        "min/max + quantise (nearest)": lambda: quantize(xg, layout, stochastic=False),
        "dequantise": lambda: dequantize(qt),
        "GELU from codes": lambda: _library.dq_gelu(
            qt.data, qt.step, qt.minimum, shape, xg.dtype, "none"
        ),
        "GELU backward from codes": lambda: _library.dq_gelu_backward(
            grad, qt.data, qt.step, qt.minimum, "none"
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--shape", nargs=3, type=int, default=[6304, 8, 192], help="pre G rest")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--min-run-time", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.min_run_time = [1024, 8, 64], 0.05  # 2¹⁹ elements: the fused minimum
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = os.environ.get("EV_MESA_FUSED")
    _use_fused(True)
    suite = BenchmarkSuite("mesa_kernels", min_run_time=args.min_run_time, warmup=2)
    suite.notes.update(
        {
            "threads": torch.get_num_threads(),
            "shape": args.shape,
            "mesa_cpu_kernels": _fused.status() or "fused (inductor)",
        }
    )
    g = torch.Generator().manual_seed(0)
    seed = torch.tensor(12345, dtype=torch.int64)
    try:
        for dtype_name in args.dtypes:
            xg = torch.randn(*args.shape, generator=g).to(DTYPES[dtype_name])
            for fused in (False, True):  # torch path first: the group's baseline
                _use_fused(fused)
                variant = "fused" if fused else "torch path"
                for step, fn in _steps(xg, seed).items():
                    suite.add(
                        variant,
                        fn,
                        group=f"{step}, {dtype_name}",
                        baseline=not fused,
                        numel=xg.numel(),
                    )
    finally:
        if env is None:
            os.environ.pop("EV_MESA_FUSED", None)
        else:
            os.environ["EV_MESA_FUSED"] = env
        _fused.status.cache_clear()
    suite.print_table()
    print(f"\nwrote {suite.write_json(args.out)}")


if __name__ == "__main__":
    main()
