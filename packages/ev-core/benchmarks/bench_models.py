"""Whole-model throughput / peak memory: ev's LITv2-S and LIT-S against timm baselines.

Rows: images/s and peak memory for ``litv2_s``, ``lit_s`` and timm's
``swin_tiny_patch4_window7_224`` (the baseline of every group), ``pvt_v2_b2``, ``convnext_tiny``,
``deit_small_patch16_224``; inference (eval, no_grad) and a training step (forward, backward,
AdamW step); fp32 and bf16 autocast; eager and ``torch.compile``. A second suite compares the
DTM fast path with the torchvision reference (fwd and fwd+bwd; bf16 only the fast path runs).

    python packages/ev-core/benchmarks/bench_models.py --quick
    python packages/ev-core/benchmarks/bench_models.py --batch-sizes 64 256 --out models.json
    python packages/ev-core/benchmarks/bench_models.py --device cpu --batch-sizes 8 \\
        --modes eager --dtypes fp32 bf16 --out cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import nn

import ev_core  # noqa: F401  (registers the ev models)
from ev_core.benchmark import BenchmarkSuite
from ev_core.layers.dtm import DeformableTokenMerging, DTMPath
from ev_core.progress import progress

MODELS = (
    "swin_tiny_patch4_window7_224",
    "litv2_s",
    "lit_s",
    "pvt_v2_b2",
    "convnext_tiny",
    "deit_small_patch16_224",
)
BASELINE = "swin_tiny_patch4_window7_224"
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _inference_fn(
    model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None
) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad(), _autocast(x.device, dtype):
            return model(x)

    return run


def _train_fn(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def run() -> Any:
        with _autocast(x.device, dtype):
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return run


def _configs(args: argparse.Namespace) -> Iterator[tuple[str, int, str, str]]:
    for task in args.tasks:
        for bs in args.batch_sizes:
            for dt in args.dtypes:
                for mode in args.modes:
                    yield task, bs, dt, mode


def bench_models(args: argparse.Namespace, device: torch.device) -> BenchmarkSuite:
    suite = BenchmarkSuite(
        "ev-core models", device=device, min_run_time=args.min_run_time, warmup=args.warmup
    )
    suite.notes["img_size"] = args.img_size
    for task, bs, dt, mode in progress(list(_configs(args)), desc="model configs"):
        group = f"{task} bs{bs} {dt} {mode}"
        for name in args.models:
            model = timm.create_model(name, num_classes=1000).to(device)
            model = model.to(memory_format=torch.channels_last)
            x = torch.randn(bs, 3, args.img_size, args.img_size, device=device)
            x = x.contiguous(memory_format=torch.channels_last)
            if task == "infer":
                model.eval()
            else:
                model.train()
            runner = cast(nn.Module, torch.compile(model)) if mode == "compile" else model
            fn = (_inference_fn if task == "infer" else _train_fn)(runner, x, DTYPES[dt])
            try:
                suite.add(
                    name, fn, group=group, baseline=name == BASELINE, memory=True,
                    items_per_call=bs, batch=bs, dtype=dt, mode=mode, task=task,
                )  # fmt: skip
            except (RuntimeError, torch.OutOfMemoryError) as err:  # e.g. CUDA OOM at bs 256
                suite.add_failure(name, group, f"{type(err).__name__}: {str(err)[:200]}")
            del model, runner, fn, x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return suite


def _saved_mib(fn: Callable[[], Any]) -> float:
    """MiB of the tensors autograd saves for the backward during one call of ``fn``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total / 2**20


def bench_dtm(args: argparse.Namespace, device: torch.device) -> BenchmarkSuite:
    """DTM fast path vs torchvision reference on a LITv2-S stage-1 map."""
    suite = BenchmarkSuite(
        "ev-core DTM", device=device, min_run_time=args.min_run_time, warmup=args.warmup
    )
    B, C, H = args.dtm_batch, 96, args.img_size // 4
    for dt in args.dtypes:
        dtype = torch.float32 if dt == "fp32" else torch.bfloat16
        for task in ("fwd", "fwd+bwd"):
            group = f"DTM {C}->{2 * C} {H}x{H} bs{B} {dt} {task}"
            # "fast" recomputes the gathers in its backward, "fast-autograd" keeps them
            paths = ["torchvision", "fast"] + (["fast-autograd"] if task == "fwd+bwd" else [])
            for path in paths:
                if path == "torchvision" and dtype == torch.bfloat16 and device.type == "cpu":
                    continue  # torchvision has no bf16 CPU deform_conv2d kernel
                dtm_path: DTMPath = "torchvision" if path == "torchvision" else "fast"
                recompute = path != "fast-autograd"
                dtm = DeformableTokenMerging(C, 2 * C, path=dtm_path, recompute=recompute)
                dtm = dtm.to(device, dtype)
                with torch.no_grad():
                    dtm.dconv.conv_offset.weight.normal_(0, 0.05)
                x = torch.randn(B, H * H, C, device=device, dtype=dtype, requires_grad=True)

                def run(dtm: nn.Module = dtm, x: torch.Tensor = x, task: str = task) -> Any:
                    if task == "fwd":
                        with torch.no_grad():
                            return dtm(x, (H, H))
                    out, _ = dtm(x, (H, H))
                    out.float().square().mean().backward()
                    return out

                saved = _saved_mib(run) if task == "fwd+bwd" else None
                suite.add(path, run, group=group, baseline=path == "torchvision", memory=True,
                          items_per_call=B, dtype=dt, task=task, saved_mib=saved)  # fmt: skip
    return suite


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", choices=["eager", "compile"],
                        default=["eager", "compile"])  # fmt: skip
    parser.add_argument("--tasks", nargs="+", choices=["infer", "train"],
                        default=["infer", "train"])  # fmt: skip
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtm-batch", type=int, default=32)
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.models = ["swin_tiny_patch4_window7_224", "litv2_s", "lit_s"]
        args.batch_sizes, args.dtypes, args.modes = [1], ["fp32"], ["eager"]
        args.tasks, args.dtm_batch = ["infer"], 2
        args.min_run_time, args.warmup = 0.05, 1
    device = torch.device(args.device)
    models = bench_models(args, device)
    models.print_table()
    dtm = bench_dtm(args, device)
    dtm.print_table()
    if args.out is not None:
        models.write_json(args.out)
        dtm.write_json(args.out.with_name(args.out.stem + "_dtm.json"))


if __name__ == "__main__":
    main()
