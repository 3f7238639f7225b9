"""The two-view contrastive pre-training loop (SimCLR- and MoCo-style), on :mod:`ev_core.training`.

:class:`ContrastiveTrainer` (or the one-call :func:`pretrain`) trains any encoder returning
:class:`~ev_core.ssl.encoder.EncoderOutput` (build one with
:func:`~ev_core.ssl.encoder.build_encoder`) on batches of two views:

* ``method="simclr"``: both views through the online encoder, InfoNCE/MACL with in-batch
  negatives (gathered across DDP ranks with gradients).
* ``method="moco"``: queries from the online encoder, keys from a momentum encoder
  (``θ_k ← m·θ_k + (1 − m)·θ_q`` after every optimizer step), negatives from a FIFO queue
  that receives the keys of every rank; the loss is symmetrised (mean of q1↔k2 and q2↔k1,
  each with the other samples' keys and the queue as negatives).

Extension points (what ev-reid's UP-ReID builds on), see :mod:`ev_core.ssl.protocols`:

* ``loss_terms``: extra :class:`~ev_core.ssl.protocols.LossTerm` callables receiving a
  :class:`~ev_core.ssl.protocols.StepContext` (both views' online outputs, the momentum
  outputs, the target-encoder output of the original images, feature maps, extras) and
  returning a scalar or named scalars, each weighted and logged;
* ``view_generator``: a callable turning each loader batch (on the device) into a
  :class:`~ev_core.ssl.views.ViewBatch` (two views + optional original);
* extra heads inside the encoder (``ContrastiveEncoder(extra_heads=...)``) for stripe/patch
  projections whose parameters must be trained and DDP-synchronised.

The loop itself is :class:`ev_core.training.Engine`: AMP, gradient accumulation, clipping, DDP,
epoch seeding, atomic checkpoints that resume bit-exactly (also mid-epoch), the stop at the
first non-finite loss, the divergence warning, progress, ``metrics.jsonl`` and ``config.json``.
This module adds the contrastive step, the warm-up + cosine LR, the momentum encoder and the
queue (saved with every checkpoint by a hook).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ev_core.checkpoint import save_checkpoint
from ev_core.distributed import barrier, get_world_size, is_main_process
from ev_core.losses.contrastive import ContrastiveOutput, InfoNCELoss, MACLLoss
from ev_core.ssl.config import PretrainConfig
from ev_core.ssl.encoder import EncoderOutput, make_momentum_encoder, momentum_update
from ev_core.ssl.protocols import ContrastiveLoss, LossTermSpec, StepContext
from ev_core.ssl.queue import NegativeQueue
from ev_core.ssl.views import ViewBatch, ViewGenerator, as_view_batch, move_to_device
from ev_core.training import Engine, EngineConfig, Hook, resolve_device

__all__ = ["ContrastiveTrainer", "PretrainResult", "pretrain"]


@dataclass
class PretrainResult:
    """What :meth:`ContrastiveTrainer.fit` returns.

    Attributes:
        step: optimizer steps done.
        epoch: completed epochs.
        history: the logged records (step, epoch, lr, losses, temperature, alignment, ...).
        encoder_path: the final ``encoder.safetensors`` (``None`` without ``out_dir`` or when
            the call stopped early).
        finished: whether the configured run is complete.
    """

    step: int
    epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    encoder_path: Path | None = None
    finished: bool = False


def _engine_amp(config: PretrainConfig, device: torch.device) -> str:
    """The engine's ``amp`` setting: ``auto`` keeps bf16 on the CPU and fp16 on CUDA."""
    if not config.amp:
        return "off"
    if config.amp_dtype == "bfloat16" or (config.amp_dtype == "auto" and device.type != "cuda"):
        return "bf16"
    return "fp16"


class _MomentumState(Hook):
    """Saves the momentum encoder and the queue with every checkpoint; updates them per step."""

    def __init__(self, trainer: ContrastiveTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, engine: Engine, logs: Mapping[str, float]) -> None:
        t = self.trainer
        t._flush_keys()
        if t.momentum_encoder is not None:
            momentum_update(t.encoder, t.momentum_encoder, t.config.momentum)

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        state: dict[str, Any] = {"batch_lr_scale": t._batch_lr_scale}
        if t.momentum_encoder is not None:
            state["momentum"] = dict(t.momentum_encoder.state_dict())
        if t.queue is not None:
            state["queue"] = dict(t.queue.state_dict())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        t = self.trainer
        t._batch_lr_scale = state["batch_lr_scale"]
        if t.momentum_encoder is not None and "momentum" in state:
            t.momentum_encoder.load_state_dict(state["momentum"])
        if "queue" in state:
            size, dim = state["queue"]["queue"].shape
            t.queue = NegativeQueue(dim, size).to(t.device)
            t.queue.load_state_dict(state["queue"])


class ContrastiveTrainer:
    """Two-view contrastive pre-training (see the module docstring).

    Args:
        encoder: a module returning :class:`EncoderOutput` (e.g. ``build_encoder("resnet18")``).
        config: the run's :class:`~ev_core.ssl.config.PretrainConfig`.
        loss: the instance loss; default built from the config (``InfoNCELoss`` or
            ``MACLLoss`` with ``arrangement`` matching ``config.method``). A given loss must
            use the arrangement of the method and, under DDP, ``gather_distributed=True``.
        loss_terms: extra weighted loss terms (:class:`~ev_core.ssl.protocols.LossTermSpec`).
        view_generator: ``batch -> ViewBatch`` applied to each loader batch on the device;
            default :func:`~ev_core.ssl.views.as_view_batch`.
        optimizer: a ready optimizer over the encoder's parameters; default built from the
            config. The LR schedule scales each group's initial ``lr`` (no batch scaling).
        on_log: called with every logged record (on rank 0).
    """

    def __init__(
        self,
        encoder: nn.Module,
        config: PretrainConfig,
        *,
        loss: ContrastiveLoss | None = None,
        loss_terms: Sequence[LossTermSpec] = (),
        view_generator: ViewGenerator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        on_log: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.config = config
        self.world_size = get_world_size()
        self.distributed = self.world_size > 1
        self.device = resolve_device(config.device)

        for spec in loss_terms:
            if isinstance(spec.fn, nn.Module) and any(True for _ in spec.fn.parameters()):
                raise ValueError(
                    f"loss term {spec.name!r} owns parameters: put them in the encoder "
                    "(ContrastiveEncoder(extra_heads=...)) so that they are trained and synced"
                )
        names = [s.name for s in loss_terms]
        if len(set(names)) != len(names) or "instance" in names:
            raise ValueError(f"loss term names must be unique and not 'instance', got {names}")
        if config.instance_weight == 0 and not loss_terms:
            raise ValueError("instance_weight is 0 and there are no loss_terms: nothing to train")
        self.loss_terms = list(loss_terms)
        self.view_generator: ViewGenerator = view_generator or as_view_batch
        self.on_log = on_log

        encoder = encoder.to(self.device)
        momentum_encoder = make_momentum_encoder(encoder) if config.method == "moco" else None
        if self.distributed and config.sync_batchnorm and self.device.type == "cuda":
            encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
        self.encoder = encoder
        self.momentum_encoder = momentum_encoder
        self.queue: NegativeQueue | None = None
        self.loss = loss if loss is not None else self._build_loss()
        self._check_loss(self.loss)

        self._batch_lr_scale: float | None = None if config.lr_scaling == "linear" else 1.0
        if optimizer is None:
            optimizer = self._build_optimizer()
        else:
            self._batch_lr_scale = 1.0
        for group in optimizer.param_groups:
            group.setdefault("ev_peak_lr", group["lr"])
        self.optimizer = optimizer
        self._total_steps = 0
        self._pending_keys: list[Tensor] = []

        self.engine = Engine(
            encoder,
            optimizer,
            EngineConfig(
                epochs=config.epochs,
                max_steps=config.max_steps,
                device=str(self.device),
                amp=_engine_amp(config, self.device),
                grad_accum_steps=config.grad_accum_steps,
                clip_grad_norm=config.clip_grad_norm,
                checkpoint_every=config.checkpoint_every_steps or 0,
                keep_checkpoints=config.keep_checkpoints,
                log_every=config.log_every_steps,
                eval_every=0,
                seed=config.seed if config.seed is not None else 0,
            ),
            out_dir=config.out_dir,
            hooks=[_MomentumState(self), *([_LogForwarder(on_log)] if on_log else [])],
            run_config={
                "pretrain": config,
                "loss": repr(self.loss),
                "loss_terms": [{"name": s.name, "weight": s.weight} for s in self.loss_terms],
                "view_generator": repr(self.view_generator),
            },
            model_config=config,
            name="pretrain",
        )
        self.model = self.engine.model
        if self.distributed and momentum_encoder is not None:
            for t in momentum_encoder.state_dict().values():  # start from rank 0's weights
                dist.broadcast(t, src=0)
            momentum_update(self.encoder, momentum_encoder, 0.0)

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.engine.state.step

    @property
    def epoch(self) -> int:
        """The current epoch (0-based; ``epochs`` once training is over)."""
        return self.engine.state.epoch

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The engine's gradient scaler (enabled for fp16)."""
        return self.engine.scaler

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype (``None``: full precision)."""
        return self.engine.amp_dtype

    # ------------------------------------------------------------------ setup helpers
    def _build_loss(self) -> ContrastiveLoss:
        cfg = self.config
        if cfg.loss == "macl":
            return MACLLoss(
                cfg.temperature,
                cfg.macl_alpha,
                cfg.macl_a0,
                arrangement=cfg.method,
                gather_distributed=self.distributed,
            )
        return InfoNCELoss(
            cfg.temperature, arrangement=cfg.method, gather_distributed=self.distributed
        )

    def _check_loss(self, loss: ContrastiveLoss) -> None:
        if getattr(loss, "arrangement", None) != self.config.method:
            raise ValueError(
                f"the loss uses arrangement {getattr(loss, 'arrangement', None)!r} but the "
                f"method is {self.config.method!r}: build it with arrangement={self.config.method!r}"
            )
        if self.distributed and not getattr(loss, "gather_distributed", False):
            raise ValueError("under DDP the loss needs gather_distributed=True")

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in self.encoder.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=cfg.lr)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.sgd_momentum)

    # ------------------------------------------------------------------ schedule
    def lr_factor(self, step: int) -> float:
        """Warm-up/cosine multiplier of the peak LR at optimizer step ``step``."""
        cfg, total = self.config, max(self._total_steps, 1)
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(total - cfg.warmup_steps, 1)
        progress_ = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))

    def _set_lr(self) -> None:
        scale = (self._batch_lr_scale or 1.0) * self.lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["ev_peak_lr"] * scale

    # ------------------------------------------------------------------ forward pieces
    @staticmethod
    def _encode(model: nn.Module, xs: list[Tensor]) -> list[EncoderOutput]:
        if all(x.shape[1:] == xs[0].shape[1:] for x in xs):
            out = model(torch.cat(xs, dim=0))
            if not isinstance(out, EncoderOutput):
                raise TypeError(
                    f"the encoder must return EncoderOutput, got {type(out).__name__}: wrap the "
                    "backbone with ev_core.ssl.ContrastiveEncoder / build_encoder"
                )
            return out.split([x.shape[0] for x in xs])
        outs = [model(x) for x in xs]
        if not all(isinstance(o, EncoderOutput) for o in outs):
            raise TypeError("the encoder must return EncoderOutput")
        return outs

    def _target_original(self, original: Tensor) -> EncoderOutput:
        with torch.no_grad():
            if self.momentum_encoder is not None:
                return self._encode(self.momentum_encoder, [original])[0]
            was_training = self.encoder.training
            self.encoder.eval()
            try:
                return self._encode(self.encoder, [original])[0]
            finally:
                self.encoder.train(was_training)

    def _flush_keys(self) -> None:
        """Enqueue the keys of the previous micro-step (after its backward used the queue)."""
        keys, self._pending_keys = self._pending_keys, []
        if self.queue is not None:
            for k in keys:  # view by view: the queue order of the single-process global batch
                self.queue.enqueue(k, gather_distributed=self.distributed)

    def _step(self, model: nn.Module, batch: Any, engine: Engine) -> dict[str, Tensor]:
        """One micro-batch (runs under the engine's autocast): named loss terms."""
        cfg = self.config
        self._flush_keys()
        views = self.view_generator(move_to_device(batch, self.device))
        if not isinstance(views, ViewBatch):
            raise TypeError(
                f"the view generator must return a ViewBatch, got {type(views).__name__}"
            )
        if self._batch_lr_scale is None:  # linear scaling: per 256 images of the effective batch
            effective = views.batch_size * cfg.grad_accum_steps * self.world_size
            self._batch_lr_scale = effective / 256
        self._set_lr()
        logs: dict[str, Tensor] = {}
        o1, o2 = self._encode(model, [views.view1, views.view2])
        momentum: tuple[EncoderOutput, EncoderOutput] | None = None
        if self.momentum_encoder is not None:
            with torch.no_grad():
                m1, m2 = self._encode(self.momentum_encoder, [views.view1, views.view2])
            momentum = (m1, m2)
            if self.queue is None:
                self.queue = NegativeQueue(m1.embedding.shape[1], cfg.queue_size).to(self.device)
        original = self._target_original(views.original) if views.original is not None else None

        instance: ContrastiveOutput | None = None
        total: Tensor | None = None
        if cfg.instance_weight > 0:
            if momentum is None:
                instance = self.loss.compute(o1.embedding, o2.embedding)
            else:  # symmetrised MoCo: (q1, k2) and (q2, k1) against the queue
                assert self.queue is not None
                bank = self.queue.negatives()
                instance = _average_outputs(
                    self.loss.compute(o1.embedding, momentum[1].embedding, bank),
                    self.loss.compute(o2.embedding, momentum[0].embedding, bank),
                )
            total = cfg.instance_weight * instance.loss
            logs["instance"] = instance.loss.detach()
            logs["temperature"] = instance.temperature
            logs["alignment"] = instance.alignment
            logs["accuracy"] = instance.accuracy
        ctx = StepContext(
            views=views,
            online=(o1, o2),
            momentum=momentum,
            original=original,
            instance=instance,
            model=self.encoder,
            momentum_encoder=self.momentum_encoder,
            queue=self.queue,
            distributed=self.distributed,
            step=self.step,
            epoch=self.epoch,
        )
        for spec in self.loss_terms:
            value = spec.fn(ctx)
            items = (
                {spec.name: value}
                if isinstance(value, Tensor)
                else {f"{spec.name}/{k}": v for k, v in value.items()}
            )
            for key, v in items.items():
                if v.ndim != 0:
                    raise ValueError(f"loss term {key!r} must be a scalar, got {tuple(v.shape)}")
                logs[key] = v.detach()
                total = spec.weight * v if total is None else total + spec.weight * v
        assert total is not None
        if momentum is not None:  # enqueued after the backward (next micro-step / step end)
            self._pending_keys = [momentum[0].embedding.float(), momentum[1].embedding.float()]
        return {**logs, "loss": total}

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path | None:
        """``out_dir/checkpoints`` (``None`` without ``out_dir``)."""
        return Path(self.config.out_dir) / "checkpoints" if self.config.out_dir else None

    def _model_tensors(self) -> dict[str, Tensor]:
        """Encoder, momentum encoder and queue tensors (``encoder.``/``momentum.``/``queue.``)."""
        state = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        if self.momentum_encoder is not None:
            state |= {f"momentum.{k}": v for k, v in self.momentum_encoder.state_dict().items()}
        if self.queue is not None:
            state |= {f"queue.{k}": v for k, v in self.queue.state_dict().items()}
        return state

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint now (all ranks must call it); ``None`` without ``out_dir``."""
        return self.engine.save_checkpoint()

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything from a checkpoint step folder (``out_dir/checkpoints/step-*``)."""
        self.engine.load_checkpoint(path)

    # ------------------------------------------------------------------ loop
    def fit(self, loader: Any, *, stop_at_step: int | None = None) -> PretrainResult:
        """Train on ``loader`` (a sized iterable of batches; see the module docstring).

        Args:
            loader: e.g. a ``DataLoader`` (use ``DistributedSampler`` under DDP) yielding
                batches the view generator understands. Its length must be known.
            stop_at_step: return after this optimizer step (checkpointing first), e.g. to
                split a run over several jobs; the LR schedule still spans the whole run.

        Returns:
            :class:`PretrainResult`.

        Raises:
            NonFiniteLossError: at the first non-finite loss term (the last good checkpoint
                is kept).
        """
        cfg = self.config
        try:
            n_batches = len(loader)
        except TypeError:
            raise TypeError("the loader must have a length (a map-style dataset)") from None
        if n_batches == 0:
            raise ValueError("the loader is empty")
        self._total_steps = cfg.epochs * math.ceil(n_batches / cfg.grad_accum_steps)
        if cfg.max_steps is not None:
            self._total_steps = min(self._total_steps, cfg.max_steps)
        if self.momentum_encoder is not None:
            self.momentum_encoder.train()
        result = self.engine.fit(loader, self._step, resume=cfg.resume, stop_at_step=stop_at_step)
        encoder_path = None
        if result.finished and cfg.out_dir is not None and is_main_process():
            encoder_path = save_checkpoint(
                Path(cfg.out_dir) / "encoder.safetensors",
                self.encoder.state_dict(),
                config=cfg,
                metadata={"step": self.step, "epoch": self.epoch},
            )
        barrier()
        history = [r for r in result.history if "eval" not in r]
        return PretrainResult(self.step, self.epoch, history, encoder_path, result.finished)


class _LogForwarder(Hook):
    """Calls ``on_log`` with each new ``metrics.jsonl`` record (rank 0)."""

    def __init__(self, on_log: Callable[[dict[str, float]], None]) -> None:
        self.on_log = on_log
        self._seen = 0

    def on_fit_start(self, engine: Engine) -> None:
        self._seen = len(engine.history)

    def on_step_end(self, engine: Engine, logs: Mapping[str, float]) -> None:
        self._forward(engine)

    def on_fit_end(self, engine: Engine) -> None:
        self._forward(engine)

    def _forward(self, engine: Engine) -> None:
        new, self._seen = engine.history[self._seen :], len(engine.history)
        if engine.is_main:
            for record in new:
                self.on_log(dict(record))


def _average_outputs(a: ContrastiveOutput, b: ContrastiveOutput) -> ContrastiveOutput:
    return ContrastiveOutput(
        loss=(a.loss + b.loss) / 2,
        temperature=(a.temperature + b.temperature) / 2,
        alignment=(a.alignment + b.alignment) / 2,
        accuracy=(a.accuracy + b.accuracy) / 2,
        num_negatives=a.num_negatives,
    )


def pretrain(
    encoder: nn.Module,
    loader: Any,
    config: PretrainConfig,
    *,
    loss: ContrastiveLoss | None = None,
    loss_terms: Sequence[LossTermSpec] = (),
    view_generator: ViewGenerator | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> PretrainResult:
    """Build a :class:`ContrastiveTrainer` and run :meth:`~ContrastiveTrainer.fit` once.

    Arguments as for :class:`ContrastiveTrainer` plus the ``loader``.
    """
    trainer = ContrastiveTrainer(
        encoder,
        config,
        loss=loss,
        loss_terms=loss_terms,
        view_generator=view_generator,
        optimizer=optimizer,
        on_log=on_log,
    )
    return trainer.fit(loader)
