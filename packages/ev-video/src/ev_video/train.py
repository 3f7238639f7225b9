"""Train STPT end to end from RGB frames on ``ev_core.training.Engine``.

:func:`train_detector` builds the window dataset (:class:`~ev_video.datasets.WindowDataset`),
the model (``ev_video.models.create``), AdamW with linear warm-up + cosine decay, and runs
:class:`ev_core.training.Engine` (AMP, accumulation, clipping, EMA, DDP under torchrun,
resumable checkpoints, progress, ``metrics.jsonl``). The trained weights are written to
``out_dir/detector.safetensors`` with the model, class and clip settings beside them
(:func:`ev_video.inference.load_detector`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ev_core.errors import EvError
from ev_core.training import Engine, EngineConfig, FitResult, Hook
from ev_video.datasets import (
    TemporalAnnotations,
    WindowDataset,
    collate_windows,
    load_activitynet_json,
    load_class_txt,
)
from ev_video.inference import ClipConfig, save_detector
from ev_video.models import STPT, create

__all__ = ["TrainConfig", "load_annotations", "train_detector"]


@dataclass
class TrainConfig:
    """Everything a training run uses (dumped to ``out_dir/config.json``).

    Attributes:
        data_root: folder with ``videos/`` and ``annotations.json`` (the synthetic layout).
        annotations: annotation JSON file or folder of ``<Class>_<subset>.txt`` files
            (default ``data_root/annotations.json``).
        video_dir: video folder (default ``data_root/videos``).
        subset: subset to train on (``None``: every video of the annotations).
        model: ``"stpt_tiny"`` or ``"stpt_s"``.
        model_kwargs: :class:`~ev_video.models.STPTConfig` overrides.
        clip: windowing / decoding settings.
        batch_size: windows per micro-batch.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        workers: DataLoader workers.
        on_error: ``"raise"`` or ``"skip"`` undecodable videos.
        cache_frames: keep decoded windows in memory (small datasets, many epochs).
        jitter: random temporal crops: shift each training window by up to this many frames.
        engine: the training-loop settings (epochs, device, AMP, EMA, checkpoints, ...).
    """

    data_root: str = "data/synthetic"
    annotations: str | None = None
    video_dir: str | None = None
    subset: str | None = None
    model: str = "stpt_tiny"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    clip: ClipConfig = field(default_factory=ClipConfig)
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 10
    workers: int = 0
    on_error: str = "raise"
    cache_frames: bool = False
    jitter: int = 0
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(epochs=10, clip_grad_norm=1.0, log_every=5)
    )

    def annotation_path(self) -> Path:
        """The annotations to read."""
        return (
            Path(self.annotations)
            if self.annotations
            else Path(self.data_root) / "annotations.json"
        )

    def videos_path(self) -> Path:
        """The video folder."""
        return Path(self.video_dir) if self.video_dir else Path(self.data_root) / "videos"


def load_annotations(
    path: str | os.PathLike[str], subset: str | None = None
) -> TemporalAnnotations:
    """ActivityNet-style JSON file, or a folder of ``<Class>_<subset>.txt`` (needs ``subset``)."""
    p = Path(path)
    if p.is_dir():
        if subset is None:
            raise EvError("a folder of per-class .txt annotations needs a subset (e.g. 'test')", p)
        return load_class_txt(p, subset)
    return load_activitynet_json(p, subset)


def _schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _step(
    model: torch.nn.Module, batch: dict[str, Any] | None, engine: Engine
) -> dict[str, torch.Tensor]:
    if batch is None:  # every item of the batch was an undecodable file (on_error="skip")
        zero = torch.stack([p.sum() * 0.0 for p in model.parameters()]).sum()
        return {"loss": zero}
    x = batch["clip"].to(engine.device, non_blocking=True)
    out = model(x)
    raw: STPT = engine.raw_model  # type: ignore[assignment]
    return raw.loss(out, batch["segments"], batch["labels"])


def train_detector(
    config: TrainConfig,
    out_dir: str | os.PathLike[str] | None,
    *,
    hooks: list[Hook] | None = None,
    resume: bool | str = True,
) -> tuple[STPT, list[str], FitResult]:
    """Train an STPT detector.

    Args:
        config: the run's settings.
        out_dir: run folder (checkpoints, metrics, ``detector.safetensors``); ``None`` writes
            nothing.
        hooks: extra engine hooks (e.g. an evaluation hook).
        resume: passed to :meth:`ev_core.training.Engine.fit`.

    Returns:
        ``(model, classes, fit_result)``; the model is the EMA copy when EMA is on.

    Raises:
        EvError: unreadable annotations/videos, or no training window.
    """
    ann = load_annotations(config.annotation_path(), config.subset)
    if not ann.classes:
        raise EvError("the annotations have no labelled segment", config.annotation_path())
    clip = config.clip
    dataset = WindowDataset(
        config.videos_path(), ann, clip_len=clip.clip_len, overlap=clip.overlap, fps=clip.fps,
        size=clip.size, backend=clip.backend, on_error=config.on_error, mean=clip.mean,
        std=clip.std, cache=config.cache_frames, jitter=config.jitter,
    )  # fmt: skip
    if len(dataset) == 0:
        raise EvError("no training window (no decodable annotated video)", config.videos_path())
    generator = torch.Generator().manual_seed(config.engine.seed)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=len(dataset) > config.batch_size,
        num_workers=config.workers, collate_fn=collate_windows, persistent_workers=False,
    )  # fmt: skip
    model = create(config.model, num_classes=len(ann.classes), **config.model_kwargs)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    eng = config.engine
    per_epoch = max(1, len(loader) // eng.grad_accum_steps)
    total = eng.max_steps or per_epoch * eng.epochs
    engine = Engine(
        model, optimizer, eng, scheduler=_schedule(optimizer, config.warmup_steps, total), out_dir=out_dir,
        hooks=hooks or [], run_config=config, model_config=model.config, name="stpt",
    )  # fmt: skip
    result = engine.fit(loader, _step, resume=resume)
    final: STPT = engine.ema.module if engine.ema is not None else engine.raw_model  # type: ignore[assignment]
    final = final.eval()
    if out_dir is not None and engine.is_main:
        save_detector(Path(out_dir) / "detector.safetensors", final, ann.classes, clip)
    return final, list(ann.classes), result
