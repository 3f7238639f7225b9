"""The ``ev-reid`` command (also ``ev reid ...``).

Every command is a thin layer over a library function; the options mirror the fields of its
config dataclass (:class:`~ev_reid.pretrain.UPReIDConfig`, :class:`~ev_reid.train.TrainConfig`,
:class:`~ev_reid.models.ReidModelConfig`, :class:`~ev_reid.datasets.SyntheticMarketConfig`).
``pretrain`` and ``train`` run under ``torchrun`` for DDP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ev_core.cli import make_package_app

app = make_package_app(
    "ev-reid",
    "Person re-identification: datasets, UP-ReID pre-training, fine-tuning, faiss retrieval, CMC/mAP/mINP evaluation.",
)

_DATA = "Data"
_MODEL = "Model"
_OPT = "Optimisation"
_RUN = "Run"

DatasetOpt = Annotated[
    str,
    typer.Option(
        help="Dataset name (market1501, cuhk03, msmt17, personx, ...).", rich_help_panel=_DATA
    ),
]
DataRootOpt = Annotated[Path, typer.Option(help="Dataset root folder.", rich_help_panel=_DATA)]
DeviceOpt = Annotated[
    str, typer.Option(help="'auto', 'cpu', 'cuda', 'cuda:1', ...", rich_help_panel=_RUN)
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="DataLoader workers (default: the CPUs available, at most 4).",
        rich_help_panel=_RUN,
        show_default=False,
    ),
]
BackboneOpt = Annotated[
    str,
    typer.Option(
        help="timm / ev-core model name (resnet50, litv2_s, ...).", rich_help_panel=_MODEL
    ),
]
BackboneKwargsOpt = Annotated[
    str,
    typer.Option(
        help="Extra timm.create_model arguments as JSON, e.g. '{\"channels\": [16, 32, 64, 128]}'.",
        rich_help_panel=_MODEL,
    ),
]


def _flag(**kwargs: Any) -> Any:
    """A ``--name/--no-name`` option, shown in ``--help`` without a ``<bool>`` placeholder."""
    return typer.Option(metavar="", **kwargs)


def _workers(value: int | None) -> int:
    if value is None:
        from ev_reid.train import default_num_workers

        return default_num_workers()
    if value < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--num-workers")
    return value


def _dataset(name: str, root: Path) -> Any:
    """``ev_reid.datasets.create(name, root)``; an unknown name is a usage error."""
    from ev_reid.datasets import create, names

    if name.lower() not in names():
        raise typer.BadParameter(
            f"unknown dataset {name!r}; known: {', '.join(names())}", param_hint="--dataset"
        )
    return create(name, root)


def _check_backbone(name: str) -> None:
    """An unknown ``--backbone`` is a usage error, found before any data is read."""
    import timm

    import ev_core  # noqa: F401  (registers the ev models with timm)

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise typer.BadParameter(
            f"unknown model {name!r} (not a timm or ev-core model){hint}", param_hint="--backbone"
        )


def _json_dict(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint=option) from exc
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint=option)
    return value


def _echo_metrics(metrics: dict[str, Any]) -> None:
    parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
    typer.echo("  ".join(parts))


@app.command("synth")
def synth_cmd(
    root: Annotated[Path, typer.Argument(help="Output folder (Market-1501 layout).")],
    num_ids: Annotated[int, typer.Option(help="Identities (train + test).")] = 100,
    images_per_id: Annotated[int, typer.Option(help="Mean images per identity.")] = 16,
    num_cameras: Annotated[int, typer.Option(help="Cameras (2-6).")] = 6,
    height: Annotated[int, typer.Option(help="Image height.")] = 128,
    width: Annotated[int, typer.Option(help="Image width.")] = 64,
    train_fraction: Annotated[float, typer.Option(help="Share of identities for training.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Everything is a function of the config.")] = 0,
    overwrite: Annotated[bool, _flag(help="Replace an earlier synthetic dataset.")] = False,
) -> None:
    """Generate a synthetic Market-1501-format dataset (identities x cameras)."""
    from ev_reid.datasets import Market1501, generate_synthetic_market

    out = generate_synthetic_market(
        root,
        num_ids=num_ids,
        images_per_id=images_per_id,
        num_cameras=num_cameras,
        image_size=(height, width),
        train_fraction=train_fraction,
        seed=seed,
        overwrite=overwrite,
    )
    typer.echo(Market1501(out).summary())


@app.command("pretrain")
def pretrain_cmd(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder.", rich_help_panel=_RUN)
    ] = Path("runs/upreid"),
    dataset: DatasetOpt = "market1501",
    data_root: DataRootOpt = Path("data"),
    split: Annotated[
        list[str] | None,
        typer.Option(
            help="Dataset splits used as unlabelled images (repeatable).", rich_help_panel=_DATA
        ),
    ] = None,
    image_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder of unlabelled images (overrides --dataset).", rich_help_panel=_DATA
        ),
    ] = None,
    backbone: BackboneOpt = "resnet50",
    backbone_kwargs: BackboneKwargsOpt = "{}",
    pretrained: Annotated[
        bool, _flag(help="timm's pretrained weights.", rich_help_panel=_MODEL)
    ] = False,
    last_stride_1: Annotated[
        bool, _flag(help="ResNet last stride 1.", rich_help_panel=_MODEL)
    ] = False,
    proj_hidden_dim: Annotated[
        int, typer.Option(help="Projection MLP width.", rich_help_panel=_MODEL)
    ] = 2048,
    proj_dim: Annotated[
        int, typer.Option(help="Embedding dimension.", rich_help_panel=_MODEL)
    ] = 128,
    method: Annotated[str, typer.Option(help="'moco' or 'simclr'.", rich_help_panel=_OPT)] = "moco",
    loss: Annotated[
        str,
        typer.Option(help="'infonce' or 'macl' (instance and local terms).", rich_help_panel=_OPT),
    ] = "infonce",
    temperature: Annotated[
        float, typer.Option(help="Instance τ (MACL: τ0).", rich_help_panel=_OPT)
    ] = 0.2,
    queue_size: Annotated[
        int, typer.Option(help="MoCo queue length.", rich_help_panel=_OPT)
    ] = 65536,
    momentum: Annotated[
        float, typer.Option(help="MoCo key-encoder momentum.", rich_help_panel=_OPT)
    ] = 0.999,
    global_term: Annotated[bool, _flag(help="I² global consistency.", rich_help_panel=_OPT)] = True,
    global_weight: Annotated[float, typer.Option(help="Its weight.", rich_help_panel=_OPT)] = 1.0,
    local_term: Annotated[
        bool, _flag(help="I² local stripe contrast.", rich_help_panel=_OPT)
    ] = True,
    local_weight: Annotated[float, typer.Option(help="Its weight.", rich_help_panel=_OPT)] = 0.5,
    local_temperature: Annotated[float, typer.Option(help="Its τ.", rich_help_panel=_OPT)] = 0.2,
    local_negatives: Annotated[
        str,
        typer.Option(
            help="Local-term negatives: 'batch' (every other stripe) or 'image' (same image's).",
            rich_help_panel=_OPT,
        ),
    ] = "batch",
    num_stripes: Annotated[int, typer.Option(help="Horizontal stripes.", rich_help_panel=_OPT)] = 3,
    height: Annotated[int, typer.Option(help="View height.", rich_help_panel=_DATA)] = 256,
    width: Annotated[int, typer.Option(help="View width.", rich_help_panel=_DATA)] = 128,
    epochs: Annotated[int, typer.Option(help="Epochs.", rich_help_panel=_OPT)] = 200,
    max_steps: Annotated[
        int | None, typer.Option(help="Cap on optimizer steps.", rich_help_panel=_OPT)
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Images per step and rank.", rich_help_panel=_OPT)
    ] = 256,
    optimizer: Annotated[str, typer.Option(help="'sgd' or 'adamw'.", rich_help_panel=_OPT)] = "sgd",
    lr: Annotated[float, typer.Option(help="Peak LR per 256 images.", rich_help_panel=_OPT)] = 0.3,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=_OPT)] = 1e-4,
    warmup_steps: Annotated[
        int, typer.Option(help="Linear warm-up steps.", rich_help_panel=_OPT)
    ] = 0,
    amp: Annotated[bool, _flag(help="Mixed precision.", rich_help_panel=_RUN)] = True,
    device: DeviceOpt = "auto",
    num_workers: WorkersOpt = None,
    seed: Annotated[int, typer.Option(help="Seed.", rich_help_panel=_RUN)] = 0,
    resume: Annotated[
        bool, _flag(help="Continue from OUT/checkpoints.", rich_help_panel=_RUN)
    ] = False,
) -> None:
    """UP-ReID unsupervised pre-training (MoCo/SimCLR + I² regularisation) on unlabelled images."""
    import dataclasses

    from ev_core.distributed import cleanup_distributed, init_distributed
    from ev_reid.data import PretrainViewConfig
    from ev_reid.pretrain import UPReIDConfig, default_upreid_ssl_config, pretrain_upreid

    _check_backbone(backbone)
    ssl = dataclasses.replace(
        default_upreid_ssl_config(),
        method=method,  # type: ignore[arg-type]
        loss=loss,  # type: ignore[arg-type]
        temperature=temperature,
        queue_size=queue_size,
        momentum=momentum,
        epochs=epochs,
        max_steps=max_steps,
        optimizer=optimizer,  # type: ignore[arg-type]
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        amp=amp,
        device=device,
        seed=seed,
        resume=resume,
    )
    cfg = UPReIDConfig(
        out_dir=str(out),
        dataset=dataset,
        data_root=str(data_root),
        splits=tuple(split or ["train"]),
        image_dir=None if image_dir is None else str(image_dir),
        backbone=backbone,
        backbone_kwargs=_json_dict(backbone_kwargs, "--backbone-kwargs"),
        pretrained=pretrained,
        last_stride_1=last_stride_1,
        proj_hidden_dim=proj_hidden_dim,
        proj_dim=proj_dim,
        global_term=global_term,
        global_weight=global_weight,
        local_term=local_term,
        local_weight=local_weight,
        local_temperature=local_temperature,
        local_negatives=local_negatives,  # type: ignore[arg-type]
        views=PretrainViewConfig(height=height, width=width, num_stripes=num_stripes),
        ssl=ssl,
        batch_size=batch_size,
        num_workers=_workers(num_workers),
    )
    init_distributed()
    try:
        result = pretrain_upreid(cfg)
    finally:
        cleanup_distributed()
    if result.backbone_path is not None:
        typer.echo(
            f"{result.steps} steps on {result.num_images} images; backbone: {result.backbone_path}"
        )


@app.command("train")
def train_cmd(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder.", rich_help_panel=_RUN)
    ] = Path("runs/reid"),
    dataset: DatasetOpt = "market1501",
    data_root: DataRootOpt = Path("data"),
    init: Annotated[
        Path | None,
        typer.Option(
            help="Initial backbone: UP-ReID backbone.safetensors or an ImageNet/timm checkpoint.",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    allow_partial: Annotated[
        bool,
        _flag(
            help="Accept --init weights that fill only part of the backbone.",
            rich_help_panel=_MODEL,
        ),
    ] = False,
    backbone: BackboneOpt = "resnet50",
    backbone_kwargs: BackboneKwargsOpt = "{}",
    pretrained: Annotated[
        bool, _flag(help="timm's pretrained weights.", rich_help_panel=_MODEL)
    ] = False,
    last_stride_1: Annotated[
        bool, _flag(help="ResNet last stride 1.", rich_help_panel=_MODEL)
    ] = True,
    pooling: Annotated[str, typer.Option(help="'avg' or 'gem'.", rich_help_panel=_MODEL)] = "avg",
    neck: Annotated[
        str, typer.Option(help="'bnneck' or 'none'.", rich_help_panel=_MODEL)
    ] = "bnneck",
    num_stripes: Annotated[
        int, typer.Option(help="Part stripes (0 = global only).", rich_help_panel=_MODEL)
    ] = 0,
    height: Annotated[int, typer.Option(help="Image height.", rich_help_panel=_DATA)] = 256,
    width: Annotated[int, typer.Option(help="Image width.", rich_help_panel=_DATA)] = 128,
    erasing_p: Annotated[
        float, typer.Option(help="Random-erasing probability.", rich_help_panel=_DATA)
    ] = 0.5,
    num_identities: Annotated[
        int,
        typer.Option(
            "--num-identities", "-P", help="P: identities per step.", rich_help_panel=_OPT
        ),
    ] = 16,
    num_instances: Annotated[
        int,
        typer.Option("--num-instances", "-K", help="K: images per identity.", rich_help_panel=_OPT),
    ] = 4,
    epochs: Annotated[int, typer.Option(help="Epochs.", rich_help_panel=_OPT)] = 120,
    lr: Annotated[float, typer.Option(help="Adam learning rate.", rich_help_panel=_OPT)] = 3.5e-4,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=_OPT)] = 5e-4,
    warmup_epochs: Annotated[
        int, typer.Option(help="Linear warm-up epochs.", rich_help_panel=_OPT)
    ] = 10,
    milestones: Annotated[
        list[int] | None,
        typer.Option(help="LR ×gamma at these epochs (repeatable).", rich_help_panel=_OPT),
    ] = None,
    gamma: Annotated[float, typer.Option(help="Step-decay factor.", rich_help_panel=_OPT)] = 0.1,
    label_smoothing: Annotated[
        float, typer.Option(help="Identity-loss ε.", rich_help_panel=_OPT)
    ] = 0.1,
    triplet_margin: Annotated[
        float, typer.Option(help="Triplet margin.", rich_help_panel=_OPT)
    ] = 0.3,
    triplet_metric: Annotated[
        str, typer.Option(help="'euclidean' or 'cosine'.", rich_help_panel=_OPT)
    ] = "euclidean",
    soft_margin: Annotated[bool, _flag(help="Soft-margin triplet.", rich_help_panel=_OPT)] = False,
    eval_every: Annotated[
        int, typer.Option(help="Evaluate every N epochs (0: at the end).", rich_help_panel=_RUN)
    ] = 10,
    metric: Annotated[
        str, typer.Option(help="'cosine' or 'euclidean'.", rich_help_panel=_RUN)
    ] = "cosine",
    flip: Annotated[
        bool, _flag(help="Flip-averaged features at evaluation.", rich_help_panel=_RUN)
    ] = False,
    rerank: Annotated[
        bool, _flag(help="k-reciprocal re-ranking at evaluation.", rich_help_panel=_RUN)
    ] = False,
    max_steps_per_epoch: Annotated[
        int | None, typer.Option(help="Cap on steps per epoch.", rich_help_panel=_OPT)
    ] = None,
    amp: Annotated[bool, _flag(help="Mixed precision.", rich_help_panel=_RUN)] = False,
    device: DeviceOpt = "auto",
    num_workers: WorkersOpt = None,
    seed: Annotated[int, typer.Option(help="Seed.", rich_help_panel=_RUN)] = 0,
    resume: Annotated[
        bool, _flag(help="Continue from OUT/checkpoints.", rich_help_panel=_RUN)
    ] = False,
) -> None:
    """Supervised fine-tuning (BoT: label-smoothed ID + batch-hard triplet, BNNeck, warm-up)."""
    from ev_core.distributed import cleanup_distributed, init_distributed
    from ev_reid.data import ReidTransformConfig
    from ev_reid.models import ReidModelConfig
    from ev_reid.train import TrainConfig, train

    try:
        _check_backbone(backbone)
        model = ReidModelConfig(
            backbone=backbone,
            backbone_kwargs=_json_dict(backbone_kwargs, "--backbone-kwargs"),
            pretrained=pretrained,
            last_stride_1=last_stride_1,
            pooling=pooling,  # type: ignore[arg-type]
            neck=neck,  # type: ignore[arg-type]
            num_stripes=num_stripes,
        )
        cfg = TrainConfig(
            out_dir=str(out),
            dataset=dataset,
            data_root=str(data_root),
            model=model,
            init_checkpoint=None if init is None else str(init),
            allow_partial=allow_partial,
            transform=ReidTransformConfig(height=height, width=width, erasing_p=erasing_p),
            num_identities=num_identities,
            num_instances=num_instances,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            milestones=tuple(milestones) if milestones is not None else (40, 70),
            gamma=gamma,
            label_smoothing=label_smoothing,
            triplet_margin=triplet_margin,
            triplet_metric=triplet_metric,  # type: ignore[arg-type]
            soft_margin=soft_margin,
            eval_every=eval_every,
            eval_metric=metric,  # type: ignore[arg-type]
            eval_flip=flip,
            rerank=rerank,
            amp=amp,
            device=device,
            num_workers=_workers(num_workers),
            seed=seed,
            resume=resume,
            max_steps_per_epoch=max_steps_per_epoch,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    init_distributed()
    try:
        result = train(cfg)
    finally:
        cleanup_distributed()
    if result.model_path is not None:
        typer.echo(f"model: {result.model_path}")
    if result.metrics is not None:
        _echo_metrics(result.metrics)


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="model.safetensors written by `ev-reid train`.")
    ],
    dataset: DatasetOpt = "market1501",
    data_root: DataRootOpt = Path("data"),
    metric: Annotated[str, typer.Option(help="'cosine' or 'euclidean'.")] = "cosine",
    flip: Annotated[bool, _flag(help="Flip-averaged features.")] = False,
    rerank: Annotated[bool, _flag(help="k-reciprocal re-ranking (k1 20, k2 6, λ 0.3).")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 128,
    num_workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the metrics as JSON.")
    ] = None,
) -> None:
    """CMC / mAP / mINP of a trained model on a dataset's query and gallery (Market protocol)."""
    from ev_core.io import write_json
    from ev_reid.inference import evaluate_checkpoint

    if out is not None:
        from ev_core.training import check_writable

        check_writable(out.parent)
    result = evaluate_checkpoint(
        checkpoint,
        _dataset(dataset, data_root),
        metric=metric,
        flip=flip,
        rerank=rerank,
        batch_size=batch_size,
        num_workers=_workers(num_workers),
        device=device,
    )
    metrics = result.as_dict()
    _echo_metrics(metrics)
    if out is not None:
        write_json(out, metrics)


@app.command("index")
def index_cmd(
    checkpoint: Annotated[
        Path, typer.Argument(help="model.safetensors written by `ev-reid train`.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder to write.")] = Path(
        "runs/index"
    ),
    dataset: DatasetOpt = "market1501",
    data_root: DataRootOpt = Path("data"),
    split: Annotated[
        str, typer.Option(help="Split to index: gallery, query or train.", rich_help_panel=_DATA)
    ] = "gallery",
    backend: Annotated[
        str, typer.Option(help="auto, torch, faiss-flat, faiss-ivfpq or faiss-hnsw.")
    ] = "auto",
    metric: Annotated[str, typer.Option(help="'cosine' or 'euclidean'.")] = "cosine",
    index_device: Annotated[str, typer.Option(help="Index device: 'cpu' or 'cuda'.")] = "cpu",
    flip: Annotated[bool, _flag(help="Flip-averaged features.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 128,
    num_workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Embed a dataset split with a trained model and save a searchable index (with records)."""
    from ev_reid.inference import build_index
    from ev_reid.retrieval import IndexConfig

    if split not in ("gallery", "query", "train"):
        raise typer.BadParameter("must be gallery, query or train", param_hint="--split")
    try:
        config = IndexConfig(backend=backend, metric=metric, device=index_device)  # type: ignore[arg-type]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    records = getattr(_dataset(dataset, data_root), split)
    index = build_index(
        checkpoint,
        records,
        out,
        config=config,
        flip=flip,
        batch_size=batch_size,
        num_workers=_workers(num_workers),
        device=device,
    )
    typer.echo(f"indexed {len(index)} images ({index.backend.value}) -> {out}")


@app.command("search")
def search_cmd(
    index_dir: Annotated[Path, typer.Argument(help="Index folder written by `ev-reid index`.")],
    images: Annotated[list[Path], typer.Argument(help="Query images.")],
    k: Annotated[int, typer.Option("-k", help="Results per query.")] = 10,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Model for the queries (default: the index's).")
    ] = None,
    device: DeviceOpt = "auto",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the results as JSON.")
    ] = None,
) -> None:
    """Ranked gallery images (path, person id, camera, distance) for each query image."""
    from ev_core.io import write_json
    from ev_reid.inference import search_index
    from ev_reid.records import ReidRecord

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"no such image: {', '.join(missing)}", param_hint="IMAGES")
    queries = [ReidRecord(str(p), -1, 0) for p in images]
    hits = search_index(index_dir, queries, k, checkpoint=checkpoint, device=device, num_workers=0)
    results = []
    for q, ranked in zip(queries, hits):
        typer.echo(q.path)
        for hit in ranked:
            rec = hit.record
            typer.echo(
                f"  {hit.rank + 1:3d}  d={hit.distance:.4f}  pid={rec.pid}  cam={rec.camid}  {rec.path}"
            )
        results.append(
            {
                "query": q.path,
                "hits": [
                    {
                        "rank": h.rank + 1,
                        "distance": h.distance,
                        "path": h.record.path,
                        "pid": h.record.pid,
                        "camid": h.record.camid,
                    }
                    for h in ranked
                ],
            }
        )
    if out is not None:
        write_json(out, results)


@app.command("demo")
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("ev-reid-demo"),
    quick: Annotated[bool, _flag(help="Tiny sizes (about 10 s).")] = False,
    full: Annotated[bool, _flag(help="The larger run (minutes; default: ≤ ~45 s).")] = False,
) -> None:
    """Synthetic data → UP-ReID pre-training → fine-tuning → evaluation → index → ranked-list PNG."""
    from ev_reid.demo import run_demo

    metrics = run_demo(out, quick, full=full)
    _echo_metrics({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    typer.echo(f"outputs written to {out.resolve()}")


def main() -> None:
    """Console script ``ev-reid`` (known errors: one line on stderr, exit 2; ``--debug``)."""
    from ev_core.cli import run_cli

    run_cli(app)


if __name__ == "__main__":  # `torchrun ... -m ev_reid.cli train ...`
    main()
