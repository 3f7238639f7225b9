"""The ``ev-points`` command (also ``ev points ...``): ``preprocess``, ``train``, ``eval``,
``demo``, ``backends``. Each command is a thin layer over a library function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ev_core.cli import make_package_app, run_cli

app = make_package_app(
    "ev-points",
    "Point clouds: pytorch3d-compatible ops (pytorch3d optional), S3DIS/ScanNet data and PointMatch weakly-supervised segmentation.",
)


def _areas(text: str) -> tuple[int, ...]:
    try:
        areas = tuple(int(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated area numbers, got {text!r}", param_hint="--areas"
        ) from None
    if not areas or any(a not in range(1, 7) for a in areas):
        raise typer.BadParameter("areas must be in 1..6", param_hint="--areas")
    return areas


@app.command("backends")
def backends() -> None:
    """Show which point-op backends can run here, and why not."""
    import torch

    from ev_points.ops import backend_status, kdtree_status, resolve_backend

    for name, why in backend_status("cpu", torch.float32).items():
        typer.echo(f"{name}: {'available' if why is None else why}")
    tree = kdtree_status("cpu", torch.float32)
    typer.echo(f"native k-NN / ball query on the CPU: {'kd-tree' if tree is None else tree}")
    typer.echo(
        "auto (no shape given) -> "
        f"{resolve_backend('auto', torch.device('cpu'), torch.float32)}; "
        "with the inputs' shapes it picks per op and size"
    )


@app.command("preprocess")
def preprocess_cmd(
    dataset: Annotated[str, typer.Option(help="s3dis or scannet.")],
    root: Annotated[
        Path, typer.Option(help="Raw dataset root (S3DIS: holds Area_1..6; ScanNet: holds scans/).")
    ],
    out: Annotated[Path, typer.Option(help="Cache folder to write.")],
    grid_size: Annotated[
        float | None,
        typer.Option(help="Grid subsampling cell (m); default 0.04 S3DIS, 0.02 ScanNet."),
    ] = None,
    areas: Annotated[str, typer.Option(help="S3DIS areas, e.g. '1,2,3,4,5,6'.")] = "1,2,3,4,5,6",
    split_file: Annotated[
        Path | None, typer.Option(help="ScanNet split list (scannetv2_train.txt).")
    ] = None,
    label_map: Annotated[
        Path | None,
        typer.Option(help="ScanNet scannetv2-labels.combined.tsv (default: under --root)."),
    ] = None,
) -> None:
    """Read raw S3DIS / ScanNet v2 files, grid-subsample them and write the cache."""
    from ev_points.runs import preprocess_dataset

    paths = preprocess_dataset(dataset, root, out, grid_size=grid_size, areas=_areas(areas),
                               split_file=split_file, label_map=label_map)  # fmt: skip
    typer.echo(f"cached {len(paths)} scenes in {out}")


@app.command("train")
def train_cmd(
    out: Annotated[
        Path,
        typer.Option(help="Run folder (config, metrics.jsonl, checkpoints; resumed when present)."),
    ],
    data: Annotated[Path | None, typer.Option(help="A cache from `ev-points preprocess`.")] = None,
    synthetic: Annotated[
        int, typer.Option(help="Train on this many synthetic scenes instead of --data.")
    ] = 0,
    method: Annotated[str, typer.Option(help="pointmatch or labelled-only.")] = "pointmatch",
    label_ratio: Annotated[
        float, typer.Option(help="Fraction of each scene's points labelled (0.001 = 0.1%).")
    ] = 0.001,
    points_per_class: Annotated[
        int | None, typer.Option(help="Label N points per class instead of --label-ratio.")
    ] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
    batch_size: Annotated[int, typer.Option()] = 4,
    num_points: Annotated[int, typer.Option(help="Points per training sample.")] = 4096,
    test_area: Annotated[
        int | None, typer.Option(help="S3DIS: hold out this area and evaluate on it.")
    ] = 5,
    tiny: Annotated[bool, typer.Option(help="The small 3-level U-Net.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    amp: Annotated[str, typer.Option(help="auto, off, bf16, fp16.")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the point U-Net with PointMatch (or the labelled-only baseline) on sparse labels."""
    from ev_core.training import EngineConfig
    from ev_points.data import make_synthetic_scenes
    from ev_points.models import PointUNetConfig
    from ev_points.pointmatch import PointMatchConfig, evaluate, train_pointmatch
    from ev_points.runs import CLASS_NAMES, cache_dataset, load_cache, metrics_summary, split_scenes

    if (data is None) == (synthetic == 0):
        raise typer.BadParameter("give exactly one of --data or --synthetic N")
    if data is not None:
        dataset = cache_dataset(data)
        train, test = split_scenes(load_cache(data), dataset, test_area)
    else:
        dataset = "synthetic"
        train, test = (
            make_synthetic_scenes(synthetic, seed),
            make_synthetic_scenes(max(1, synthetic // 4), seed + 10_000),
        )
    names = CLASS_NAMES[dataset]
    model = PointUNetConfig.tiny(len(names)) if tiny else PointUNetConfig(num_classes=len(names))
    cfg = PointMatchConfig(
        method=method, label_ratio=None if points_per_class else label_ratio, points_per_class=points_per_class,
        steps=steps, batch_size=batch_size, num_points=num_points, model=model,
        engine=EngineConfig(device=device, amp=amp, seed=seed, eval_every=0),
    )  # fmt: skip
    outcome = train_pointmatch(train, len(names), cfg, out_dir=out)
    typer.echo(
        f"trained {outcome.fit.state.step} steps on {outcome.labelled_points} labelled of {outcome.total_points} points"
    )
    if test:
        final = outcome.teacher if outcome.teacher is not None else outcome.model
        metrics = evaluate(final, test, len(names), names, device=next(final.parameters()).device)
        (out / "eval_metrics.json").write_text(json.dumps(metrics, indent=2))
        typer.echo(f"{dataset} held-out: {metrics_summary(metrics)} -> {out / 'eval_metrics.json'}")


@app.command("eval")
def eval_cmd(
    run: Annotated[Path, typer.Option(help="A run folder from `ev-points train`.")],
    data: Annotated[Path, typer.Option(help="A cache from `ev-points preprocess`.")],
    test_area: Annotated[int | None, typer.Option(help="S3DIS: evaluate this area only.")] = 5,
    student: Annotated[
        bool, typer.Option(help="Evaluate the student instead of the EMA teacher.")
    ] = False,
    device: Annotated[str, typer.Option()] = "cpu",
    out: Annotated[
        Path | None, typer.Option(help="Metrics JSON (default RUN/eval_metrics.json).")
    ] = None,
) -> None:
    """mIoU / OA / mAcc / per-class IoU of a trained run on a cached split."""
    from ev_points.pointmatch import evaluate
    from ev_points.runs import (
        CLASS_NAMES,
        cache_dataset,
        load_cache,
        load_run_model,
        metrics_summary,
        split_scenes,
    )

    dataset = cache_dataset(data)
    scenes = load_cache(data)
    _, test = split_scenes(scenes, dataset, test_area)
    test = test or scenes
    names = CLASS_NAMES[dataset]
    model = load_run_model(run, ema=not student, device=device)
    metrics = evaluate(model, test, len(names), names, device=device)
    target = out or run / "eval_metrics.json"
    target.write_text(json.dumps(metrics, indent=2))
    typer.echo(f"{metrics_summary(metrics)} on {len(test)} scenes -> {target}")


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "ev-points-demo"
    ),
    quick: Annotated[bool, typer.Option(help="Tiny sizes (seconds).")] = False,
    full: Annotated[bool, typer.Option(help="Longer runs (minutes).")] = False,
) -> None:
    """Synthetic scenes: PointMatch vs labelled-only at sparse labels; PNG + metrics JSON."""
    from ev_points.demo import run_demo

    run_demo(out, quick, full=full)


def main() -> None:
    """Console script ``ev-points``."""
    run_cli(app)
