"""The ``ev-adapt`` command (also ``ev adapt ...``): train, eval, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ev_core.cli import make_package_app, run_cli

if TYPE_CHECKING:
    from ev_adapt.data.domains import DomainData
    from ev_adapt.models import AdaptModelConfig

app = make_package_app(
    "ev-adapt", "Semi-supervised domain adaptation: MCL and its baselines on MME lists or digits."
)

Method = Annotated[str, typer.Option(help="mcl, source_only, fixmatch or mme.")]


def _scenario(
    benchmark: str,
    seed: int,
    shots: int,
    list_dir: Path | None,
    image_root: Path | None,
    source: str | None,
    target: str | None,
    backbone: str,
    pretrained: bool = True,
) -> tuple[DomainData, AdaptModelConfig]:
    from ev_adapt.data import ImageListDomainData, digits_shift, mme_lists
    from ev_adapt.models import AdaptModelConfig
    from ev_adapt.transforms import mme_transforms
    from ev_core.errors import EvError

    if benchmark == "digits":
        if shots < 1:
            raise EvError(f"--shots must be >= 1, got {shots}")
        return digits_shift(seed, shots), AdaptModelConfig(
            backbone="digits_cnn", num_classes=10, bottleneck_dim=64, in_chans=1
        )
    if list_dir is None or image_root is None or source is None or target is None:
        raise EvError(
            "--list-dir, --image-root, --source and --target are needed for MME-list benchmarks"
        )
    lists = mme_lists(list_dir, image_root, benchmark, source, target, shots)
    weak, strong, test = mme_transforms()
    return ImageListDomainData(lists, weak, strong, test), AdaptModelConfig(
        backbone=backbone, num_classes=lists.num_classes, pretrained=pretrained
    )


@app.command("train")
def train_cmd(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (resumed if it has checkpoints).")
    ],
    benchmark: Annotated[
        str, typer.Option(help="digits, multi (DomainNet-126), office_home or visda.")
    ] = "digits",
    method: Method = "mcl",
    shots: Annotated[int, typer.Option(help="Labelled target images per class (1 or 3).")] = 3,
    source: Annotated[str | None, typer.Option(help="Source domain (MME lists).")] = None,
    target: Annotated[str | None, typer.Option(help="Target domain (MME lists).")] = None,
    list_dir: Annotated[Path | None, typer.Option(help="Folder of the MME .txt lists.")] = None,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder the listed paths are relative to.")
    ] = None,
    backbone: Annotated[
        str, typer.Option(help="timm/ev backbone for MME-list benchmarks.")
    ] = "resnet34",
    pretrained: Annotated[
        bool,
        typer.Option(
            "--pretrained/--scratch",
            help="MME-list benchmarks: start from the backbone's ImageNet weights (MCL's "
            "protocol; timm must find them) or from scratch.",
        ),
    ] = True,
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (default: the benchmark's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    amp: Annotated[str, typer.Option(help="auto, off, bf16 or fp16 (CUDA).")] = "auto",
) -> None:
    """Train MCL (or a baseline) and write weights, metrics and checkpoints to OUT."""
    from ev_adapt.config import AdaptConfig
    from ev_adapt.models import build_model
    from ev_adapt.trainer import train_adaptation
    from ev_core.errors import EvError

    overrides: dict[str, object] = {"method": method, "seed": seed, "device": device, "amp": amp}
    if steps is not None:
        overrides["steps"] = steps
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise EvError(f"--amp must be auto, off, bf16 or fp16, got {amp!r}")
    try:
        config = AdaptConfig.preset(benchmark, **overrides)
    except ValueError as exc:  # the config's own checks name the option
        raise EvError(f"--{exc}") from None
    data, model_config = _scenario(
        benchmark, seed, shots, list_dir, image_root, source, target, backbone, pretrained
    )
    result = train_adaptation(data, build_model(model_config), config, out, model_config)
    typer.echo(json.dumps({"final": result.final, "best_ema_val": result.best_ema_val}, indent=2))
    typer.echo(f"metrics: {out / 'metrics.json'}")


@app.command("eval")
def eval_cmd(
    weights: Annotated[
        Path, typer.Argument(help="model.safetensors or ema.safetensors written by train.")
    ],
    benchmark: Annotated[str, typer.Option(help="digits, multi, office_home or visda.")] = "digits",
    shots: Annotated[int, typer.Option(help="Labelled target images per class (1 or 3).")] = 3,
    source: Annotated[str | None, typer.Option(help="Source domain (MME lists).")] = None,
    target: Annotated[str | None, typer.Option(help="Target domain (MME lists).")] = None,
    list_dir: Annotated[Path | None, typer.Option(help="Folder of the MME .txt lists.")] = None,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder the listed paths are relative to.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the digits split.")] = 0,
) -> None:
    """Target validation and test accuracy of a trained model."""
    from ev_adapt.evaluation import load_model
    from ev_adapt.trainer import accuracy

    model, model_config = load_model(weights)
    data, _ = _scenario(
        benchmark, seed, shots, list_dir, image_root, source, target, model_config.backbone
    )
    device = next(model.parameters()).device
    out = {split: accuracy(model, data, split, 256, device) for split in ("validation", "test")}
    typer.echo(json.dumps(out, indent=2))


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "ev-adapt-demo"
    ),
    full: Annotated[
        bool, typer.Option("--full", help="600 steps, 1 and 3 shots (minutes).")
    ] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="60 steps: a smoke test (seconds).")
    ] = False,
) -> None:
    """The digits shift: MCL vs source-only, FixMatch and MME; accuracy-over-steps PNG + metrics."""
    from ev_adapt.demo import run_demo

    run_demo(out, quick=quick, full=full)


def main() -> None:
    """Console script ``ev-adapt``."""
    run_cli(app)
