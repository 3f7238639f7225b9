"""The two-view contrastive pre-training loop (SimCLR- and MoCo-style), as a library API.

:class:`ContrastiveTrainer` (or the one-call :func:`pretrain`) trains any encoder returning
:class:`~ev_core.ssl.encoder.EncoderOutput` (build one with
:func:`~ev_core.ssl.encoder.build_encoder`) on batches of two views:

* ``method="simclr"``: both views through the online encoder, InfoNCE/MACL with in-batch
  negatives (gathered across DDP ranks with gradients).
* ``method="moco"``: queries from the online encoder, keys from a momentum encoder
  (``θ_k ← m·θ_k + (1 − m)·θ_q`` after every optimizer step), negatives from a FIFO queue
  that receives the keys of every rank; the loss is symmetrised (mean of q1↔k2 and q2↔k1,
  each with the other samples' keys and the queue as negatives).

Extension points (what ev-reid's UP-ReID builds on):

* ``loss_terms``: extra :class:`LossTerm` callables receiving a :class:`StepContext` (both
  views' online outputs, the momentum outputs, the target-encoder output of the original
  images, feature maps, extras) and returning a scalar or named scalars, each weighted
  (:class:`LossTermSpec`) and logged;
* ``view_generator``: a callable turning each loader batch (on the device) into a
  :class:`~ev_core.ssl.views.ViewBatch` (two views + optional original);
* extra heads inside the encoder (``ContrastiveEncoder(extra_heads=...)``) for stripe/patch
  projections whose parameters must be trained and DDP-synchronised.

Training features: AMP (bf16 autocast on CPU, fp16 + GradScaler on CUDA), gradient
accumulation, warm-up + cosine LR, gradient clipping, checkpoint/resume that reproduces an
uninterrupted run exactly (RNG states saved, mid-epoch resume replays the epoch's data order),
progress bar, metrics log (``metrics.jsonl``) and the resolved config (``config.json``) beside
the outputs, and DDP under ``torchrun`` (call :func:`ev_core.distributed.init_distributed`
first).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ev_core.checkpoint import (
    load_checkpoint,
    load_torch_file,
    save_checkpoint,
    save_training_state,
)
from ev_core.distributed import barrier, get_logger, get_rank, get_world_size, is_main_process
from ev_core.losses.contrastive import ContrastiveOutput, InfoNCELoss, MACLLoss
from ev_core.progress import progress
from ev_core.repro import dump_run_config, seed_everything
from ev_core.ssl.encoder import EncoderOutput, make_momentum_encoder, momentum_update
from ev_core.ssl.queue import NegativeQueue
from ev_core.ssl.views import ViewBatch, ViewGenerator, as_view_batch, move_to_device

__all__ = [
    "ContrastiveLoss",
    "ContrastiveTrainer",
    "LossTerm",
    "LossTermSpec",
    "PretrainConfig",
    "PretrainResult",
    "StepContext",
    "pretrain",
]

_log = get_logger(__name__)


@dataclass
class PretrainConfig:
    """Every setting of a pre-training run (dumped as ``config.json`` beside the outputs).

    Attributes:
        method: ``"simclr"`` (in-batch negatives) or ``"moco"`` (momentum encoder + queue).
        loss: ``"infonce"`` or ``"macl"``.
        temperature: InfoNCE's τ, or MACL's τ0.
        macl_alpha: MACL's α ∈ [0, 1].
        macl_a0: MACL's A0 ∈ [0, 1].
        instance_weight: weight of the instance-contrastive loss (0 turns it off, leaving only
            the extra loss terms).
        queue_size: MoCo queue length K.
        momentum: MoCo momentum m of the key encoder.
        epochs: passes over the loader.
        max_steps: optional cap on optimizer steps (the LR schedule spans
            ``min(max_steps, epochs × steps_per_epoch)``).
        optimizer: ``"sgd"`` (momentum ``sgd_momentum``) or ``"adamw"``; biases and norm
            parameters get no weight decay.
        lr: peak learning rate; with ``lr_scaling="linear"`` it is per 256 images of the
            effective batch (per-rank batch × ``grad_accum_steps`` × world size).
        lr_scaling: ``"linear"`` or ``"none"``.
        weight_decay: weight decay of the weight matrices.
        sgd_momentum: SGD momentum.
        warmup_steps: linear warm-up steps.
        lr_schedule: ``"cosine"`` (to ``min_lr_ratio × lr``) or ``"constant"`` after warm-up.
        min_lr_ratio: final LR as a fraction of the peak (cosine).
        grad_accum_steps: micro-batches per optimizer step.
        clip_grad_norm: max gradient norm, or ``None``.
        amp: mixed precision autocast.
        amp_dtype: ``"auto"`` (bf16 on CPU, fp16 + GradScaler on CUDA), ``"bfloat16"`` or
            ``"float16"`` (with a GradScaler).
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when available, else CPU) or a device string.
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm under DDP on CUDA
            (SyncBatchNorm has no CPU kernel; CPU/gloo runs keep per-rank BatchNorm).
        seed: if set, ``seed_everything(seed + rank)`` at the start of a fresh (not resumed) run.
        out_dir: where ``config.json``, ``metrics.jsonl``, ``checkpoints/`` and the final
            ``encoder.safetensors`` go (``None``: nothing is written).
        resume: continue from ``out_dir/checkpoints/last.safetensors`` when it exists.
        checkpoint_every_steps: also checkpoint every N optimizer steps (always at epoch ends).
        log_every_steps: log (progress bar, history, ``metrics.jsonl``) every N steps.
    """

    method: Literal["simclr", "moco"] = "simclr"
    loss: Literal["infonce", "macl"] = "infonce"
    temperature: float = 0.1
    macl_alpha: float = 0.5
    macl_a0: float = 0.0
    instance_weight: float = 1.0
    queue_size: int = 65536
    momentum: float = 0.999
    epochs: int = 100
    max_steps: int | None = None
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.3
    lr_scaling: Literal["linear", "none"] = "linear"
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = None
    amp: bool = True
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    sync_batchnorm: bool = True
    seed: int | None = 0
    out_dir: str | None = None
    resume: bool = False
    checkpoint_every_steps: int | None = None
    log_every_steps: int = 10

    def __post_init__(self) -> None:
        choices = {
            "method": ("simclr", "moco"),
            "loss": ("infonce", "macl"),
            "optimizer": ("sgd", "adamw"),
            "lr_scaling": ("linear", "none"),
            "lr_schedule": ("cosine", "constant"),
            "amp_dtype": ("auto", "bfloat16", "float16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = {"temperature": self.temperature, "epochs": self.epochs, "lr": self.lr}
        positive |= {"queue_size": self.queue_size, "grad_accum_steps": self.grad_accum_steps}
        positive |= {"log_every_steps": self.log_every_steps}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError(
                f"checkpoint_every_steps must be >= 1, got {self.checkpoint_every_steps}"
            )
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "weight_decay", "instance_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")


@dataclass
class StepContext:
    """Everything an extra loss term may use in one (micro-)step.

    Attributes:
        views: the batch's views (``view1``, ``view2``, optional ``original``, ``extras``).
        online: online-encoder outputs for ``(view1, view2)`` (with gradients).
        momentum: momentum-encoder outputs for ``(view1, view2)`` (MoCo; no gradients).
        original: target-encoder output for ``views.original`` (no gradients): the momentum
            encoder under MoCo, else the online encoder in eval mode; ``None`` without original.
        instance: the instance-contrastive loss output (``None`` if ``instance_weight == 0``).
        model: the online encoder (unwrapped from DDP).
        momentum_encoder: the momentum encoder, or ``None``.
        queue: the MoCo negatives queue, or ``None``.
        distributed: whether losses should gather across DDP ranks (pass it as
            ``gather_distributed=`` to :mod:`ev_core.losses`).
        step: optimizer steps done so far.
        epoch: current epoch (0-based).
    """

    views: ViewBatch
    online: tuple[EncoderOutput, EncoderOutput]
    momentum: tuple[EncoderOutput, EncoderOutput] | None
    original: EncoderOutput | None
    instance: ContrastiveOutput | None
    model: nn.Module
    momentum_encoder: nn.Module | None
    queue: NegativeQueue | None
    distributed: bool
    step: int
    epoch: int


class LossTerm(Protocol):
    """An extra loss term: ``term(ctx) -> Tensor`` (scalar) or ``Mapping[str, Tensor]``.

    Every returned scalar is added to the total loss times the term's weight and logged under
    ``name`` (or ``name/key``). Terms must not own parameters: put trainable parts in the
    encoder's ``extra_heads`` so that DDP synchronises them.
    """

    def __call__(self, ctx: StepContext, /) -> Tensor | Mapping[str, Tensor]: ...


@dataclass
class LossTermSpec:
    """A named, weighted :class:`LossTerm`."""

    name: str
    fn: LossTerm
    weight: float = 1.0


class ContrastiveLoss(Protocol):
    """The instance loss interface (:class:`~ev_core.losses.InfoNCELoss`, ``MACLLoss``)."""

    @property
    def arrangement(self) -> str: ...

    @property
    def gather_distributed(self) -> bool: ...

    def compute(
        self, z1: Tensor, z2: Tensor, negatives: Tensor | None = None
    ) -> ContrastiveOutput: ...


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


# ----------------------------------------------------------------------------------------
# RNG state (saved with checkpoints; plain containers so that weights_only loading works)
# ----------------------------------------------------------------------------------------
def _capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    np_state = cast(tuple[Any, ...], np.random.get_state())
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def _restore_rng(state: Mapping[str, Any], generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


def _loader_generator(loader: Any) -> torch.Generator | None:
    gen = getattr(loader, "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


# ----------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------
class ContrastiveTrainer:
    """Two-view contrastive pre-training (see the module docstring).

    Args:
        encoder: a module returning :class:`EncoderOutput` (e.g. ``build_encoder("resnet18")``).
        config: the run's :class:`PretrainConfig`.
        loss: the instance loss; default built from the config (``InfoNCELoss`` or
            ``MACLLoss`` with ``arrangement`` matching ``config.method``). A given loss must
            use the arrangement of the method and, under DDP, ``gather_distributed=True``.
        loss_terms: extra weighted loss terms (:class:`LossTermSpec`).
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
        self.rank = get_rank()
        self.distributed = self.world_size > 1
        self.device = self._resolve_device(config.device)
        self.amp_dtype, use_scaler = self._resolve_amp()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)

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
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(encoder, device_ids=ids)
            if momentum_encoder is not None:  # start from rank 0's (DDP-broadcast) weights
                for t in momentum_encoder.state_dict().values():
                    dist.broadcast(t, src=0)
                momentum_update(encoder, momentum_encoder, 0.0)
        else:
            self.model = encoder
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

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, float]] = []
        self._total_steps = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._resume_rng: tuple[dict[str, Any], dict[str, Any] | None] | None = None
        self._log_sums: dict[str, Tensor] = {}
        self._log_count = 0

    # ------------------------------------------------------------------ setup helpers
    def _resolve_device(self, device: str) -> torch.device:
        if device != "auto":
            return torch.device(device)
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def _resolve_amp(self) -> tuple[torch.dtype, bool]:
        cfg = self.config
        if cfg.amp_dtype == "auto":
            dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        else:
            dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
        return dtype, cfg.amp and dtype == torch.float16

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

    def _set_lr(self) -> float:
        scale = (self._batch_lr_scale or 1.0) * self.lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["ev_peak_lr"] * scale
        return float(self.optimizer.param_groups[0]["lr"])

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

    def _micro_step(self, batch: Any, n_micro: int) -> dict[str, Tensor]:
        cfg = self.config
        views = self.view_generator(move_to_device(batch, self.device))
        if not isinstance(views, ViewBatch):
            raise TypeError(
                f"the view generator must return a ViewBatch, got {type(views).__name__}"
            )
        if self._batch_lr_scale is None:  # linear scaling: per 256 images of the effective batch
            effective = views.batch_size * cfg.grad_accum_steps * self.world_size
            self._batch_lr_scale = effective / 256
        logs: dict[str, Tensor] = {}
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=cfg.amp)
        with autocast:
            o1, o2 = self._encode(self.model, [views.view1, views.view2])
            momentum: tuple[EncoderOutput, EncoderOutput] | None = None
            if self.momentum_encoder is not None:
                with torch.no_grad():
                    m1, m2 = self._encode(self.momentum_encoder, [views.view1, views.view2])
                momentum = (m1, m2)
                if self.queue is None:
                    self.queue = NegativeQueue(m1.embedding.shape[1], cfg.queue_size).to(
                        self.device
                    )
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
                        raise ValueError(
                            f"loss term {key!r} must be a scalar, got {tuple(v.shape)}"
                        )
                    logs[key] = v.detach()
                    total = spec.weight * v if total is None else total + spec.weight * v
        assert total is not None
        logs["loss"] = total.detach()
        self.scaler.scale(total.float() / n_micro).backward()
        if momentum is not None and self.queue is not None:
            # view by view, so that the queue order matches the single-process global batch
            for keys in (momentum[0].embedding, momentum[1].embedding):
                self.queue.enqueue(keys.float(), gather_distributed=self.distributed)
        return logs

    def _optimizer_step(self) -> float:
        lr = self._set_lr()
        if self.config.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.encoder.parameters(), self.config.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.momentum_encoder is not None:
            momentum_update(self.encoder, self.momentum_encoder, self.config.momentum)
        self.step += 1
        return lr

    # ------------------------------------------------------------------ logging
    def _accumulate_logs(self, logs: Mapping[str, Tensor], n_micro: int) -> None:
        for k, v in logs.items():
            v = v.detach().float() / n_micro
            self._log_sums[k] = self._log_sums[k] + v if k in self._log_sums else v

    def _flush_logs(self, lr: float, bar: Any) -> None:
        if not self._log_sums:
            return
        keys = sorted(self._log_sums)
        values = torch.stack([self._log_sums[k] for k in keys]) / max(self._log_count, 1)
        if self.distributed:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values = values / self.world_size
        record: dict[str, float] = {"step": float(self.step), "epoch": float(self.epoch), "lr": lr}
        record.update({k: float(v) for k, v in zip(keys, values.tolist())})
        self._log_sums, self._log_count = {}, 0
        self.history.append(record)
        if is_main_process():
            bar.set_postfix(
                {k: f"{record[k]:.4g}" for k in ("loss", "temperature", "alignment") if k in record}
            )
            if self.config.out_dir is not None:
                path = Path(self.config.out_dir) / "metrics.jsonl"
                with path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            if self.on_log is not None:
                self.on_log(record)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path | None:
        """``out_dir/checkpoints`` (``None`` without ``out_dir``)."""
        return Path(self.config.out_dir) / "checkpoints" if self.config.out_dir else None

    def _model_tensors(self) -> dict[str, Tensor]:
        state = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        if self.momentum_encoder is not None:
            state |= {f"momentum.{k}": v for k, v in self.momentum_encoder.state_dict().items()}
        if self.queue is not None:
            state |= {f"queue.{k}": v for k, v in self.queue.state_dict().items()}
        return state

    def save_checkpoint(self, generator: torch.Generator | None = None) -> Path | None:
        """Write ``checkpoints/last.safetensors`` (+ ``.json``) and ``last_state.pt``.

        The weights (encoder, momentum encoder, queue) go to safetensors; optimizer, scaler,
        counters and RNG states (per rank) to a ``weights_only``-loadable torch file.
        """
        ckpt = self.checkpoint_dir
        if ckpt is None:
            return None
        counters = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
        rng = _capture_rng(generator)
        if is_main_process():
            save_training_state(
                ckpt / "last_state.pt",
                {
                    **counters,
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": rng,
                    "epoch_rng": self._epoch_rng,
                    "batch_lr_scale": self._batch_lr_scale,
                },
            )
            save_checkpoint(
                ckpt / "last.safetensors",
                self._model_tensors(),
                config=self.config,
                metadata=counters,
            )
        else:
            save_training_state(
                ckpt / f"last_rng_rank{self.rank}.pt",
                {**counters, "rng": rng, "epoch_rng": self._epoch_rng},
            )
        barrier()
        return ckpt / "last.safetensors"

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        """Restore weights, optimizer, scaler, counters and RNG states from a checkpoint.

        Args:
            path: the ``last.safetensors`` file (default: ``out_dir/checkpoints``).
        """
        weights = Path(path) if path is not None else self.checkpoint_dir
        if weights is None:
            raise ValueError("no checkpoint path and no out_dir")
        if weights.is_dir():
            weights = weights / "last.safetensors"
        state, info = load_checkpoint(weights, map_location=str(self.device))
        training = load_torch_file(
            weights.with_name("last_state.pt"), map_location=str(self.device)
        )
        meta = info.get("metadata", {})
        if meta.get("step") != training["step"]:
            raise RuntimeError(
                f"{weights} (step {meta.get('step')}) and last_state.pt (step {training['step']}) "
                "do not belong together"
            )
        self.encoder.load_state_dict(_strip(state, "encoder."))
        if self.momentum_encoder is not None:
            self.momentum_encoder.load_state_dict(_strip(state, "momentum."))
        queue_state = _strip(state, "queue.")
        if queue_state:
            size, dim = queue_state["queue"].shape
            self.queue = NegativeQueue(dim, size).to(self.device)
            self.queue.load_state_dict(queue_state)
        self.optimizer.load_state_dict(training["optimizer"])
        self.scaler.load_state_dict(training["scaler"])
        self._batch_lr_scale = training["batch_lr_scale"]
        self.step, self.epoch = int(training["step"]), int(training["epoch"])
        self.batch_in_epoch = int(training["batch_in_epoch"])
        rng_state = training
        if self.rank > 0:
            rank_file = weights.with_name(f"last_rng_rank{self.rank}.pt")
            if rank_file.is_file():
                rng_state = load_torch_file(rank_file)
                if rng_state["step"] != training["step"]:
                    raise RuntimeError(
                        f"{rank_file} is from step {rng_state['step']}, not {training['step']}"
                    )
            else:
                _log.warning("no RNG state for rank %d in %s: using rank 0's", self.rank, rank_file)
        self._resume_rng = (rng_state["rng"], rng_state["epoch_rng"])

    # ------------------------------------------------------------------ loop
    def _epoch_iterator(self, loader: Any) -> Iterator[Any]:
        generator = _loader_generator(loader)
        set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        batch_sampler_set_epoch = getattr(getattr(loader, "batch_sampler", None), "set_epoch", None)
        if callable(batch_sampler_set_epoch):
            batch_sampler_set_epoch(self.epoch)
        resume, self._resume_rng = self._resume_rng, None
        if resume is not None and self.batch_in_epoch > 0:
            rng, epoch_rng = resume
            if epoch_rng is None:
                raise RuntimeError("mid-epoch checkpoint without the epoch's RNG state")
            _restore_rng(epoch_rng, generator)  # replay the epoch's data order...
            self._epoch_rng = epoch_rng
            it = iter(loader)
            for _ in range(self.batch_in_epoch):
                next(it)
            _restore_rng(rng, generator)  # ...then continue from the saved RNG state
            return it
        if resume is not None:
            _restore_rng(resume[0], generator)
        self._epoch_rng = _capture_rng(generator)
        return iter(loader)

    def fit(self, loader: Any, *, stop_at_step: int | None = None) -> PretrainResult:
        """Train on ``loader`` (a sized iterable of batches; see the module docstring).

        Args:
            loader: e.g. a ``DataLoader`` (use ``DistributedSampler`` under DDP) yielding
                batches the view generator understands. Its length must be known.
            stop_at_step: return after this optimizer step (checkpointing first), e.g. to
                split a run over several jobs; the LR schedule still spans the whole run.

        Returns:
            :class:`PretrainResult`.
        """
        cfg = self.config
        try:
            n_batches = len(loader)
        except TypeError:
            raise TypeError("the loader must have a length (a map-style dataset)") from None
        if n_batches == 0:
            raise ValueError("the loader is empty")
        accum = cfg.grad_accum_steps
        steps_per_epoch = math.ceil(n_batches / accum)
        self._total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps is not None:
            self._total_steps = min(self._total_steps, cfg.max_steps)

        out_dir = Path(cfg.out_dir) if cfg.out_dir is not None else None
        ckpt = self.checkpoint_dir
        if cfg.resume and ckpt is not None and (ckpt / "last.safetensors").is_file():
            self.load_checkpoint(ckpt / "last.safetensors")
            _log.info("resumed from %s at step %d (epoch %d)", ckpt, self.step, self.epoch)
        elif cfg.seed is not None:
            seed_everything(cfg.seed + self.rank)
        if out_dir is not None and is_main_process():
            dump_run_config(
                {
                    "pretrain": cfg,
                    "world_size": self.world_size,
                    "loss": repr(self.loss),
                    "loss_terms": [{"name": s.name, "weight": s.weight} for s in self.loss_terms],
                    "view_generator": repr(self.view_generator),
                },
                out_dir,
            )
        generator = _loader_generator(loader)
        self.model.train()
        if self.momentum_encoder is not None:
            self.momentum_encoder.train()
        lr = float(self.optimizer.param_groups[0]["lr"])
        stopped_early = False
        with progress(total=self._total_steps, initial=self.step, desc="pretrain") as bar:
            while self.epoch < cfg.epochs and self.step < self._total_steps and not stopped_early:
                it = self._epoch_iterator(loader)
                exhausted = True
                for batch_idx, batch in enumerate(it, start=self.batch_in_epoch):
                    group_start = batch_idx - batch_idx % accum
                    n_micro = min(accum, n_batches - group_start)
                    last_micro = batch_idx - group_start == n_micro - 1
                    sync_ctx = (
                        self.model.no_sync()
                        if isinstance(self.model, DistributedDataParallel) and not last_micro
                        else contextlib.nullcontext()
                    )
                    with sync_ctx:
                        logs = self._micro_step(batch, n_micro)
                    self._accumulate_logs(logs, n_micro)
                    self.batch_in_epoch = batch_idx + 1
                    if not last_micro:
                        continue
                    lr = self._optimizer_step()
                    self._log_count += 1
                    bar.update(1)
                    done = self.step >= self._total_steps
                    if self.step % cfg.log_every_steps == 0 or done:
                        self._flush_logs(lr, bar)
                    if done or (stop_at_step is not None and self.step >= stop_at_step):
                        exhausted = self.batch_in_epoch == n_batches
                        stopped_early = not done
                        break
                    every = cfg.checkpoint_every_steps
                    if (
                        every is not None
                        and self.step % every == 0
                        and self.batch_in_epoch < n_batches
                    ):
                        self.save_checkpoint(generator)
                self._flush_logs(lr, bar)
                if exhausted:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                self.save_checkpoint(generator)
        finished = not stopped_early
        encoder_path = None
        if finished and out_dir is not None and is_main_process():
            encoder_path = save_checkpoint(
                out_dir / "encoder.safetensors",
                self.encoder.state_dict(),
                config=cfg,
                metadata={"step": self.step, "epoch": self.epoch},
            )
        barrier()
        return PretrainResult(self.step, self.epoch, list(self.history), encoder_path, finished)


def _average_outputs(a: ContrastiveOutput, b: ContrastiveOutput) -> ContrastiveOutput:
    return ContrastiveOutput(
        loss=(a.loss + b.loss) / 2,
        temperature=(a.temperature + b.temperature) / 2,
        alignment=(a.alignment + b.alignment) / 2,
        accuracy=(a.accuracy + b.accuracy) / 2,
        num_negatives=a.num_negatives,
    )


def _strip(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


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
