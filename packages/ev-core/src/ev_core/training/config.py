"""The engine's settings: one dataclass, the single source of its defaults."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineConfig"]

_AMP_CHOICES = ("auto", "off", "bf16", "fp16")


@dataclass
class EngineConfig:
    """How :class:`~ev_core.training.Engine` runs a loop (dumped beside a run's outputs).

    Attributes:
        epochs: passes over the loader.
        max_steps: stop after this many optimizer steps (``None``: ``epochs`` decides).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        amp: ``"auto"`` (bf16 on a CUDA device that supports it, else off), ``"off"``,
            ``"bf16"`` (CPU or CUDA) or ``"fp16"`` (CUDA only, with a gradient scaler).
        grad_accum_steps: micro-batches per optimizer step.
        clip_grad_norm: clip the total gradient norm to this value (``None``: no clipping;
            the norm is computed and logged either way).
        ema_decay: keep an exponential moving average of the weights (``None``: no EMA).
        ema_warmup: timm-style warm-up of the EMA decay, ``min(decay, (1+t)/(10+t))``.
        checkpoint_every: optimizer steps between mid-epoch checkpoints (``0``: only at
            the end of each epoch).
        keep_checkpoints: complete checkpoints kept on disk (the newest ones).
        log_every: optimizer steps between progress updates / ``metrics.jsonl`` lines.
        eval_every: epochs between ``on_eval`` hook calls (``0``: never).
        seed: base seed; epoch ``e`` seeds every RNG with :func:`epoch_seed` of it.
        divergence_factor: warn once when a logged loss exceeds this multiple of the first
            loss of the run (in absolute value).
        find_unused_parameters: passed to ``DistributedDataParallel``.
    """

    epochs: int = 1
    max_steps: int | None = None
    device: str = "auto"
    amp: str = "auto"
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = None
    ema_decay: float | None = None
    ema_warmup: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 1
    seed: int = 0
    divergence_factor: float = 1e3
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.amp not in _AMP_CHOICES:
            raise ValueError(f"amp must be one of {_AMP_CHOICES}, got {self.amp!r}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")
        if self.divergence_factor <= 1:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")
