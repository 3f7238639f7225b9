"""``ev-compress spvit-search`` and ``ev-compress spvit-export`` (mounted by :func:`register`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ev_core.errors import EvError

__all__ = ["register"]


def _parse_kwargs(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EvError(f"--model-kwarg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def search_command(
    model_name: Annotated[
        str, typer.Argument(help="timm / ev model, e.g. deit_small_patch16_224.")
    ],
    data: Annotated[
        str, typer.Option(help="'digits' (scikit-learn digits, upsampled) or an image folder.")
    ],
    target_gflops: Annotated[float, typer.Option(help="FLOPs target (GMACs per image).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (resumable).")] = Path(
        "spvit-search"
    ),
    img_size: Annotated[int | None, typer.Option(help="Input size (default 224).")] = None,
    num_classes: Annotated[
        int | None, typer.Option(help="Classes (default: from the data).")
    ] = None,
    model_kwarg: Annotated[
        list[str] | None,
        typer.Option(help="Extra timm.create_model KEY=VALUE (JSON values), repeatable."),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Weights to start from (.safetensors or .pth).")
    ] = None,
    pretrained: Annotated[bool, typer.Option(help="Load timm's pretrained weights.")] = False,
    flops_lambda: Annotated[
        float | None, typer.Option("--lambda", help="λ of the FLOPs loss (default: automatic).")
    ] = None,
    lr: Annotated[float, typer.Option(help="Weight learning rate.")] = 5e-5,
    arch_lr: Annotated[float, typer.Option(help="Gate learning rate.")] = 5e-4,
    schedule: Annotated[str, typer.Option(help="'constant' or 'cosine'.")] = "constant",
    theta: Annotated[float, typer.Option(help="Initial gate logit.")] = 1.5,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 1,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    amp: Annotated[str, typer.Option(help="auto, off, bf16, fp16.")] = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader workers.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Convert MODEL_NAME for SPViT and search its gates to TARGET_GFLOPS on DATA.

    Writes OUT/searched.safetensors (+ .json), OUT/search_result.json and the engine's
    checkpoints/metrics; rerunning with the same OUT resumes.
    """
    import timm
    import torch
    from torch.utils.data import DataLoader

    import ev_core  # noqa: F401  (registers the ev models with timm)
    from ev_compress.spvit.convert import convert
    from ev_compress.spvit.data import digits_split, image_folder
    from ev_compress.spvit.export import save_searched
    from ev_compress.spvit.search import SearchConfig, search
    from ev_core.checkpoint import load_checkpoint, load_torch_file, unwrap_state_dict
    from ev_core.io import write_json

    kwargs = _parse_kwargs(model_kwarg)
    if img_size is not None:
        kwargs["img_size"] = img_size
    size = img_size or 224
    train: Any
    if data == "digits":
        train, _ = digits_split(size, seed=seed)
        classes = 10
    else:
        train = image_folder(data, size)
        classes = len(train.classes)
    kwargs["num_classes"] = num_classes or classes
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (RuntimeError, TypeError) as exc:
        raise EvError(f"cannot create MODEL_NAME {model_name!r}: {exc}") from None
    if weights is not None:
        try:
            if weights.suffix == ".safetensors":
                state, _ = load_checkpoint(weights)
            else:
                state = unwrap_state_dict(load_torch_file(weights))
            model.load_state_dict(state)
        except (RuntimeError, ValueError, OSError) as exc:
            raise EvError(f"--weights do not fit {model_name}: {exc}", path=weights) from None
    convert(
        model, input_size=(3, size, size), theta=theta, model_name=model_name, model_kwargs=kwargs
    )
    loader = DataLoader(
        train,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
    )
    cfg = SearchConfig(
        target_gflops=target_gflops,
        flops_lambda=flops_lambda,
        lr=lr,
        arch_lr=arch_lr,
        schedule=schedule,
        epochs=epochs,
        max_steps=max_steps,
        device=device,
        amp=amp,
        seed=seed,
    )
    result = search(model, loader, config=cfg, out_dir=out)
    save_searched(model, out / "searched.safetensors")
    summary = {k: v for k, v in vars(result).items() if k not in ("history", "checkpoint")}
    write_json(out / "search_result.json", summary)
    typer.echo(
        f"searched {result.steps} steps: {result.gflops:.4g} GFLOPs (target {target_gflops:g}, "
        f"original {result.original_gflops:.4g}); blocks {result.choices}"
    )
    typer.echo(f"wrote {out / 'searched.safetensors'} and {out / 'search_result.json'}")


def export_command(
    searched: Annotated[
        Path, typer.Argument(help="A search run folder or its searched.safetensors.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")] = Path(
        "spvit-exported.safetensors"
    ),
    keep_bn: Annotated[
        bool, typer.Option(help="Keep the convolutions' BatchNorm (to fine-tune the export).")
    ] = False,
) -> None:
    """Export a searched SPViT model as a smaller hybrid (OUT + OUT.json, loadable with
    ev_compress.spvit.load_exported)."""
    from ev_compress.spvit.export import export, load_searched
    from ev_compress.spvit.hybrid import save_exported

    path = searched / "searched.safetensors" if searched.is_dir() else searched
    model = load_searched(path).eval()
    small = export(model, fold_bn=not keep_bn)
    if out.suffix != ".safetensors":
        raise EvError("--out must end in .safetensors", path=out)
    save_exported(small, out)
    arch: Any = small.spvit_arch
    params = sum(p.numel() for p in small.parameters())
    original = arch["original_params"]
    typer.echo(
        f"exported {out}: {arch['macs'] / 1e9:.4g} GFLOPs (original {arch['original_macs'] / 1e9:.4g}), "
        f"{params:,} parameters (original {original:,}); blocks "
        f"{[b['choice'] for b in arch['blocks']]}"
    )


def register(app: typer.Typer) -> None:
    """Add ``spvit-search`` and ``spvit-export`` to the ``ev-compress`` app."""
    app.command("spvit-search")(search_command)
    app.command("spvit-export")(export_command)
