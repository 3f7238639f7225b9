"""``ev demo`` for ev-video: synthetic action videos → STPT trained on the CPU → mAP and a timeline.

The demo

1. writes synthetic training and test videos (real ``.mp4``, THUMOS-format annotations) with
   :func:`~ev_video.datasets.generate_synthetic_videos`;
2. scores the *untrained* ``stpt_tiny`` on the test videos (the baseline);
3. trains it on ``ev_core.training.Engine`` (:func:`~ev_video.train.train_detector`);
4. detects actions on the test videos by sliding windows and scores them with ActivityNet's
   detection mAP (:func:`~ev_video.evaluation.evaluate_detections`);
5. writes ``metrics.json``, ``config.json`` and ``timeline.png`` (true vs predicted segments of
   a few test videos; needs matplotlib, ``pip install ev-video[plot]`` -- without it the figure
   is skipped and the metrics say so).

Default: ~45 s on 2 idle CPU cores (12 training videos of 12 s at 40x40, 32-frame windows,
200 optimizer steps at lr 1e-3: with 2e-3 the tiny model stays on the class/position
prior -- loss plateau ~0.67 -- within such short runs);
``quick``: fewer videos and steps; ``full``: 48 videos at 64x64 and 600 steps (minutes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ev_core.io import write_json
from ev_core.repro import dump_run_config, seed_everything
from ev_core.training import EngineConfig
from ev_video.datasets import SyntheticVideoConfig, TemporalAnnotations, generate_synthetic_videos
from ev_video.inference import ClipConfig, evaluate_detector
from ev_video.models import create
from ev_video.train import TrainConfig, train_detector

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of the ev-video demo (dumped to ``config.json``).

    Attributes:
        train_videos: synthetic training videos.
        test_videos: synthetic test videos.
        video: frames/fps/size of every video (``num_videos``/``subset``/``seed`` are set per split).
        clip: windowing of training and inference.
        steps: optimizer steps.
        batch_size: windows per step.
        lr: peak learning rate.
        threads: torch CPU threads (``None``: leave as is).
        seed: seed of data and training.
    """

    train_videos: int = 12
    test_videos: int = 6
    video: SyntheticVideoConfig = field(
        default_factory=lambda: SyntheticVideoConfig(num_frames=96, height=40, width=40)
    )
    clip: ClipConfig = field(default_factory=lambda: ClipConfig(clip_len=32, overlap=0.5))
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    threads: int | None = None
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """Seconds: 6 training videos, 40 steps (learns the class/position prior only)."""
        return cls(train_videos=6, test_videos=3, steps=40)

    @classmethod
    def full(cls) -> DemoConfig:
        """Minutes: 48 training videos at 64x64, 64-frame windows, 600 steps."""
        return cls(
            train_videos=48, test_videos=16, steps=600, batch_size=8,
            video=SyntheticVideoConfig(num_frames=192, height=64, width=64),
            clip=ClipConfig(clip_len=64, overlap=0.5),
        )  # fmt: skip


def _plot(
    ann: TemporalAnnotations,
    preds: list[dict[str, Any]],
    classes: list[str],
    path: Path,
    n: int = 4,
) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    vids = sorted(ann.videos)[:n]
    colors = {c: f"C{i}" for i, c in enumerate(classes)}
    fig = Figure(figsize=(10, 1.3 * len(vids) + 0.8))
    axes = fig.subplots(len(vids), 1, squeeze=False)[:, 0]
    for ax, vid in zip(axes, vids, strict=True):
        for s in ann.segments_of(vid):
            ax.broken_barh(
                [(s["t_start"], s["t_end"] - s["t_start"])], (1.1, 0.8), color=colors[s["label"]]
            )
        truth = len(ann.segments_of(vid))
        mine = sorted((p for p in preds if p["video_id"] == vid), key=lambda p: -p["score"])[
            : truth + 2
        ]
        top = max((p["score"] for p in mine), default=1.0)
        for p in mine:
            ax.broken_barh([(p["t_start"], p["t_end"] - p["t_start"])], (0.1, 0.8),
                           color=colors[p["label"]], alpha=0.3 + 0.7 * p["score"] / top)  # fmt: skip
            ax.text(
                (p["t_start"] + p["t_end"]) / 2,
                0.5,
                f"{p['score']:.2f}",
                ha="center",
                va="center",
                fontsize=7,
            )
        ax.set_yticks([0.5, 1.5], ["predicted", "true"])
        ax.set_xlim(0, ann.videos[vid].duration or 1)
        ax.set_ylim(0, 2)
        ax.set_title(vid, fontsize=9, loc="left")
    axes[-1].set_xlabel(
        "time (s)   [predicted: the best (true count + 2) segments with their scores]"
    )
    fig.legend(
        handles=[Patch(color=colors[c], label=c) for c in classes],
        loc="upper right",
        ncol=len(classes),
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)


def run_demo(out_dir: Path, quick: bool, full: bool = False) -> dict[str, Any]:
    """Generate videos, train a tiny STPT, evaluate it, write metrics and a timeline PNG.

    Args:
        out_dir: output folder (created).
        quick: the seconds-long variant.
        full: the minutes-long variant (ignored when ``quick``).

    Returns:
        The metrics written to ``metrics.json`` (mAP per tIoU and average, before and after
        training, training time, paths).
    """
    cfg = DemoConfig.quick() if quick else DemoConfig.full() if full else DemoConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_run_config(cfg, out_dir)
    try:
        import matplotlib  # noqa: F401

        have_plot = True
    except ImportError:
        have_plot = False
    seed_everything(cfg.seed)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    try:
        data = out_dir / "data"
        base = cfg.video
        train_cfg = SyntheticVideoConfig(
            **{**base.__dict__, "num_videos": cfg.train_videos, "subset": "train", "seed": cfg.seed}
        )
        test_cfg = SyntheticVideoConfig(
            **{
                **base.__dict__,
                "num_videos": cfg.test_videos,
                "subset": "test",
                "seed": cfg.seed + 1,
            }
        )
        generate_synthetic_videos(data / "train", train_cfg, overwrite=True)
        test_ann = generate_synthetic_videos(data / "test", test_cfg, overwrite=True)
        t_data = time.perf_counter() - t0
        classes = list(test_ann.classes)
        torch.manual_seed(cfg.seed)
        untrained = create("stpt_tiny", num_classes=len(classes)).eval()
        before, _ = evaluate_detector(
            untrained, data / "test" / "videos", test_ann, classes, cfg.clip
        )
        t1 = time.perf_counter()
        tcfg = TrainConfig(
            data_root=str(data / "train"), clip=cfg.clip, batch_size=cfg.batch_size, lr=cfg.lr,
            warmup_steps=max(1, cfg.steps // 10), cache_frames=True,
            engine=EngineConfig(epochs=10_000, max_steps=cfg.steps, device="cpu", amp="off", clip_grad_norm=1.0,
                                log_every=5, seed=cfg.seed, eval_every=0),
        )  # fmt: skip
        model, classes_t, fit = train_detector(tcfg, out_dir / "run", resume=False)
        t_train = time.perf_counter() - t1
        after, preds = evaluate_detector(
            model, data / "test" / "videos", test_ann, classes_t, cfg.clip
        )
    finally:
        torch.set_num_threads(threads)
    metrics: dict[str, Any] = {
        "classes": classes,
        "train_videos": cfg.train_videos,
        "test_videos": cfg.test_videos,
        "steps": fit.state.step,
        "untrained": before.to_dict(),
        "trained": after.to_dict(),
        "map@0.5_untrained": before.map_at(0.5),
        "map@0.5_trained": after.map_at(0.5),
        "average_map_untrained": before.average_map,
        "average_map_trained": after.average_map,
        "final_loss": next((h["loss"] for h in reversed(fit.history) if "loss" in h), None),
        "seconds": {
            "data": round(t_data, 1),
            "train": round(t_train, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "detector": str(out_dir / "run" / "detector.safetensors"),
    }
    write_json(out_dir / "predictions.json", preds)
    if have_plot:
        _plot(test_ann, preds, classes, out_dir / "timeline.png")
        metrics["figure"] = str(out_dir / "timeline.png")
    else:
        metrics["figure"] = None
        metrics["figure_skipped"] = "timeline.png needs matplotlib (pip install 'ev-video[plot]')"
    write_json(out_dir / "metrics.json", metrics)
    print(f"ev-video demo: mAP@0.5 {before.map_at(0.5) * 100:.1f} (untrained) -> {after.map_at(0.5) * 100:.1f} "
          f"(after {fit.state.step} steps); average mAP {after.average_map * 100:.1f}")  # fmt: skip
    print(
        f"metrics: {out_dir / 'metrics.json'}"
        + (f"\nfigure: {metrics['figure']}" if metrics["figure"] else "")
    )
    return metrics
