"""The ``ev-compress`` command (also ``ev compress ...``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any

import typer

from ev_core.cli import make_package_app, run_cli

app = make_package_app(
    "ev-compress",
    "Mesa (8-bit activation memory-saving training), EcoFormer (binary-hash linear attention) and SPViT (single-path MSA→conv pruning) for timm and ev models.",
)


@app.command("mesa-summary")
def mesa_summary(
    model_name: Annotated[
        str, typer.Argument(help="timm or ev model name, e.g. deit_small_patch16_224.")
    ],
    img_size: Annotated[int | None, typer.Option(help="Input size (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch of the probe forward.")] = 2,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="Mesa policy file: JSON/YAML (MesaPolicy.to_dict layout) or an official Mesa "
            "policy text file. Default: MesaPolicy() (patch embedding kept exact).",
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            help="Module-name pattern left in full precision (repeatable; replaces the "
            "policy's exclude list).",
        ),
    ] = None,
    probe: Annotated[
        bool, typer.Option("--probe/--no-probe", help="Run a probe forward to list and measure.")
    ] = True,
) -> None:
    """Convert MODEL_NAME with Mesa and print what is compressed, what stays full precision and
    the expected saving."""
    import dataclasses

    import timm
    import torch

    import ev_core  # noqa: F401  (registers the ev models with timm)
    from ev_compress import mesa
    from ev_core.errors import EvError

    pol = mesa.load_policy(policy) if policy is not None else mesa.MesaPolicy()
    if exclude is not None:
        pol = dataclasses.replace(pol, exclude=tuple(exclude))
    if model_name not in timm.list_models():
        raise EvError(f"unknown model {model_name!r} (see timm.list_models())")
    kwargs: dict[str, Any] = {"img_size": img_size} if img_size is not None else {}
    model = timm.create_model(model_name, **kwargs)
    mesa.convert(model, pol)
    example = None
    if probe:
        cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
        size = img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        example = torch.randn(batch_size, 3, size, size)
    typer.echo(str(mesa.summary(model, example)))


# SPViT's commands (helper F's module) mount here when present.
if importlib.util.find_spec("ev_compress.spvit.cli") is not None:
    from ev_compress.spvit.cli import register as _register_spvit

    _register_spvit(app)


def main() -> None:
    """Console script ``ev-compress``."""
    run_cli(app)
