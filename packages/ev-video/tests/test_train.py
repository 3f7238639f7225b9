"""Training on ev_core.training.Engine raises mAP@0.5 above the untrained model; detector round trip."""

from __future__ import annotations

from pathlib import Path

import torch

from ev_core.training import EngineConfig
from ev_video.datasets import load_activitynet_json
from ev_video.inference import ClipConfig, detect_video, evaluate_detector, load_detector
from ev_video.models import create
from ev_video.train import TrainConfig, train_detector


def test_short_cpu_training_beats_untrained(synthetic_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ann = load_activitynet_json(synthetic_root / "annotations.json")
    clip = ClipConfig(clip_len=32, overlap=0.5)
    untrained = create("stpt_tiny", num_classes=len(ann.classes)).eval()
    before, _ = evaluate_detector(untrained, synthetic_root / "videos", ann, ann.classes, clip)
    cfg = TrainConfig(
        data_root=str(synthetic_root), clip=clip, batch_size=4, lr=2e-3, warmup_steps=5, cache_frames=True,
        engine=EngineConfig(epochs=100, max_steps=60, device="cpu", amp="off", clip_grad_norm=1.0, log_every=10),
    )  # fmt: skip
    model, classes, fit = train_detector(cfg, tmp_path / "run", resume=False)
    assert fit.state.step == 60
    losses = [h["loss"] for h in fit.history if "loss" in h]
    assert losses[-1] < losses[0]
    after, preds = evaluate_detector(model, synthetic_root / "videos", ann, classes, clip)
    assert after.map_at(0.5) > before.map_at(0.5) + 0.05, (before.summary(), after.summary())
    # the saved detector reloads to the same predictions
    loaded, classes2, clip2 = load_detector(tmp_path / "run" / "detector.safetensors")
    assert classes2 == classes and clip2 == clip
    vid = sorted(ann.videos)[0]
    again = detect_video(loaded, synthetic_root / "videos" / f"{vid}.mp4", classes2, clip2)
    assert again == [p for p in preds if p["video_id"] == vid]
