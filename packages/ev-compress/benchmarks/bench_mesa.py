"""Mesa vs baseline training: peak memory, step time, saved activations, batch headroom.

For each model, batch size and precision (fp32 and/or AMP) one training step (forward,
cross-entropy, backward, AdamW) is timed for the unconverted model (the group's baseline) and
for the same model after ``ev_compress.mesa.convert``. Memory: the peak during one step
(``ev_core.benchmark``: ``torch.cuda.max_memory_allocated`` above the memory in use before the
step on a GPU, peak RSS on the CPU), and the activation bytes saved for backward by one forward
(:class:`ev_compress.mesa.SavedTensorMeter` with ``activations_only``: parameters and
autocast's casted weight copies are not activations and are excluded). How much larger a batch fits
in the baseline's memory: ``headroom_peak`` = (baseline peak − gradient bytes) / (Mesa peak −
gradient bytes) (GPU; the activation part scales with the batch) and ``headroom_saved`` =
baseline / Mesa saved activations (the activation-only bound; the CPU figure, RSS being noisy).

    python packages/ev-compress/benchmarks/bench_mesa.py --quick
    python packages/ev-compress/benchmarks/bench_mesa.py --device cuda --batch-sizes 64 128 \\
        --out mesa_gpu.json
    python packages/ev-compress/benchmarks/bench_mesa.py --device cpu --threads 2 \\
        --models deit_small_patch16_224 --batch-sizes 32 --amp none bf16 --out mesa_cpu.json
    python packages/ev-compress/benchmarks/bench_mesa.py ... --compile    # + compiled pair

``--compile`` adds, per configuration, a second group: the baseline and the Mesa model each
under ``torch.compile(model, fullgraph=True)`` (inductor unless ``--compile-backend``), compiled
Mesa compared with the compiled baseline; the compile time (the first calls: a converted model
is traced twice, the first call creating its running estimates) is stored as ``compile_s``.
``--torch-path`` (CPU) adds a third row per group: Mesa with its fused CPU kernels switched off
(``EV_MESA_FUSED=0``: the vectorised torch quantisation). The warm-up calls also compile the fused
kernels; the JSON notes say whether they ran (``mesa_cpu_kernels``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
from torch import nn

import ev_core  # noqa: F401  (registers the ev models, litv2_s)
from ev_compress import mesa
from ev_compress.mesa import _fused
from ev_core.benchmark import BenchmarkSuite
from ev_core.progress import progress

MODELS = ("deit_small_patch16_224", "swin_tiny_patch4_window7_224", "pvt_v2_b2", "litv2_s")
AMP = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}


def _make(name: str, img_size: int) -> nn.Module:
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {}
    if img_size != 224:
        kwargs["img_size"] = img_size
    return timm.create_model(name, **kwargs)


def _train_step(
    model: nn.Module, x: torch.Tensor, amp: torch.dtype | None
) -> Callable[[], torch.Tensor]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp == torch.float16)
    ctx: Callable[[], contextlib.AbstractContextManager[Any]] = (
        (lambda: torch.autocast(x.device.type, dtype=amp))
        if amp is not None
        else contextlib.nullcontext
    )

    def step() -> torch.Tensor:
        with ctx():
            loss = nn.functional.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _compiled_step(
    model: nn.Module, x: torch.Tensor, amp: torch.dtype | None, backend: str
) -> tuple[nn.Module, Callable[[], torch.Tensor], float]:
    """``torch.compile(model, fullgraph=True)``, its training step and its compile time (the
    two first steps: Mesa's first call creates the estimates, the second traces with them)."""
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    step = _train_step(compiled, x, amp)
    start = time.perf_counter()
    for _ in range(2):
        step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return compiled, step, time.perf_counter() - start


_FUSED_ENV = os.environ.get("EV_MESA_FUSED")


def _use_fused(on: bool) -> None:
    """Mesa's CPU kernels as the environment says (``on``) or forced to the torch path."""
    if not on:
        os.environ["EV_MESA_FUSED"] = "0"
    elif _FUSED_ENV is None:
        os.environ.pop("EV_MESA_FUSED", None)
    else:
        os.environ["EV_MESA_FUSED"] = _FUSED_ENV
    _fused.status.cache_clear()


def _saved_bytes(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> int:
    ctx = torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx, mesa.SavedTensorMeter(model.parameters(), activations_only=True) as meter:
        out = model(x)
    del out
    return meter.total_bytes


def _ratios(base: Any, ours: Any) -> None:
    """Mesa-vs-baseline ratios of one group, stored in the Mesa row."""
    if not (base and ours):
        return
    grad_mib = ours.extra["grad_mib"]
    ours.extra["saved_activation_ratio"] = (
        ours.extra["saved_activation_mib"] / base.extra["saved_activation_mib"]
    )
    ours.extra["headroom_saved"] = 1.0 / ours.extra["saved_activation_ratio"]
    ours.extra["step_time_ratio"] = ours.median_ms / base.median_ms
    if (
        base.peak_memory_mib
        and ours.peak_memory_mib
        and ours.peak_memory_mib > grad_mib
        and base.peak_memory_mib > grad_mib
    ):
        ours.extra["headroom_peak"] = (base.peak_memory_mib - grad_mib) / (
            ours.peak_memory_mib - grad_mib
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--amp",
        nargs="+",
        choices=list(AMP),
        default=None,
        help="precisions to run, each a group (default: fp16 on CUDA; none and bf16 on the CPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time both models under torch.compile(fullgraph=True), in a second group",
    )
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--torch-path",
        action="store_true",
        help="CPU: also time Mesa on its vectorised torch path (EV_MESA_FUSED=0), the "
        "quantisation before the fused kernels",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.img_size, args.min_run_time = (
            ["deit_small_patch16_224"],
            [2],
            64,
            0.05,
        )
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    amp_names = args.amp or (["fp16"] if device.type == "cuda" else ["none", "bf16"])
    suite = BenchmarkSuite(
        "mesa",
        device=device,
        min_run_time=args.min_run_time,
        warmup=1 if args.quick or device.type == "cpu" else 3,
    )
    suite.notes.update(
        {
            "amp": amp_names,
            "threads": torch.get_num_threads(),
            "img_size": args.img_size,
            "compile_backend": args.compile_backend if args.compile else None,
            "mesa_cpu_kernels": _fused.status() or "fused (inductor)",
            "policy": mesa.MesaPolicy().to_dict(),
            "peak_memory": "cuda max_memory_allocated above the step's start"
            if device.type == "cuda"
            else "peak RSS above the step's start (sampled, noisy)",
        }
    )
    configs = [(m, bs, a) for m in args.models for bs in args.batch_sizes for a in amp_names]
    for name, bs, amp_name in progress(configs, desc="mesa bench"):
        amp = AMP[amp_name]
        x = torch.randn(bs, 3, args.img_size, args.img_size, device=device)
        modes = [False, True] if args.compile else [False]
        for compiled in modes:
            group = f"{name} bs{bs} {amp_name}" + (" compiled" if compiled else "")
            rows = {}
            variants = ["baseline", "mesa"]
            if args.torch_path and device.type == "cpu" and not compiled:
                variants.append("mesa, torch path")
            for variant in variants:
                torch_path = variant == "mesa, torch path"
                _use_fused(not torch_path)
                model = _make(name, args.img_size).to(device)
                if variant != "baseline":
                    mesa.convert(model)
                grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                extra: dict[str, Any] = {}
                try:
                    if compiled:
                        fn, step, extra["compile_s"] = _compiled_step(
                            model, x, amp, args.compile_backend
                        )
                        saved = _saved_bytes(fn, x, amp)  # what the compiled graph keeps
                    else:
                        saved = _saved_bytes(model, x, amp)
                        step = _train_step(model, x, amp)
                    rows[variant] = suite.add(
                        variant + (" compiled" if compiled else ""),
                        step,
                        group=group,
                        baseline=variant == "baseline",
                        memory=True,
                        items_per_call=bs,
                        saved_activation_mib=saved / 2**20,
                        grad_mib=grad_bytes / 2**20,
                        model=name,
                        batch_size=bs,
                        **extra,
                    )
                except torch.OutOfMemoryError as exc:
                    suite.add_failure(variant, group, f"out of memory: {exc}".splitlines()[0])
                _use_fused(True)
                del model
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            _ratios(rows.get("baseline"), rows.get("mesa"))
            _ratios(rows.get("baseline"), rows.get("mesa, torch path"))
    suite.print_table()
    print(
        "\n| group | step time ratio | activations MiB (base → Mesa) | ratio | "
        "headroom (saved / peak) |"
    )
    print("|---|---|---|---|---|")
    for row in suite.rows:
        if row.extra.get("saved_activation_ratio") is not None:
            base = next(r for r in suite.rows if r.group == row.group and r.baseline)
            peak = row.extra.get("headroom_peak")
            print(
                f"| {row.group} | {row.extra['step_time_ratio']:.2f}× | "
                f"{base.extra['saved_activation_mib']:.1f} → "
                f"{row.extra['saved_activation_mib']:.1f} | "
                f"{row.extra['saved_activation_ratio']:.2f} | "
                f"{row.extra['headroom_saved']:.2f}× / "
                f"{'–' if peak is None else format(peak, '.2f') + '×'} |"
            )
    if args.out:
        print(f"wrote {suite.write_json(args.out)}")


if __name__ == "__main__":
    main()
