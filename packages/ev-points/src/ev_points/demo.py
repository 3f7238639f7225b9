"""``ev demo`` for ev-points: PointMatch vs the labelled-points-only baseline on synthetic rooms.

Both methods train the same small point U-Net, from the same seed, the same sparse labels and the
same supervised term, on generated indoor scenes (floor, walls, tables, chairs, bookcases, sofas,
clutter); both are evaluated with the EMA of their weights (PointMatch's teacher) on held-out
scenes (all points). The default run is a short look (PointMatch's gain needs several hundred
steps on this data, BENCHMARKS.md); ``--full`` runs the benchmark's 0.1 % configuration for one
seed (minutes). Writes ``metrics.json`` (mIoU/OA/mAcc/per-class IoU
of each method, the settings, timings), ``config.json`` and ``topdown.png`` (a held-out room
seen from above: true labels, baseline, PointMatch). The figure needs matplotlib
(``pip install 'ev-points[plot]'``); without it the metrics are still written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ev_core.io import write_json
from ev_core.repro import dump_run_config
from ev_core.training import EngineConfig
from ev_points.data import SYNTHETIC_CLASSES, SyntheticSceneConfig, make_synthetic_scenes
from ev_points.models import PointUNetConfig
from ev_points.pointmatch import PointMatchConfig, evaluate, predict_scene, train_pointmatch

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of the ev-points demo (defaults sized for ≈30 s on 2 idle CPU cores).

    Attributes:
        train_scenes / val_scenes: synthetic rooms for training / evaluation.
        scene: the generator's settings for the training rooms (the label ratio applies to
            their points; the model trains on ``num_points`` subsets).
        val_points: points per held-out room.
        label_ratio: fraction of each training room's points labelled (None: use
            ``points_per_class``).
        points_per_class: labelled points per class and room (the default: one).
        steps: optimizer steps of each method.
        batch_size / num_points: samples per step, points per sample.
        threads: CPU threads while training.
        seed: seed of the scenes, the labels and the weights.
    """

    train_scenes: int = 6
    val_scenes: int = 3
    scene: SyntheticSceneConfig = field(
        default_factory=lambda: SyntheticSceneConfig(num_points=2048)
    )
    val_points: int = 2048
    label_ratio: float | None = None
    points_per_class: int | None = 1
    steps: int = 40
    batch_size: int = 4
    num_points: int = 1024
    threads: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """A few seconds: fewer, smaller rooms and steps."""
        return cls(train_scenes=3, val_scenes=1, scene=SyntheticSceneConfig(num_points=768), val_points=768,
                   steps=8, batch_size=2, num_points=384, threads=1)  # fmt: skip

    @classmethod
    def full(cls) -> DemoConfig:
        """Minutes: the benchmark's 0.1 % setting for one seed (BENCHMARKS.md)."""
        return cls(
            train_scenes=8,
            val_scenes=4,
            scene=SyntheticSceneConfig(num_points=16384),
            val_points=2048,
            label_ratio=0.001,
            points_per_class=None,
            steps=600,
            num_points=1024,
        )


def _train_both(cfg: DemoConfig) -> dict[str, Any]:
    names = SYNTHETIC_CLASSES
    train = make_synthetic_scenes(cfg.train_scenes, cfg.seed, cfg.scene)
    val_scene = dataclasses.replace(cfg.scene, num_points=cfg.val_points)
    val = make_synthetic_scenes(cfg.val_scenes, cfg.seed + 10_000, val_scene)
    results: dict[str, Any] = {}
    for method in ("labelled-only", "pointmatch"):
        pm = PointMatchConfig(
            method=method, label_ratio=cfg.label_ratio, points_per_class=cfg.points_per_class, label_seed=cfg.seed, num_points=cfg.num_points,
            batch_size=cfg.batch_size, steps=cfg.steps, lr=5e-3, ema_decay=0.99,
            model=PointUNetConfig.tiny(len(names)),
            engine=EngineConfig(device="cpu", amp="off", seed=cfg.seed, log_every=max(1, cfg.steps // 10), eval_every=0),
        )  # fmt: skip
        start = time.perf_counter()
        outcome = train_pointmatch(train, len(names), pm)
        seconds = time.perf_counter() - start
        final = outcome.teacher if outcome.teacher is not None else outcome.model
        metrics = evaluate(final, val, len(names), names)
        logged = [h for h in outcome.history if "pseudo_coverage" in h]
        results[method] = {
            "metrics": metrics,
            "train_seconds": round(seconds, 1),
            "labelled_points": outcome.labelled_points,
            "total_points": outcome.total_points,
            "prediction": predict_scene(final, val[0]),
            "pseudo_labels": {k: logged[-1][k] for k in ("pseudo_coverage", "pseudo_acc")}
            if logged
            else None,
        }
    results["_scene"] = val[0]
    return results


def _figure(path: Path, results: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scene = results["_scene"]
    order = np.argsort(scene.coord[:, 2])  # draw low points first: the top-down view shows tops
    cmap = plt.get_cmap("tab10")
    panels = [("true labels", scene.segment)] + [
        (f"{m}: mIoU {100 * results[m]['metrics']['miou']:.1f}", results[m]["prediction"])
        for m in ("labelled-only", "pointmatch")
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, (title, labels) in zip(axes, panels, strict=True):
        ax.scatter(
            scene.coord[order, 0],
            scene.coord[order, 1],
            c=cmap(np.asarray(labels)[order] % 10),
            s=3,
            linewidths=0,
        )
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=cmap(i), label=n)
        for i, n in enumerate(SYNTHETIC_CLASSES)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle("ev-points: PointMatch vs labelled-only on a held-out synthetic room (top-down)")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out_dir: Path, quick: bool = False, *, full: bool = False) -> dict[str, Any]:
    """Run the demo into ``out_dir``; returns the metrics summary (also in ``metrics.json``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    cfg = DemoConfig.quick() if quick else DemoConfig.full() if full else DemoConfig()
    dump_run_config(cfg, out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        results = _train_both(cfg)
    finally:
        torch.set_num_threads(threads)
    summary: dict[str, Any] = {
        "label_ratio": cfg.label_ratio,
        "points_per_class": cfg.points_per_class,
        "steps": cfg.steps,
        "classes": list(SYNTHETIC_CLASSES),
    }
    for method in ("labelled-only", "pointmatch"):
        r = results[method]
        m = r["metrics"]
        summary[method] = {"miou": m["miou"], "oa": m["oa"], "macc": m["macc"], "iou": m["iou"],
                           "train_seconds": r["train_seconds"], "labelled_points": r["labelled_points"],
                           "total_points": r["total_points"]}  # fmt: skip
        if r["pseudo_labels"] is not None:  # last logged step, unlabelled points
            summary[method]["pseudo_labels_last_step"] = r["pseudo_labels"]
    summary["miou_gain"] = summary["pointmatch"]["miou"] - summary["labelled-only"]["miou"]
    summary["protocol"] = (
        "held-out synthetic rooms, all points, no TTA; EMA weights for both methods"
        " (PointMatch's teacher)"
    )
    metrics_path = write_json(out_dir / "metrics.json", summary)
    print(f"metrics: {metrics_path}")
    if have_mpl:
        summary["figure"] = str(_figure(out_dir / "topdown.png", results))
        print(f"figure: {summary['figure']}")
    else:
        summary["figure_skipped"] = (
            "topdown.png (matplotlib is not installed: pip install 'ev-points[plot]')"
        )
        print(f"skipped {summary['figure_skipped']}")
    for method in ("labelled-only", "pointmatch"):
        print(
            f"{method}: mIoU {100 * summary[method]['miou']:.1f}  OA {100 * summary[method]['oa']:.1f}"
        )
    return summary
