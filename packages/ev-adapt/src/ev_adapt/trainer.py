"""MCL and its baselines on ev-core's training engine.

One step (SYSTEMS §6): ``L = L_x + L_fix + λ_cls·L_cls + 1[step > ot_start]·L_ot`` for MCL;
``source_only`` keeps ``L_x``, ``fixmatch`` adds ``L_fix``, ``mme`` adds the minimax entropy.
Every ``eval_every`` steps the raw and the EMA model are evaluated on the target validation
and test sets (MCL's code selects by EMA validation accuracy and reports raw test accuracy:
both are recorded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ev_adapt.config import AdaptConfig
from ev_adapt.data.batches import SSDABatch, SSDABatches
from ev_adapt.data.domains import DomainData
from ev_adapt.losses import (
    PrototypeMemory,
    adversarial_entropy_loss,
    class_contrastive_loss,
    fixmatch_loss,
    prototype_ot_loss,
    supervised_loss,
)
from ev_adapt.models import AdaptNet, grad_reverse
from ev_core.checkpoint import save_checkpoint
from ev_core.io import write_json
from ev_core.training import Engine, EngineConfig, Hook

__all__ = ["AdaptResult", "accuracy", "train_adaptation"]


@dataclass
class AdaptResult:
    """What :func:`train_adaptation` returns.

    Attributes:
        evaluations: one dict per evaluation: ``step``, ``val_acc``, ``test_acc``,
            ``ema_val_acc``, ``ema_test_acc`` (accuracies in %).
        final: the last evaluation.
        best_ema_val: the evaluation with the best EMA validation accuracy (MCL's selection).
        out_dir: where weights, metrics and checkpoints were written (``None`` if nowhere).
    """

    evaluations: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    best_ema_val: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None


@torch.no_grad()
def accuracy(
    model: AdaptNet, data: DomainData, split: str, batch_size: int, device: torch.device
) -> float:
    """Top-1 accuracy (%) of ``model`` on ``split`` (``"validation"`` or ``"test"``)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in data.evaluation(split, batch_size):
        logits, _ = model(x.to(device))
        correct += int((logits.argmax(1).cpu() == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


class _Objective:
    """The step function: loads the lazy batch and computes the method's loss terms."""

    def __init__(self, data: DomainData, config: AdaptConfig, memory: PrototypeMemory) -> None:
        self.data, self.config, self.memory = data, config, memory
        self.source_features: tuple[Tensor, Tensor] | None = None

    def __call__(self, model: nn.Module, batch: SSDABatch, engine: Engine) -> Mapping[str, Tensor]:
        cfg = self.config
        b = engine.to_device(batch.load(self.data))
        x_lab = torch.cat([b["x_source"], b["x_target"]])
        y_lab = torch.cat([b["y_source"], b["y_target"]])
        n_src, n_lab, n_unl = len(b["y_source"]), len(y_lab), len(b["x_weak"])
        # two forward passes, as MCL: batch-norm statistics of the labelled images, then of the
        # unlabelled target views (one pass over everything would mix them)
        logits, feats = model(x_lab)
        terms: dict[str, Tensor] = {"loss_x": supervised_loss(logits, y_lab)}
        self.source_features = (feats[:n_src].detach(), b["y_source"])
        if cfg.method != "source_only":
            unlabeled = [b["x_weak"]]
            if cfg.method in ("mcl", "fixmatch"):
                unlabeled.append(b["x_strong"])
            logits_u, feats_u = model(torch.cat(unlabeled))
            logits = torch.cat([logits, logits_u])
            feats = torch.cat([feats, feats_u])
        if cfg.method in ("mcl", "fixmatch"):
            logits_w = logits[n_lab : n_lab + n_unl]
            logits_s = logits[n_lab + n_unl :]
            terms["loss_fix"], mask = fixmatch_loss(logits_w, logits_s, cfg.threshold, cfg.t2)
            terms["mask_rate"] = mask.mean().detach()
        if cfg.method == "mcl":
            terms["loss_cls"] = class_contrastive_loss(
                logits_w.float().softmax(1), logits_s.float().softmax(1)
            )
            if engine.state.step > cfg.ot_start:  # MCL: batch_idx > warm_steps (0-based)
                feats_w = feats[n_lab : n_lab + n_unl]
                feats_s = feats[n_lab + n_unl :]
                terms["loss_ot"], _ = prototype_ot_loss(
                    feats_w, feats_s, self.memory.prototypes, cfg.ot_reg, cfg.ot_reg_m, cfg.ot_iters
                )
        if cfg.method == "mme":
            raw = engine.raw_model
            assert isinstance(raw, AdaptNet)
            reversed_logits = raw.classify(grad_reverse(feats[n_lab:], 1.0))
            terms["loss_ent"] = adversarial_entropy_loss(reversed_logits, cfg.mme_lambda)
        loss = terms["loss_x"]
        for name, weight in (
            ("loss_fix", 1.0),
            ("loss_cls", cfg.lambda_cls),
            ("loss_ot", 1.0),
            ("loss_ent", 1.0),
        ):
            if name in terms:
                loss = loss + weight * terms[name]
        terms["loss"] = loss
        return terms


def _all_gather_cat(t: Tensor) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class _PrototypeHook(Hook):
    """Updates the prototypes after each optimizer step; saves them with checkpoints."""

    def __init__(self, objective: _Objective) -> None:
        self.objective = objective

    def on_step_end(self, engine: Engine, logs: Mapping[str, float]) -> None:
        if self.objective.source_features is None:
            return
        feats, labels = self.objective.source_features
        if engine.world_size > 1:  # every rank folds in every rank's source features
            feats = _all_gather_cat(feats)
            labels = _all_gather_cat(labels)
        self.objective.memory.update(feats, labels)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.cpu() for k, v in self.objective.memory.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.objective.memory.load_state_dict(dict(state))


class _EvalHook(Hook):
    def __init__(self, data: DomainData, config: AdaptConfig) -> None:
        self.data, self.config = data, config

    def on_eval(self, engine: Engine, epoch: int) -> dict[str, float]:
        raw = engine.raw_model
        assert isinstance(raw, AdaptNet)
        out = {
            "step": float(engine.state.step),
            "val_acc": accuracy(
                raw, self.data, "validation", self.config.eval_batch, engine.device
            ),
            "test_acc": accuracy(raw, self.data, "test", self.config.eval_batch, engine.device),
        }
        if engine.ema is not None:
            ema = engine.ema.module
            assert isinstance(ema, AdaptNet)
            out["ema_val_acc"] = accuracy(
                ema, self.data, "validation", self.config.eval_batch, engine.device
            )
            out["ema_test_acc"] = accuracy(
                ema, self.data, "test", self.config.eval_batch, engine.device
            )
        return out


def train_adaptation(
    data: DomainData,
    model: AdaptNet,
    config: AdaptConfig,
    out_dir: str | Path | None = None,
    model_config: Any = None,
    resume: bool = True,
    stop_at_step: int | None = None,
) -> AdaptResult:
    """Train ``model`` on the scenario ``data`` with ``config.method``.

    Args:
        data: the scenario (e.g. :func:`~ev_adapt.data.digits.digits_shift`).
        model: an :class:`~ev_adapt.models.AdaptNet`.
        config: the run's :class:`~ev_adapt.config.AdaptConfig`.
        out_dir: where ``config.json``, ``metrics.jsonl``, ``checkpoints/``, the final
            ``model.safetensors``/``ema.safetensors`` and ``metrics.json`` go.
        model_config: stored beside the weights (what rebuilds the model).
        resume: continue from the newest checkpoint in ``out_dir`` if there is one.
        stop_at_step: stop after this step (with a checkpoint), e.g. to split a run.

    Returns:
        :class:`AdaptResult`.
    """
    memory = PrototypeMemory(
        data.num_classes, model.fc2.in_features, config.proto_momentum, config.proto_warmup
    )
    classifier = {id(p) for p in model.classifier_parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in classifier], "lr": config.lr},
        {"params": model.classifier_parameters(), "lr": config.lr * config.classifier_lr_mult},
    ]
    optimizer = torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1.0 + config.lr_gamma * step) ** (-config.lr_power)
    )
    objective = _Objective(data, config, memory)
    engine_cfg = EngineConfig(
        epochs=math.ceil(config.steps / config.eval_every),
        max_steps=config.steps,
        device=config.device,
        amp=config.amp,
        ema_decay=config.ema_decay,
        ema_warmup=config.ema_warmup,
        log_every=max(1, min(50, config.eval_every)),
        seed=config.seed,
    )
    engine = Engine(
        model,
        optimizer,
        engine_cfg,
        scheduler=scheduler,
        out_dir=out_dir,
        hooks=[_PrototypeHook(objective), _EvalHook(data, config)],
        run_config=config,
        model_config=model_config,
        name=f"adapt[{config.method}]",
    )
    memory.to(engine.device)
    loader = SSDABatches(
        data, config.eval_every, config.source_batch, config.target_batch, config.unlabeled_batch
    )
    fit = engine.fit(loader, objective, resume=resume, stop_at_step=stop_at_step)
    history = fit.history
    evaluated = [line["step"] for line in history if "eval" in line]
    if fit.finished and (not evaluated or evaluated[-1] != engine.state.step):
        engine.evaluate()  # the run ended between evaluation points
        history = engine.history
    evaluations = [dict(line["eval"]) for line in history if "eval" in line]
    result = AdaptResult(
        evaluations=evaluations, out_dir=Path(out_dir) if out_dir is not None else None
    )
    if evaluations:
        result.final = evaluations[-1]
        result.best_ema_val = max(evaluations, key=lambda e: e.get("ema_val_acc", e["val_acc"]))
    if out_dir is not None and fit.finished and engine.is_main:
        out = Path(out_dir)
        meta = {"step": engine.state.step, "method": config.method}
        save_checkpoint(
            out / "model.safetensors", engine.raw_model.state_dict(), model_config, meta
        )
        if engine.ema is not None:
            save_checkpoint(
                out / "ema.safetensors", engine.ema.module.state_dict(), model_config, meta
            )
        write_json(
            out / "metrics.json",
            {
                "final": result.final,
                "best_ema_val": result.best_ema_val,
                "evaluations": evaluations,
            },
        )
    return result
