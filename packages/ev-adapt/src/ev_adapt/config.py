"""The settings of an adaptation run: one dataclass, its per-benchmark presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["METHODS", "PRESETS", "AdaptConfig"]

METHODS = ("mcl", "source_only", "fixmatch", "mme")


@dataclass
class AdaptConfig:
    """Everything a run uses (dumped as ``config.json`` beside its outputs).

    Defaults are MCL's DomainNet settings (SYSTEMS §6); :meth:`preset` gives the others.

    Attributes:
        method: ``"mcl"``; or a baseline in the same trainer: ``"source_only"`` (labelled source
            + labelled target), ``"fixmatch"`` (+ sample-level consistency), ``"mme"`` (+ minimax
            entropy).
        steps: optimizer steps.
        eval_every: steps between evaluations (and checkpoints).
        lr: backbone learning rate (the classifier gets ``lr · classifier_lr_mult``).
        classifier_lr_mult: 10 in MCL.
        momentum, weight_decay: SGD (Nesterov) settings.
        lr_gamma, lr_power: inverse decay ``lr · (1 + γ·step)^−power``.
        source_batch, target_batch, unlabeled_batch: images per step of each pool.
        threshold: FixMatch confidence threshold.
        t2: temperature multiplying the weak logits for pseudo-labels.
        lambda_cls: weight of the class-level loss.
        ot_start: the OT loss is added after this many steps.
        ot_reg, ot_reg_m, ot_iters: unbalanced Sinkhorn settings.
        proto_momentum, proto_warmup: prototype EMA momentum, and updates with momentum 0.
        mme_lambda: MME's entropy weight.
        ema_decay: the EMA model's decay (evaluated beside the raw model).
        ema_warmup: warm the decay up as ``min(decay, (1+t)/(10+t))`` (for short runs).
        eval_batch: evaluation batch size.
        device, amp: passed to the training engine.
        seed: the run's seed.
    """

    method: str = "mcl"
    steps: int = 50_000
    eval_every: int = 500
    lr: float = 1e-3
    classifier_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_gamma: float = 1e-4
    lr_power: float = 0.75
    source_batch: int = 24
    target_batch: int = 24
    unlabeled_batch: int = 48
    threshold: float = 0.95
    t2: float = 1.0
    lambda_cls: float = 1.0
    ot_start: int = 250
    ot_reg: float = 1.0
    ot_reg_m: float = 1.0
    ot_iters: int = 100
    proto_momentum: float = 0.9
    proto_warmup: int = 20
    mme_lambda: float = 0.1
    ema_decay: float = 0.99
    ema_warmup: bool = False
    eval_batch: int = 256
    device: str = "auto"
    amp: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in (
            "steps",
            "eval_every",
            "source_batch",
            "target_batch",
            "unlabeled_batch",
            "eval_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")

    @classmethod
    def preset(cls, benchmark: str, **overrides: object) -> AdaptConfig:
        """The settings of ``benchmark`` (``"multi"``, ``"office_home"``, ``"visda"``, ``"digits"``).

        Raises:
            ValueError: for an unknown benchmark.
        """
        if benchmark not in PRESETS:
            raise ValueError(f"benchmark must be one of {sorted(PRESETS)}, got {benchmark!r}")
        settings: dict[str, Any] = {**PRESETS[benchmark], **overrides}
        return dataclasses.replace(cls(), **settings)


PRESETS: dict[str, dict[str, object]] = {
    "multi": {"t2": 1.0, "lambda_cls": 1.0},  # DomainNet-126
    "office_home": {"t2": 1.25, "lambda_cls": 0.2},
    # VisDA: MCL's paper gives no separate values; DomainNet's are used
    "visda": {"t2": 1.0, "lambda_cls": 1.0},
    # the digits shift (a small CNN from scratch): shorter, faster schedule
    "digits": {
        "steps": 600,
        "eval_every": 100,
        "lr": 0.03,
        "classifier_lr_mult": 1.0,
        "lr_gamma": 1e-3,
        "ot_start": 250,
        "ema_decay": 0.99,
        "ema_warmup": True,
        "eval_batch": 1024,
    },
}
