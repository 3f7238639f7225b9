"""MACL vs SimCLR (InfoNCE) on real images: scikit-learn's 8×8 handwritten digits.

A small CNN is pre-trained without labels by :func:`ev_core.ssl.pretrain` (SimCLR arrangement,
in-batch negatives) with InfoNCE and with MACL at several batch sizes and seeds, then frozen
and evaluated by a logistic-regression linear probe (and a weighted k-NN) on a held-out split.
The loss cost itself (forward + backward, InfoNCE as the baseline) is timed with the
benchmark harness. Needs scikit-learn (``pip install ev-core[sklearn]``).

    python packages/ev-core/benchmarks/bench_macl_digits.py --out results/macl_digits.json
    python packages/ev-core/benchmarks/bench_macl_digits.py --quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ev_core.benchmark import BenchmarkSuite
from ev_core.losses import info_nce_loss, macl_loss
from ev_core.progress import set_quiet
from ev_core.repro import seed_everything
from ev_core.ssl import (
    ContrastiveEncoder,
    PretrainConfig,
    ViewBatch,
    extract_features,
    knn_accuracy,
    linear_probe,
    pretrain,
)

PROBE_L2 = [1e-4, 1e-3, 1e-2, 1e-1]
FEW_LABELS = 5  # labelled images per class for the few-label probe
LABEL_DRAWS = 5


def load_digits_split(test_fraction: float = 0.3, seed: int = 0) -> tuple[Tensor, ...]:
    """Digits as ``[N, 1, 8, 8]`` floats in [0, 1], stratified train/test split (fixed seed)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit("this benchmark needs scikit-learn: pip install ev-core[sklearn]") from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, stratify=y.numpy(), random_state=seed)
    return x[tr], y[tr], x[te], y[te]


def augment(x: Tensor) -> Tensor:
    """Batched digit augmentation: rotation ±15°, scale 0.85–1.15, shift ±1.5 px, then
    intensity jitter, Gaussian noise and random pixel dropout. ``x: [B, 1, 8, 8]``."""
    b = x.shape[0]
    angle = (torch.rand(b) * 2 - 1) * math.radians(15)
    scale = 0.85 + 0.3 * torch.rand(b)
    shift = (torch.rand(b, 2) * 2 - 1) * (1.5 / 4.0)  # grid units: 1 px = 2/8
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    out = out * (0.7 + 0.6 * torch.rand(b, 1, 1, 1))
    out = out + 0.1 * torch.randn_like(out)
    keep = (torch.rand_like(out) > 0.1).to(out.dtype)
    return out * keep


def digit_views(batch: Any) -> ViewBatch:
    (x,) = batch
    return ViewBatch(augment(x), augment(x))


def make_encoder(width: int = 32, proj_dim: int = 64) -> ContrastiveEncoder:
    """A 3-layer CNN (8×8 → 4×4 → 2×2, 4·width channels, global average pooling)."""
    c = width
    backbone = nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(inplace=True),
        nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4 * c),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return ContrastiveEncoder(backbone, feature_dim=4 * c, proj_hidden_dim=4 * c, proj_dim=proj_dim)


def few_label_probe(ftr: Tensor, ytr: Tensor, fte: Tensor, yte: Tensor) -> float:
    """Mean test accuracy of linear probes fit on FEW_LABELS labelled images per class
    (LABEL_DRAWS fixed random draws, l2 fixed at 1e-2: too few labels to select it)."""
    accs = []
    for draw in range(LABEL_DRAWS):
        g = torch.Generator().manual_seed(1000 + draw)
        idx = torch.cat(
            [
                torch.nonzero(ytr == c).flatten()[
                    torch.randperm(int((ytr == c).sum()), generator=g)[:FEW_LABELS]
                ]
                for c in range(10)
            ]
        )
        accs.append(linear_probe(ftr[idx], ytr[idx], fte, yte, l2=1e-2, max_iter=200).accuracy)
    return statistics.fmean(accs)


def evaluate(encoder: nn.Module, data: tuple[Tensor, ...]) -> dict[str, float]:
    """Frozen pooled features: full-label linear probe, few-label probe, weighted k-NN."""
    xtr, ytr, xte, yte = data
    ftr, _ = extract_features(encoder, [(xtr, ytr)])
    fte, _ = extract_features(encoder, [(xte, yte)])
    probe = linear_probe(ftr, ytr, fte, yte, l2=PROBE_L2, max_iter=300)
    return {
        "linear": probe.accuracy,
        "few_label": few_label_probe(ftr, ytr, fte, yte),
        "knn": knn_accuracy(ftr, ytr, fte, yte, k=20, temperature=0.07),
        "probe_l2": probe.l2,
    }


def run_one(
    loss: str, batch_size: int, seed: int, epochs: int, data: tuple[Tensor, ...], lr: float
) -> dict[str, Any]:
    seed_everything(seed)
    encoder = make_encoder()
    loader = DataLoader(TensorDataset(data[0]), batch_size=batch_size, shuffle=True, drop_last=True)
    cfg = PretrainConfig(
        method="simclr",
        loss=loss,  # type: ignore[arg-type]
        temperature=0.1,
        macl_alpha=0.5,
        macl_a0=0.0,
        epochs=epochs,
        optimizer="adamw",
        lr=lr,
        lr_scaling="none",
        weight_decay=1e-4,
        warmup_steps=10,
        amp=False,  # fp32: these tiny convolutions gain nothing from bf16 on the CPU
        seed=seed,
        log_every_steps=10**9,
    )
    start = time.perf_counter()
    result = pretrain(encoder, loader, cfg, view_generator=digit_views)
    seconds = time.perf_counter() - start
    last = result.history[-1]
    start = time.perf_counter()
    metrics = evaluate(encoder, data)
    return {
        "loss": loss,
        "batch_size": batch_size,
        "seed": seed,
        "steps": result.step,
        "train_seconds": seconds,
        "final_loss": last["instance"],
        "final_temperature": last["temperature"],
        "final_alignment": last["alignment"],
        "eval_seconds": time.perf_counter() - start,
        **metrics,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


METRICS = ("linear", "few_label", "knn")


def summarise(runs: list[dict[str, Any]], batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Mean ± std per batch size and loss, and the paired (same seed) MACL − InfoNCE gap."""
    summary = []
    for bs in batch_sizes:
        by_loss = {
            loss: sorted(
                (r for r in runs if r["batch_size"] == bs and r["loss"] == loss),
                key=lambda r: r["seed"],
            )
            for loss in ("infonce", "macl")
        }
        row: dict[str, Any] = {"batch_size": bs}
        for loss, sel in by_loss.items():
            row[loss] = {m: mean_std([r[m] for r in sel]) for m in (*METRICS, "final_temperature")}
        row["delta"] = {
            m: mean_std([b[m] - a[m] for a, b in zip(by_loss["infonce"], by_loss["macl"])])
            for m in METRICS
        }
        summary.append(row)
    return summary


def summary_table(summary: list[dict[str, Any]]) -> str:
    def pct(ms: tuple[float, float], sign: bool = False) -> str:
        return f"{100 * ms[0]:{'+' if sign else ''}.2f} ± {100 * ms[1]:.2f}"

    lines = [
        "| batch | metric | SimCLR (InfoNCE) | MACL | MACL − SimCLR (paired) |",
        "|---|---|---|---|---|",
    ]
    names = {"linear": "linear probe", "few_label": f"{FEW_LABELS}-label probe", "knn": "20-NN"}
    for row in summary:
        for m in METRICS:
            lines.append(
                f"| {row['batch_size']} | {names[m]} | {pct(row['infonce'][m])} | "
                f"{pct(row['macl'][m])} | {pct(row['delta'][m], sign=True)} |"
            )
        lines.append(
            f"| {row['batch_size']} | final τ | {row['infonce']['final_temperature'][0]:.3f} | "
            f"{row['macl']['final_temperature'][0]:.3f} | |"
        )
    return "\n".join(lines)


def time_losses(suite: BenchmarkSuite, quick: bool) -> None:
    g = torch.Generator().manual_seed(0)
    for b in [256] if quick else [64, 256, 1024]:
        z1 = torch.randn(b, 128, generator=g, requires_grad=True)
        z2 = torch.randn(b, 128, generator=g, requires_grad=True)

        def nce(z1: Tensor = z1, z2: Tensor = z2) -> None:
            info_nce_loss(z1, z2).loss.backward()

        def macl(z1: Tensor = z1, z2: Tensor = z2) -> None:
            macl_loss(z1, z2).loss.backward()

        group = f"B={b} D=128 fwd+bwd"
        suite.add("InfoNCE", nce, group=group, baseline=True, items_per_call=b)
        suite.add("MACL", macl, group=group, items_per_call=b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 batch sizes")
    parser.add_argument("--out", default=None, help="JSON results path")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
    parser.add_argument("--epochs", type=int, default=15, help="pre-training epochs")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256], help="batch sizes"
    )
    args = parser.parse_args()
    set_quiet(True)
    torch.set_num_threads(1)  # tiny ops: extra OpenMP threads only add overhead
    seeds = 1 if args.quick else args.seeds
    epochs = 2 if args.quick else args.epochs
    batch_sizes = [32, 256] if args.quick else args.batch_sizes

    data = load_digits_split()
    print(f"digits: {len(data[1])} train / {len(data[3])} test images, 8x8")
    raw = linear_probe(data[0].flatten(1), data[1], data[2].flatten(1), data[3], l2=PROBE_L2)
    seed_everything(0)
    random_init = evaluate(make_encoder(), data)
    print(f"raw pixels linear probe: {raw.accuracy:.4f}; random-init CNN: {random_init}")

    runs = []
    for bs in batch_sizes:
        for loss in ("infonce", "macl"):
            for seed in range(seeds):
                r = run_one(loss, bs, seed, epochs, data, args.lr)
                runs.append(r)
                print(
                    f"B={bs:4d} {loss:8s} seed={seed} linear={r['linear']:.4f} "
                    f"few={r['few_label']:.4f} knn={r['knn']:.4f} tau={r['final_temperature']:.4f} "
                    f"A={r['final_alignment']:.3f} ({r['train_seconds']:.1f}s)",
                    flush=True,
                )

    summary = summarise(runs, batch_sizes)
    print("\n" + summary_table(summary))
    suite = BenchmarkSuite("macl_digits", min_run_time=0.2 if args.quick else 1.0)
    time_losses(suite, args.quick)
    suite.print_table()
    suite.notes.update(
        {
            "epochs": epochs,
            "seeds": seeds,
            "lr": args.lr,
            "raw_pixel_linear_probe": raw.accuracy,
            "random_init_cnn": random_init,
            "runs": runs,
            "summary": summary,
        }
    )
    if args.out:
        print(f"\nwrote {suite.write_json(args.out)}")


if __name__ == "__main__":
    main()
