"""The settings of a two-view contrastive pre-training run (:class:`PretrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PretrainConfig"]


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
            ``"float16"`` (with a GradScaler, CUDA only).
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when available, else CPU) or a device string.
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm under DDP on CUDA
            (SyncBatchNorm has no CPU kernel; CPU/gloo runs keep per-rank BatchNorm).
        seed: every epoch seeds every RNG (and the loader's generator) from it, the epoch and
            the rank (:func:`ev_core.training.epoch_seed`); ``None`` means 0.
        out_dir: where ``config.json``, ``metrics.jsonl``, ``checkpoints/`` and the final
            ``encoder.safetensors`` go (``None``: nothing is written).
        resume: continue from the newest complete checkpoint in ``out_dir/checkpoints``.
        checkpoint_every_steps: also checkpoint every N optimizer steps (always at epoch ends).
        keep_checkpoints: complete checkpoints kept on disk.
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
    keep_checkpoints: int = 2

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
        positive |= {"keep_checkpoints": self.keep_checkpoints}
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
