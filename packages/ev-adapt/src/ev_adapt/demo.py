"""``ev adapt demo``: the digits domain shift, MCL against the three baselines of the same trainer."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import torch

from ev_adapt.config import METHODS, AdaptConfig
from ev_adapt.data.digits import digits_shift
from ev_adapt.models import AdaptModelConfig, build_model
from ev_adapt.trainer import train_adaptation
from ev_core.io import write_json

__all__ = ["run_demo"]


def run_demo(out_dir: Path, quick: bool = False, full: bool = False) -> dict[str, Any]:
    """Train every method on the digits shift and compare them.

    Default: 3 shots, 300 steps per method. ``quick``: 60 steps (a smoke test, OT from step
    30). ``full``: 600 steps, 3 and 1 shots.

    Writes ``metrics.json`` and ``target_accuracy.png`` (when matplotlib is installed) into
    ``out_dir`` and prints their paths.

    Returns:
        The metrics: per shots and method, the final raw/EMA target test accuracy.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_plot = importlib.util.find_spec("matplotlib") is not None
    if not has_plot:
        print(
            "matplotlib is not installed: target_accuracy.png will be skipped (pip install matplotlib)"
        )
    steps, eval_every, ot_start = (
        (600, 50, 250) if full else (60, 20, 30) if quick else (300, 50, 250)
    )
    shot_list = (3, 1) if full else (3,)
    model_config = AdaptModelConfig(
        backbone="digits_cnn", num_classes=10, bottleneck_dim=64, in_chans=1
    )
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    metrics: dict[str, Any] = {"steps": steps, "seed": 0, "results": {}}
    start = time.perf_counter()
    threads = torch.get_num_threads()
    for shots in shot_list:
        data = digits_shift(seed=0, shots=shots)
        for method in METHODS:
            torch.manual_seed(0)
            config = AdaptConfig.preset(
                "digits",
                method=method,
                steps=steps,
                eval_every=eval_every,
                ot_start=ot_start,
                device="cpu",
            )
            result = train_adaptation(
                data,
                build_model(model_config),
                config,
                out_dir / f"{shots}shot-{method}",
                model_config,
            )
            curves.setdefault(f"{shots}-shot", {})[method] = [
                (int(e["step"]), e["ema_test_acc"]) for e in result.evaluations
            ]
            metrics["results"].setdefault(f"{shots}-shot", {})[method] = {
                "test_acc": result.final["test_acc"],
                "ema_test_acc": result.final["ema_test_acc"],
            }
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    metrics["torch_threads"] = threads
    metrics_path = write_json(out_dir / "metrics.json", metrics)
    print(f"metrics: {metrics_path}")
    if has_plot:
        figure = _plot(curves, out_dir / "target_accuracy.png")
        metrics["figure"] = str(figure)
        print(f"figure: {figure}")
    return metrics


def _plot(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (title, by_method) in zip(axes[0], curves.items()):
        for method, points in by_method.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=method, linewidth=2.5 if method == "mcl" else 1.5)
        ax.set_title(f"digits → rotated/blurred/inverted digits, {title}")
        ax.set_xlabel("step")
        ax.set_ylabel("target test accuracy, EMA model (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
