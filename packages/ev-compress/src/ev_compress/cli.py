"""The ``ev-compress`` command (also ``ev compress ...``)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ev_core.cli import make_package_app

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
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Module-name pattern left in full precision (repeatable)."),
    ] = None,
    probe: Annotated[bool, typer.Option(help="Run a probe forward to list and measure.")] = True,
) -> None:
    """Convert MODEL_NAME with Mesa and print what is compressed and the expected saving."""
    import timm
    import torch

    import ev_core  # noqa: F401  (registers the ev models with timm)
    from ev_compress import mesa

    kwargs: dict[str, Any] = {"img_size": img_size} if img_size is not None else {}
    model = timm.create_model(model_name, **kwargs)
    mesa.convert(model, mesa.MesaPolicy(exclude=tuple(exclude or ())))
    example = None
    if probe:
        cfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", None) or {})
        size = img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
        example = torch.randn(batch_size, 3, size, size)
    typer.echo(str(mesa.summary(model, example)))


def main() -> None:
    """Console script ``ev-compress``."""
    app()
