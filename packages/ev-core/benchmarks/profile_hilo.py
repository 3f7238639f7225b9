"""torch.profiler table (top ops by self CPU time) of HiLo vs window attention vs SRA.

One LITv2-S stage-3 layer (``C=384, h=12``; HiLo ``s=2, alpha=0.9``; window ``M=7`` with the
Swin bias; SRA ``sr_ratio=2``), eval, no grad, 50 calls each, to see what bounds HiLo at small
maps (per-op overhead vs arithmetic)::

    python packages/ev-core/benchmarks/profile_hilo.py --size 14 --batch 1 --threads 1
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from ev_core.layers import HiLo, SpatialReductionAttention, WindowAttention


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=14)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rows", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    C, h, hw = 384, 12, (args.size, args.size)
    layers = {
        "hilo": HiLo(C, h, qkv_bias=True, window_size=2, alpha=0.9),
        "window": WindowAttention(C, h, window_size=7, rel_pos_bias=True),
        "sra": SpatialReductionAttention(C, h, sr_ratio=2),
    }
    x = torch.randn(args.batch, hw[0] * hw[1], C, dtype=dtype)
    for name, layer in layers.items():
        layer = layer.to(dtype).eval()
        with torch.no_grad():
            for _ in range(5):
                layer(x, hw)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.calls):
                    layer(x, hw)
        total = prof.key_averages().self_cpu_time_total / args.calls
        print(f"\n{name}: {total / 1e3:.3f} ms of op self time per call")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
