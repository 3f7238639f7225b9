"""Attention layers (MSA, local window, spatial reduction, HiLo) across resolutions.

Every resolution × dtype × mode (forward, forward+backward) is one group; the SRA row is the
group's baseline (ratio = SRA time / row time, so HiLo's ratio is its speed-up over SRA). A
summary adds HiLo's speed-up over SRA and over local window attention: the LITv2 paper's CPU
claims are 1.4× and 1.6×.

Layer settings (LITv2 stage-3 width, the paper's comparison): ``C=384, h=12``; HiLo
``window_size=2, alpha=0.9``; SRA ``sr_ratio=2`` (strided conv + LN); window attention
``M=7`` with a relative position bias, unshifted; MSA global. Modules run in the benchmark dtype
(``.to(bfloat16)``, no autocast). Attention goes through ev's default backend (``auto`` = SDPA)
unless ``--backend`` says otherwise.

Usage::

    python packages/ev-core/benchmarks/bench_attention.py --quick
    python packages/ev-core/benchmarks/bench_attention.py --device cuda --out results/attn.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ev_core.benchmark import BenchmarkSuite
from ev_core.layers.attention import MultiHeadSelfAttention, set_attention_backend
from ev_core.layers.hilo import HiLo
from ev_core.layers.sra import SpatialReductionAttention
from ev_core.layers.window import WindowAttention
from ev_core.progress import progress

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYERS = ("msa", "window", "sra", "hilo")


def build_layers(
    dim: int, heads: int, alpha: float, hilo_ws: int, sr_ratio: int, window: int
) -> dict[str, nn.Module]:
    """The four layers at one width (official defaults: qkv bias on, HiLo's off)."""
    return {
        "msa": MultiHeadSelfAttention(dim, heads),
        "window": WindowAttention(dim, heads, window_size=window, rel_pos_bias=True),
        "sra": SpatialReductionAttention(dim, heads, sr_ratio=sr_ratio),
        "hilo": HiLo(dim, heads, window_size=hilo_ws, alpha=alpha),
    }


def make_step(
    layer: nn.Module, x: Tensor, hw: tuple[int, int], backward: bool
) -> Callable[[], Any]:
    """A zero-argument call: forward (no grad) or forward + backward w.r.t. input and weights."""
    if not backward:

        def forward() -> Tensor:
            with torch.no_grad():
                return layer(x, hw)

        return forward
    x = x.detach().requires_grad_(True)
    grad = torch.randn(x.shape, dtype=x.dtype, device=x.device)

    def forward_backward() -> None:
        layer(x, hw).backward(grad)
        x.grad = None

    return forward_backward


def paired_speedups(
    steps: dict[str, Callable[[], Any]], rounds: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """HiLo's speed-up over every other layer from interleaved, paired timings.

    Each round times every layer once (rotating the order) and takes the ratio
    ``t_other / t_hilo`` *within* the round, so slow drifts of a shared machine's load cancel;
    the quartiles of the per-round ratios are returned.
    """
    names = list(steps)
    ratios: dict[str, list[float]] = {n: [] for n in names if n != "hilo"}
    for r in range(rounds):
        shift = r % len(names)
        times: dict[str, float] = {}
        for name in names[shift:] + names[:shift]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name] = time.perf_counter() - start
        for name in ratios:
            ratios[name].append(times[name] / times["hilo"])
    out = {}
    for name, values in ratios.items():
        q1, med, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        out[name] = {"median": med, "q1": q1, "q3": q3, "rounds": len(values)}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny sizes)")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolutions", type=int, nargs="+", default=[14, 28, 56, 112])
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="batch per resolution (default: 1 on CPU; 64,16,16,4 on CUDA)",
    )
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--hilo-window", type=int, default=2)
    p.add_argument("--sr-ratio", type=int, default=2)
    p.add_argument("--window", type=int, default=7)
    p.add_argument(
        "--max-msa-tokens",
        type=int,
        default=None,
        help="skip global MSA above this many tokens (default: 3136 on CPU)",
    )
    p.add_argument("--backend", default="auto", help="ev attention backend (auto, math, ...)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per row")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--paired-rounds",
        type=int,
        default=0,
        help="also measure HiLo's speed-ups from N interleaved rounds (robust on busy machines)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.resolutions, args.dim, args.heads = [14], 64, 4
        args.modes = ["fwd", "fwd+bwd"]
        args.min_run_time = 0.05 if args.min_run_time is None else args.min_run_time
    return args


def main(argv: list[str] | None = None) -> BenchmarkSuite:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    set_attention_backend(args.backend)
    batches = args.batch or ([64, 16, 16, 4] if cuda else [1] * 4)
    if len(batches) == 1:
        batches = batches * len(args.resolutions)
    if len(batches) < len(args.resolutions):
        raise SystemExit("--batch needs one value per resolution")
    max_msa = args.max_msa_tokens if args.max_msa_tokens is not None else (None if cuda else 3136)
    min_run = args.min_run_time if args.min_run_time is not None else (1.0 if cuda else 0.5)
    suite = BenchmarkSuite(
        "attention", device=device, min_run_time=min_run, warmup=2 if args.quick else 3
    )
    suite.notes.update(
        dim=args.dim,
        heads=args.heads,
        alpha=args.alpha,
        hilo_window=args.hilo_window,
        sr_ratio=args.sr_ratio,
        window=args.window,
        backend=args.backend,
        threads=torch.get_num_threads(),
        quick=args.quick,
    )
    torch.manual_seed(0)
    layers = build_layers(
        args.dim, args.heads, args.alpha, args.hilo_window, args.sr_ratio, args.window
    )
    jobs = [
        (res, batch, dt, mode)
        for res, batch in zip(args.resolutions, batches)
        for dt in args.dtypes
        for mode in args.modes
    ]
    paired: dict[str, dict[str, dict[str, float]]] = {}
    for res, batch, dt, mode in progress(jobs, desc="attention bench"):
        dtype = DTYPES[dt]
        group = f"{res}x{res} B{batch} {dt} {mode}"
        x = torch.randn(batch, res * res, args.dim, device=device, dtype=dtype)
        steps: dict[str, Callable[[], Any]] = {}
        for name in ("sra", "msa", "window", "hilo"):  # baseline first
            layer = layers[name].to(device=device, dtype=dtype).train(mode == "fwd+bwd")
            extra = {"layer": name, "resolution": res, "batch": batch, "dtype": dt, "mode": mode}
            if name == "msa" and max_msa is not None and res * res > max_msa:
                suite.add_failure(name, group, f"skipped: N={res * res} > {max_msa}", **extra)
                continue
            try:
                step = steps[name] = make_step(layer, x, (res, res), backward=mode == "fwd+bwd")
                suite.add(
                    name,
                    step,
                    group=group,
                    baseline=name == "sra",
                    memory=cuda,
                    items_per_call=batch,
                    **extra,
                )
            except torch.OutOfMemoryError as err:
                suite.add_failure(name, group, f"out of memory: {err}".splitlines()[0], **extra)
                steps.pop(name, None)
                torch.cuda.empty_cache()
        if args.paired_rounds and "hilo" in steps:
            paired[group] = paired_speedups(steps, args.paired_rounds, device)
    suite.print_table()
    summary = summarize(suite)
    suite.notes["hilo_speedups"] = summary
    print("\n## HiLo speed-up (time of the other layer / HiLo time)\n")
    print("| group | HiLo vs SRA | HiLo vs window | HiLo vs MSA |")
    print("|---|---|---|---|")
    for group, s in summary.items():
        cells = [f"{s[k]:.2f}×" if s.get(k) else "–" for k in ("sra", "window", "msa")]
        print(f"| {group} | " + " | ".join(cells) + " |")
    if paired:
        suite.notes["hilo_paired_speedups"] = paired
        print(f"\n## HiLo speed-up, paired over {args.paired_rounds} interleaved rounds")
        print("(median [q1–q3] of per-round t_other / t_hilo)\n")
        print("| group | HiLo vs SRA | HiLo vs window | HiLo vs MSA |")
        print("|---|---|---|---|")
        for group, sp in paired.items():
            cells = [
                f"{sp[k]['median']:.2f}× [{sp[k]['q1']:.2f}–{sp[k]['q3']:.2f}]" if k in sp else "–"
                for k in ("sra", "window", "msa")
            ]
            print(f"| {group} | " + " | ".join(cells) + " |")
    if args.out:
        print(f"\nwrote {suite.write_json(args.out)}")
    return suite


def summarize(suite: BenchmarkSuite) -> dict[str, dict[str, float]]:
    """Per group: other layer's median time / HiLo's median time."""
    out: dict[str, dict[str, float]] = {}
    groups = dict.fromkeys(r.group for r in suite.rows)
    for group in groups:
        times = {r.name: r.median_ms for r in suite.rows if r.group == group and r.runs > 0}
        if "hilo" in times:
            out[group] = {k: t / times["hilo"] for k, t in times.items() if k != "hilo"}
    return out


if __name__ == "__main__":
    main()
