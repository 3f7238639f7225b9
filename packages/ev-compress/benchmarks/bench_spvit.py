"""SPViT: search DeiT-S / Swin-T to the paper's FLOPs targets, export, measure; small accuracy run.

Part A (224², the paper's targets, 3.2 GFLOPs = GMACs for both): a **short** search (a few
steps on digits upsampled to 224², from random init: no pretrained weights offline; the paper
searches 10–12 ImageNet epochs) that drives the gates to the FLOPs target; then the exported
model's measured FLOPs (``ev_core.flops.count_flops``), parameters, and CPU throughput (eval,
no grad, fp32) against the unpruned model timed in the same run (the group's baseline).

Part B (small scale, 64², digits): the same two architectures trained from the same random init
for the same number of steps, (i) unpruned, (ii) half the steps searching to the same FLOPs
fraction, half fine-tuning the found choices; test accuracy of the unpruned vs the exported model.

    python packages/ev-compress/benchmarks/bench_spvit.py --out spvit_cpu.json
    python packages/ev-compress/benchmarks/bench_spvit.py --quick
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import ev_core  # noqa: F401  (registers the ev models)
from ev_compress import spvit
from ev_compress.spvit.data import digits_split
from ev_core.benchmark import BenchmarkSuite
from ev_core.flops import count_flops
from ev_core.training import Engine, EngineConfig

PAPER = {  # model → (paper target GFLOPs, paper result: params M, GFLOPs, top-1)
    "deit_small_patch16_224": (3.2, (16.4, 3.3, 78.3)),
    "swin_tiny_patch4_window7_224": (3.2, (26.3, 3.3, 80.1)),
}
#: The paper's searched block choices (SYSTEMS.md §2.3): DeiT-S block 0 → 1×1; Swin-T stages
#: 1–2: block 0 → 1×1, block 1 skipped; every other block keeps its MSA.
PAPER_CHOICES = {
    "deit_small_patch16_224": ["conv1x1"] + ["attention"] * 11,
    "swin_tiny_patch4_window7_224": ["conv1x1", "skip", "conv1x1", "skip"] + ["attention"] * 8,
}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _loader(data: Any, batch: int, seed: int, n: int | None = None) -> DataLoader:
    if n is not None:
        data = Subset(data, range(min(n, len(data))))
    return DataLoader(
        data, batch_size=batch, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def _train(model: torch.nn.Module, loader: DataLoader, steps: int, lr: float, seed: int) -> None:
    def step(net: torch.nn.Module, batch: Any, eng: Engine) -> dict[str, torch.Tensor]:
        x, y = eng.to_device(batch)
        return {"loss": F.cross_entropy(net(x), y)}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    cfg = EngineConfig(epochs=10**6, max_steps=steps, device="cpu", amp="off", seed=seed)
    Engine(model, opt, cfg, name="train").fit(loader, step, resume=False)


def _accuracy(model: torch.nn.Module, data: Any) -> float:
    x, y = data.tensors
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 128):
            correct += int((model(x[i : i + 128]).argmax(-1) == y[i : i + 128]).sum())
    return correct / len(y)


def part_a(name: str, args: argparse.Namespace, suite: BenchmarkSuite) -> dict[str, Any]:
    target, paper = PAPER[name]
    torch.manual_seed(args.seed)
    model = timm.create_model(name, num_classes=10).eval()
    original = _params(model)
    base = count_flops(model, (3, 224, 224)).gmacs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spvit.convert(model, theta=args.theta, model_name=name, model_kwargs={"num_classes": 10})
    if args.paper_choices:  # the attention choices are the paper's; only the FFN gates search
        spvit.force_choice(model, PAPER_CHOICES[name], ffn=None)
    train, _ = digits_split(224, seed=args.seed)
    cfg = spvit.SearchConfig(
        flops_lambda=None, lr=args.lr, arch_lr=args.arch_lr, schedule="cosine", epochs=10**6,
        max_steps=args.search_steps, device="cpu", amp="off", seed=args.seed, log_every=1,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = spvit.search(
        model, _loader(train, args.batch, args.seed), target, config=cfg, resume=False
    )
    search_s = time.perf_counter() - t0
    small = spvit.export(model)
    measured = count_flops(small, (3, 224, 224)).gmacs
    x = torch.randn(args.bench_batch, 3, 224, 224)
    ref = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        suite.add(f"{name} unpruned", lambda: ref(x), group=name, baseline=True,
                  items_per_call=args.bench_batch, gmacs=base, params=original)  # fmt: skip
        label = (
            "SPViT export (paper choices, FFN searched)" if args.paper_choices else "SPViT export"
        )
        suite.add(f"{name} {label}", lambda: small(x), group=name,
                  items_per_call=args.bench_batch, gmacs=measured, params=_params(small))  # fmt: skip
    return {
        "model": name,
        "attention_choices": "paper (forced)" if args.paper_choices else "searched",
        "target_gflops": target,
        "original_gflops": base,
        "searched_gflops_model": result.gflops,
        "exported_gflops_measured": measured,
        "within_5_percent": abs(measured - target) / target < 0.05,
        "original_params": original,
        "exported_params": _params(small),
        "choices": result.choices,
        "ffn_kept_fraction": sum(result.ffn_kept) / sum(result.ffn_total),
        "search_steps": result.steps,
        "search_batch": args.batch,
        "search_seconds": round(search_s, 1),
        "gflops_per_step": [round(h["gflops"], 4) for h in result.history],
        "paper": {"params_m": paper[0], "gflops": paper[1], "top1": paper[2]},
    }


def part_b(name: str, args: argparse.Namespace) -> dict[str, Any]:
    fraction = PAPER[name][0] / count_flops(timm.create_model(name), (3, 224, 224)).gmacs
    size = args.small_size
    train, test = digits_split(size, seed=args.seed)
    loader = _loader(train, args.small_batch, args.seed)
    kw = {"num_classes": 10, "img_size": size}
    torch.manual_seed(args.seed)
    unpruned = timm.create_model(name, **kw)
    pruned = timm.create_model(name, **kw)
    pruned.load_state_dict(unpruned.state_dict())
    t0 = time.perf_counter()
    _train(unpruned, loader, args.small_steps, args.small_lr, args.seed)
    acc_unpruned = _accuracy(unpruned, test)
    spvit.convert(pruned, theta=args.theta, model_name=name, model_kwargs=kw)
    original = float(spvit.model_gflops(pruned, differentiable=False))
    cfg = spvit.SearchConfig(
        flops_lambda=None, lr=args.small_lr, arch_lr=args.arch_lr, schedule="cosine",
        epochs=10**6, max_steps=args.small_steps // 2, device="cpu", amp="off", seed=args.seed,
    )  # fmt: skip
    result = spvit.search(pruned, loader, fraction * original, config=cfg, resume=False)
    spvit.force_choice(pruned, "searched", ffn="searched")
    _train(pruned, loader, args.small_steps - args.small_steps // 2, args.small_lr, args.seed + 1)
    small = spvit.export(pruned)
    return {
        "model": name,
        "img_size": size,
        "steps": args.small_steps,
        "batch": args.small_batch,
        "flops_fraction_target": fraction,
        "exported_flops_fraction": count_flops(small, (3, size, size)).gmacs
        / count_flops(unpruned, (3, size, size)).gmacs,
        "choices": result.choices,
        "unpruned_test_top1": acc_unpruned,
        "spvit_exported_test_top1": _accuracy(small, test),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(PAPER))
    p.add_argument("--search-steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bench-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--arch-lr", type=float, default=0.1)
    p.add_argument("--theta", type=float, default=0.4)
    p.add_argument("--small-size", type=int, default=64)
    p.add_argument("--small-steps", type=int, default=60)
    p.add_argument("--small-batch", type=int, default=32)
    p.add_argument("--small-lr", type=float, default=1e-3)
    p.add_argument("--min-run-time", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument(
        "--paper-choices",
        action="store_true",
        help="force the paper's per-block choices and search only the FFN gates (part A)",
    )
    p.add_argument("--skip-search", action="store_true", help="only the accuracy part")
    p.add_argument("--quick", action="store_true", help="2 search steps, no accuracy part")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.search_steps, args.skip_accuracy, args.min_run_time = 2, True, 0.2
    torch.set_num_threads(args.threads)
    suite = BenchmarkSuite("spvit", device="cpu", min_run_time=args.min_run_time, warmup=1)
    suite.notes["part_a"] = (
        [] if args.skip_search else [part_a(m, args, suite) for m in args.models]
    )
    if not args.skip_accuracy:
        suite.notes["part_b"] = [part_b(m, args) for m in args.models]
    suite.notes["args"] = vars(args)
    suite.print_table()
    for row in suite.notes["part_a"]:
        print({k: v for k, v in row.items() if k != "gflops_per_step"})
    for row in suite.notes.get("part_b", []):
        print(row)
    print("wrote", suite.write_json(args.out))


if __name__ == "__main__":
    main()
