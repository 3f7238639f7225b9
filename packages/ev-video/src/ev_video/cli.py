"""The ``ev-video`` command (also ``ev video ...``).

Thin commands over the library: ``synth`` (:func:`~ev_video.datasets.generate_synthetic_videos`),
``train`` (:func:`~ev_video.train.train_detector`), ``eval``
(:func:`~ev_video.inference.evaluate_detector`), ``detect`` (:func:`~ev_video.inference.detect_video`)
and ``demo`` (:func:`~ev_video.demo.run_demo`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ev_core.cli import make_package_app, run_cli

app = make_package_app(
    "ev-video",
    "Video: decord/PyAV loading, STPT temporal action detection, THUMOS14 / ActivityNet evaluation.",
)

_DATA = "Data"
_RUN = "Run"


@app.command("synth")
def synth_cmd(
    root: Annotated[
        Path, typer.Argument(help="Output folder (videos/, annotations/, annotations.json).")
    ],
    num_videos: Annotated[int, typer.Option(help="Videos to write.")] = 8,
    frames: Annotated[int, typer.Option(help="Frames per video.")] = 128,
    fps: Annotated[float, typer.Option(help="Frame rate.")] = 8.0,
    height: Annotated[int, typer.Option(help="Frame height (even).")] = 64,
    width: Annotated[int, typer.Option(help="Frame width (even).")] = 64,
    num_classes: Annotated[int, typer.Option(help="Action classes (1-4).")] = 4,
    subset: Annotated[str, typer.Option(help="Subset name in the annotations.")] = "test",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset.")] = False,
) -> None:
    """Write synthetic action videos (.mp4) with THUMOS-format annotations."""
    from ev_video.datasets import SyntheticVideoConfig, generate_synthetic_videos

    cfg = SyntheticVideoConfig(
        num_videos=num_videos, num_frames=frames, fps=fps, height=height, width=width,
        num_classes=num_classes, subset=subset, seed=seed,
    )  # fmt: skip
    try:
        cfg.validate()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    ann = generate_synthetic_videos(root, cfg, overwrite=overwrite)
    typer.echo(
        f"{len(ann.videos)} videos, {len(ann.segments)} segments, classes {ann.classes} -> {root}"
    )


@app.command("train")
def train_cmd(
    data_root: Annotated[
        Path, typer.Option(help="Folder with videos/ and annotations.json.", rich_help_panel=_DATA)
    ] = Path("data/synthetic"),
    annotations: Annotated[
        Path | None,
        typer.Option(
            help="Annotation JSON or folder of <Class>_<subset>.txt.", rich_help_panel=_DATA
        ),
    ] = None,
    video_dir: Annotated[
        Path | None,
        typer.Option(help="Video folder (default DATA_ROOT/videos).", rich_help_panel=_DATA),
    ] = None,
    subset: Annotated[
        str | None, typer.Option(help="Subset to train on (default: all).", rich_help_panel=_DATA)
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder.", rich_help_panel=_RUN)
    ] = Path("runs/stpt"),
    model: Annotated[str, typer.Option(help="stpt_tiny or stpt_s.")] = "stpt_tiny",
    clip_len: Annotated[int, typer.Option(help="Frames per window.")] = 64,
    fps: Annotated[float | None, typer.Option(help="Resample videos to this rate.")] = None,
    height: Annotated[int | None, typer.Option(help="Decode height (with --width).")] = None,
    width: Annotated[int | None, typer.Option(help="Decode width (with --height).")] = None,
    backend: Annotated[str, typer.Option(help="decord or pyav.")] = "decord",
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 10,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many optimizer steps.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = 4,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 1e-3,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda, cuda:N.", rich_help_panel=_RUN)
    ] = "auto",
    amp: Annotated[str, typer.Option(help="auto, off, bf16, fp16.", rich_help_panel=_RUN)] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader workers.", rich_help_panel=_RUN)] = 0,
    jitter: Annotated[
        int, typer.Option(help="Random temporal crops: shift windows by up to N frames.")
    ] = 0,
    cache_frames: Annotated[
        bool, typer.Option(help="Keep decoded windows in memory.", rich_help_panel=_RUN)
    ] = False,
    skip_bad_videos: Annotated[
        bool, typer.Option(help="Skip undecodable videos with a warning.", rich_help_panel=_DATA)
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest checkpoint in OUT.", rich_help_panel=_RUN)
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed.", rich_help_panel=_RUN)] = 0,
) -> None:
    """Train STPT end to end on annotated videos (torchrun for DDP)."""
    from ev_core.training import EngineConfig
    from ev_video.inference import ClipConfig
    from ev_video.train import TrainConfig, train_detector

    if (height is None) != (width is None):
        raise typer.BadParameter("give --height and --width together")
    cfg = TrainConfig(
        data_root=str(data_root), annotations=str(annotations) if annotations else None,
        video_dir=str(video_dir) if video_dir else None, subset=subset, model=model,
        clip=ClipConfig(clip_len=clip_len, fps=fps, height=height, width=width, backend=backend),
        batch_size=batch_size, lr=lr, workers=workers, cache_frames=cache_frames, jitter=jitter,
        on_error="skip" if skip_bad_videos else "raise",
        engine=EngineConfig(epochs=epochs, max_steps=max_steps, device=device, amp=amp, clip_grad_norm=1.0, seed=seed),
    )  # fmt: skip
    _, classes, result = train_detector(cfg, out, resume=resume)
    typer.echo(
        f"trained {result.state.step} steps on {len(classes)} classes -> {out / 'detector.safetensors'}"
    )


@app.command("eval")
def eval_cmd(
    detector: Annotated[Path, typer.Argument(help="detector.safetensors written by train.")],
    data_root: Annotated[
        Path, typer.Option(help="Folder with videos/ and annotations.json.")
    ] = Path("data/synthetic"),
    annotations: Annotated[
        Path | None, typer.Option(help="Annotation JSON or folder of <Class>_<subset>.txt.")
    ] = None,
    video_dir: Annotated[Path | None, typer.Option(help="Video folder.")] = None,
    subset: Annotated[str | None, typer.Option(help="Subset to evaluate.")] = None,
    thumos_list: Annotated[
        str | None, typer.Option(help="THUMOS14 test list: 212, 211 or 213.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write metrics + predictions JSON here.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Detect on every annotated video and print ActivityNet-style mAP at tIoU 0.3-0.7."""
    from ev_core.io import write_json
    from ev_video.datasets import load_thumos14
    from ev_video.inference import evaluate_detector, load_detector
    from ev_video.train import load_annotations

    model, classes, clip = load_detector(detector)
    ann_path = annotations or data_root / "annotations.json"
    ann = (
        load_thumos14(ann_path, subset or "test", thumos_list)
        if thumos_list
        else load_annotations(ann_path, subset)
    )
    result, preds = evaluate_detector(
        model, video_dir or data_root / "videos", ann, classes, clip, device=device
    )
    typer.echo(result.summary())
    if out is not None:
        write_json(out, {"metrics": result.to_dict(), "notes": ann.notes, "predictions": preds})
        typer.echo(f"written: {out}")


@app.command("detect")
def detect_cmd(
    video: Annotated[Path, typer.Argument(help="Video file.")],
    detector: Annotated[Path, typer.Option(help="detector.safetensors written by train.")] = Path(
        "runs/stpt/detector.safetensors"
    ),
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="JSON file (default: print).")
    ] = None,
    min_score: Annotated[float, typer.Option(help="Drop segments scoring below.")] = 0.1,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Detect action segments in one video (sliding windows) -> JSON."""
    from ev_core.io import write_json
    from ev_video.inference import detect_video, load_detector

    model, classes, clip = load_detector(detector)
    segs = [
        s
        for s in detect_video(model, video, classes, clip, device=device, show_progress=True)
        if s["score"] >= min_score
    ]
    if out is None:
        typer.echo(json.dumps(segs, indent=1))
    else:
        write_json(out, segs)
        typer.echo(f"{len(segs)} segments -> {out}")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "ev-demo-output/video"
    ),
    quick: Annotated[bool, typer.Option(help="Seconds instead of ~45 s.")] = False,
    full: Annotated[bool, typer.Option(help="The minutes-long version.")] = False,
) -> None:
    """Synthetic videos -> train a tiny STPT -> mAP + timeline.png + metrics.json."""
    from ev_video.demo import run_demo

    run_demo(out, quick, full=full)


def main() -> None:
    """Console script ``ev-video``."""
    run_cli(app)
