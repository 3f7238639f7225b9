"""The fine-tuning run itself: :func:`train` on :class:`ev_core.training.Engine`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ev_core.distributed import barrier, get_logger, get_world_size, is_main_process
from ev_core.errors import EvError
from ev_core.io import write_json
from ev_reid.models.reid import ReidModel, load_backbone_weights
from ev_reid.train.config import TrainConfig, bot_lr_factor
from ev_reid.train.criterion import ReidCriterion, train_step

if TYPE_CHECKING:
    from ev_core.training import Engine
    from ev_reid.datasets import ReidDataset

__all__ = ["TrainResult", "train"]

_log = get_logger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (unwrapped from DDP, in eval mode).
        history: one record per epoch (losses, accuracy, lr, evaluation metrics when run).
        metrics: the final evaluation (``RankResult.as_dict()``), or ``None`` without a test
            split or on ranks other than 0.
        model_path: ``out_dir/model.safetensors`` (rank 0).
    """

    model: ReidModel
    history: list[dict[str, Any]]
    metrics: dict[str, Any] | None
    model_path: Path | None


def _build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _load_dataset(cfg: TrainConfig) -> ReidDataset:
    from ev_reid.datasets import DatasetLayoutError, create, names

    if cfg.dataset.lower() not in names():
        raise DatasetLayoutError(f"unknown dataset {cfg.dataset!r}; known: {', '.join(names())}")
    return create(cfg.dataset, cfg.data_root)


def _engine_amp(cfg: TrainConfig, device: torch.device) -> str:
    """The engine's ``amp`` setting for ``cfg.amp`` / ``cfg.amp_dtype`` on ``device``."""
    if not cfg.amp:
        return "off"
    if cfg.amp_dtype == "bfloat16":
        return "bf16"
    if cfg.amp_dtype == "float16":
        return "fp16"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


class _CappedLoader:
    """The first ``steps`` batches of ``loader`` each epoch (quick runs).

    The engine seeds and ``set_epoch``-s the loader through ``sampler`` / ``batch_sampler`` /
    ``generator``, which are those of the wrapped ``DataLoader``.
    """

    def __init__(self, loader: Any, steps: int) -> None:
        self.loader = loader
        self.steps = min(len(loader), steps)
        self.sampler = loader.sampler
        self.batch_sampler = loader.batch_sampler
        self.generator = loader.generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        for _ in range(self.steps):
            yield next(it)


def _make_hook(
    cfg: TrainConfig,
    steps_per_epoch: int,
    evaluate: Callable[[ReidModel], dict[str, Any]] | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> Any:
    from ev_core.training import Hook

    class BotEpochs(Hook):
        """Per-epoch history (mean losses over ranks, LR, evaluations), saved with checkpoints.

        An epoch's record is completed at its last optimizer step, so that the epoch-end
        checkpoint holds it; mid-run evaluations run after that checkpoint (``on_eval``).
        """

        def __init__(self) -> None:
            self.history: list[dict[str, Any]] = []
            self._sums: dict[str, float] = {}
            self._steps = 0

        def on_epoch_start(self, engine: Engine, epoch: int) -> None:
            self._sums, self._steps = {}, 0

        def on_step_end(self, engine: Engine, logs: Mapping[str, float]) -> None:
            for key in ("loss", "id", "triplet", "accuracy"):
                if key in logs:
                    self._sums[key] = self._sums.get(key, 0.0) + float(logs[key])
            self._steps += 1
            if engine.state.batch_in_epoch >= steps_per_epoch:
                self._close_epoch(engine.state.epoch)

        def _close_epoch(self, epoch: int) -> None:
            keys = sorted(self._sums)
            values = torch.tensor([self._sums[k] for k in keys], dtype=torch.float64)
            values /= max(self._steps, 1)
            if get_world_size() > 1:
                torch.distributed.all_reduce(values)
                values /= get_world_size()
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": cfg.lr * bot_lr_factor(epoch, cfg),
                "steps": self._steps,
            }
            record.update({k: float(v) for k, v in zip(keys, values.tolist())})
            self.history.append(record)
            if on_epoch is not None and is_main_process():
                on_epoch(record)

        def on_eval(self, engine: Engine, epoch: int) -> dict[str, float] | None:
            if evaluate is None or epoch + 1 >= cfg.epochs:  # the last: after model.safetensors
                return None
            metrics = evaluate(engine.raw_model) if is_main_process() else None  # type: ignore[arg-type]
            barrier()
            if metrics is None:
                return None
            self.history[-1]["eval"] = metrics
            return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

        def state_dict(self) -> dict[str, Any]:
            return {"history": self.history}

        def load_state_dict(self, state: Mapping[str, Any]) -> None:
            self.history = list(state["history"])

    return BotEpochs()


def _init_backbone(model: ReidModel, cfg: TrainConfig) -> None:
    if cfg.init_checkpoint is None:
        return
    report = load_backbone_weights(model, cfg.init_checkpoint, strict=not cfg.allow_partial)
    level = _log.warning if report.missing or report.mismatched else _log.info
    level(
        "initialised %d backbone tensors from %s (%d missing, %d unexpected, %d mismatched)",
        len(report.loaded), cfg.init_checkpoint, len(report.missing),
        len(report.unexpected), len(report.mismatched),
    )  # fmt: skip


def train(
    cfg: TrainConfig,
    dataset: ReidDataset | None = None,
    *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune a re-id model (see the module docstring).

    Call :func:`ev_core.distributed.init_distributed` first for DDP (``torchrun``).

    Args:
        cfg: the run configuration.
        dataset: the dataset (default ``create(cfg.dataset, cfg.data_root)``); its ``train``
            pids must be ``0..N-1``; ``query``/``gallery`` are used for evaluation when present.
        on_epoch: called with each epoch's record (rank 0).

    Returns:
        :class:`TrainResult`.

    Raises:
        EvError: before any training, for an unwritable output folder, unreadable images
            (all listed), a dataset too small for one P×K batch, an unknown backbone, or
            initial weights that fill only part of the backbone; during training,
            :class:`~ev_core.training.NonFiniteLossError` at the first non-finite loss (the
            last good checkpoint is kept).
    """
    from torch.utils.data import DataLoader

    from ev_core.repro import seed_everything
    from ev_core.training import Engine, EngineConfig, check_writable, resolve_device
    from ev_reid.data.sampler import DistributedRandomIdentitySampler, RandomIdentitySampler
    from ev_reid.data.transforms import build_train_transform
    from ev_reid.datasets import DatasetLayoutError, ImageDataset
    from ev_reid.inference import evaluate_model
    from ev_reid.validation import validate_images

    world = get_world_size()
    if cfg.num_identities % world:
        raise EvError(
            f"num_identities ({cfg.num_identities}) must be divisible by the world size ({world})"
        )
    out_dir = Path(cfg.out_dir)
    check_writable(out_dir)
    check_writable(out_dir / "checkpoints")
    device = resolve_device(cfg.device)
    ds = dataset if dataset is not None else _load_dataset(cfg)
    if not ds.train:
        raise DatasetLayoutError(f"{ds.name}: the training split is empty", path=ds.dataset_dir)
    num_ids = len({r.pid for r in ds.train})
    if num_ids < cfg.num_identities // world:
        raise DatasetLayoutError(
            f"{ds.name}: the training split has {num_ids} identities, fewer than the "
            f"{cfg.num_identities // world} of one P×K batch per rank (--num-identities)",
            path=ds.dataset_dir,
        )
    has_test = bool(ds.query) and bool(ds.gallery)
    model_cfg = dataclasses.replace(cfg.model, num_classes=num_ids)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    seed_everything(cfg.seed)
    try:
        model = ReidModel(model_cfg)
    except ValueError as exc:
        raise EvError(f"model {model_cfg.backbone!r}: {exc}") from exc
    _init_backbone(model, cfg)
    validate_images([*ds.train, *ds.query, *ds.gallery])
    optimizer = _build_optimizer(model, cfg)

    per_rank = (cfg.num_identities // world) * cfg.num_instances
    sampler: RandomIdentitySampler
    if world > 1:
        sampler = DistributedRandomIdentitySampler(
            ds.train, per_rank, cfg.num_instances, seed=cfg.seed
        )
    else:
        sampler = RandomIdentitySampler(ds.train, per_rank, cfg.num_instances, seed=cfg.seed)
    loader: Any = DataLoader(
        ImageDataset(ds.train, build_train_transform(cfg.transform)),
        batch_size=per_rank,
        sampler=sampler,
        num_workers=cfg.num_workers,
        drop_last=True,
        generator=torch.Generator(),
    )
    if len(loader) == 0:
        raise DatasetLayoutError(
            f"{ds.name}: the training split does not fill one P×K batch", path=ds.dataset_dir
        )
    if cfg.max_steps_per_epoch is not None:
        loader = _CappedLoader(loader, cfg.max_steps_per_epoch)
    steps_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: bot_lr_factor(step // steps_per_epoch, cfg)
    )

    def evaluate(net: ReidModel) -> dict[str, Any]:
        result = evaluate_model(
            net,
            ds.query,
            ds.gallery,
            transform=cfg.transform,
            metric=cfg.eval_metric,
            flip=cfg.eval_flip,
            rerank=cfg.rerank,
            batch_size=cfg.eval_batch_size,
            num_workers=cfg.num_workers,
            device=device,
            use_metric_cuhk03=ds.use_metric_cuhk03,
        )
        _log.info("evaluation: %s", result)
        return result.as_dict()

    hook = _make_hook(cfg, steps_per_epoch, evaluate if has_test else None, on_epoch)
    engine = Engine(
        model,
        optimizer,
        EngineConfig(
            epochs=cfg.epochs,
            device=str(device),
            amp=_engine_amp(cfg, device),
            log_every=max(1, min(10, steps_per_epoch)),
            eval_every=cfg.eval_every,
            keep_checkpoints=cfg.keep_checkpoints,
            seed=cfg.seed,
        ),
        scheduler=scheduler,
        out_dir=out_dir,
        hooks=[hook],
        run_config={"train": cfg},
        model_config=model_cfg,
        name="train",
    )
    criterion = ReidCriterion.from_config(cfg)

    def step(net: nn.Module, batch: Any, eng: Engine) -> dict[str, torch.Tensor]:
        images, pids = batch[0].to(eng.device), batch[1].to(eng.device)
        loss, logs = train_step(net, criterion, images, pids)  # the engine runs it under autocast
        return {**logs, "loss": loss}

    engine.fit(loader, step, resume=cfg.resume)
    model = engine.raw_model  # type: ignore[assignment]
    model.eval()
    history: list[dict[str, Any]] = hook.history
    metrics: dict[str, Any] | None = None
    model_path = None
    if is_main_process():
        from ev_core.checkpoint import save_checkpoint

        meta: dict[str, Any] = {
            "epochs": cfg.epochs,
            "metrics": None,
            "dataset": ds.name,
            "transform": cfg.transform,
        }
        # the weights are safe on disk before the (long, fallible) final evaluation
        model_path = save_checkpoint(
            out_dir / "model.safetensors", model.state_dict(), config=model_cfg, metadata=meta
        )
        if has_test:
            metrics = evaluate(model)
            if history:
                history[-1]["eval"] = metrics
            model_path = save_checkpoint(
                model_path,
                model.state_dict(),
                config=model_cfg,
                metadata={**meta, "metrics": metrics},
            )
        write_json(out_dir / "metrics.json", {"history": history, "final": metrics})
    barrier()
    return TrainResult(model, history, metrics, model_path)
