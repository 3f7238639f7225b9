"""PointMatch training (and the labelled-points-only baseline) on ``ev_core.training.Engine``.

Per step, on a batch of point subsets drawn from the training scenes (every labelled point of
a scene is always in its subset):

* weak view (rotation, flip, scale, jitter) and strong view (weak + jitter, smooth distortion,
  colour changes) of the same points;
* ``CE(student(weak), y) + CE(student(strong), y)`` on the labelled points;
* the EMA teacher (``engine.ema``, timm warm-up of the decay) on the weak view gives
  probabilities, aligned to the labelled points' class frequencies (``distribution_alignment``,
  :func:`~ev_points.pointmatch.labels.align_distribution`), and from them pseudo-labels
  (confidence ≥ ``threshold``, labels propagated to their nearest neighbours where the teacher
  agrees, :func:`~ev_points.pointmatch.labels.pseudo_labels`);
* ``+ λ(t) · CE(student(strong), pseudo)``, class-balanced (``class_balance``,
  :func:`~ev_points.pointmatch.labels.class_balance_weights`), λ ramped linearly over the
  first ``rampup_fraction`` of the steps.

Alignment and balancing are our additions to SYSTEMS.md §5.1's design (the paper's abstract
says nothing at that level): without them the confident pseudo-labels on sparse labels were
almost all floor/wall/bookcase/sofa in our tuning runs, and self-training erased the small
classes. BENCHMARKS.md has PointMatch with and without them against the baseline (3 seeds).

``method="labelled-only"`` (the baseline) trains on the same labelled-point terms alone
(``labelled_views="both"``: the weak and the strong view, as PointMatch's supervised part), with
the same EMA of its weights for evaluation, so the comparison isolates the pseudo-label term.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ev_core.errors import EvError
from ev_core.training import Engine, EngineConfig, FitResult, Hook, StepFn
from ev_points.data.scene import IGNORE_INDEX, PointScene
from ev_points.metrics import SegmentationMeter
from ev_points.models import PointUNet, PointUNetConfig
from ev_points.pointmatch.augment import AugmentConfig, strong_view, weak_view
from ev_points.pointmatch.labels import (
    align_distribution,
    class_balance_weights,
    label_prior,
    pseudo_labels,
    weak_label_mask,
)

__all__ = [
    "LABELLED_VIEWS",
    "METHODS",
    "PointMatchConfig",
    "TrainOutcome",
    "WeakLabelDataset",
    "evaluate",
    "make_step_fn",
    "predict_scene",
    "train_pointmatch",
]

METHODS = ("pointmatch", "labelled-only")
LABELLED_VIEWS = ("both", "weak")


@dataclass
class PointMatchConfig:
    """Everything a PointMatch (or baseline) run needs; dumped to ``out_dir/config.json``.

    Attributes:
        method: ``"pointmatch"`` or ``"labelled-only"``.
        label_ratio: fraction of each scene's points labelled (0.001 = "0.1 %").
        points_per_class: label this many points per class instead (``label_ratio=None``).
        label_seed: seed of the weak-label choice.
        num_points: points per training sample (a random subset of a scene).
        batch_size: samples per step.
        steps: optimizer steps.
        lr / weight_decay: AdamW with a cosine schedule.
        labelled_views: ``"both"``: CE on the labelled points of the weak and the strong view
            (PointMatch's supervised part; also the baseline's by default, so that the
            comparison isolates the pseudo-label term); ``"weak"``: the weak view only.
        threshold: teacher confidence needed for a pseudo-label.
        propagate_k: neighbours a label spreads to where the teacher agrees.
        consistency_weight: λ after the ramp-up.
        rampup_fraction: share of the steps over which λ rises linearly from 0.
        distribution_alignment: scale the teacher's probabilities by labelled class frequency /
            running mean of the teacher's predictions before thresholding (ratio protocol
            only: N-per-class labels do not estimate the class frequencies).
        alignment_momentum: momentum of that running mean (0.99: about the last 100 batches;
            the batch mean alone, 0, over-corrects batches whose rooms lack a class).
        class_balance: weight the pseudo-label CE per class by labelled frequency / share
            among the pseudo-labels (ratio protocol only, as the alignment).
        ema_decay: decay of the EMA of the weights (timm warm-up, so the average covers about
            the last 10 % of the steps until ``decay`` binds): PointMatch's teacher, and the
            weights evaluated for both methods. Without the warm-up a decay of 0.99 keeps
            0.99^t of the random initial weights: the teacher was at 3 mIoU after 100 steps.
        model: the :class:`PointUNetConfig` (``num_classes`` is set from the data).
        augment: the views.
        engine: device/AMP/checkpointing (``max_steps`` is set from ``steps``).
    """

    method: str = "pointmatch"
    label_ratio: float | None = 0.001
    points_per_class: int | None = None
    label_seed: int = 0
    num_points: int = 4096
    batch_size: int = 4
    steps: int = 2000
    lr: float = 3e-3
    weight_decay: float = 1e-4
    labelled_views: str = "both"
    threshold: float = 0.9
    propagate_k: int = 8
    consistency_weight: float = 1.0
    rampup_fraction: float = 0.1
    distribution_alignment: bool = True
    alignment_momentum: float = 0.99
    class_balance: bool = True
    ema_decay: float | None = 0.999
    model: PointUNetConfig = field(default_factory=PointUNetConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EvError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.labelled_views not in LABELLED_VIEWS:
            raise EvError(
                f"labelled_views must be one of {LABELLED_VIEWS}, got {self.labelled_views!r}"
            )
        if self.steps < 1 or self.batch_size < 1 or self.num_points < 8:
            raise EvError("steps and batch_size must be >= 1 and num_points >= 8")
        if not 0 <= self.threshold <= 1:
            raise EvError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0 <= self.alignment_momentum < 1:
            raise EvError(f"alignment_momentum must be in [0, 1), got {self.alignment_momentum}")


class WeakLabelDataset(Dataset):
    """Random ``num_points`` subsets of the scenes; only the weak labels are exposed.

    Each item: ``{"xyz" [n, 3] f32, "rgb" [n, 3] f32 in 0..1, "label" [n] i64 (-1 = unlabelled),
    "target" [n] i64 (full labels, for monitoring only)}``. Draws use torch's RNG (seeded by the
    engine every epoch).
    """

    def __init__(
        self,
        scenes: Sequence[PointScene],
        masks: Sequence[np.ndarray],
        num_points: int,
        length: int,
    ) -> None:
        if not scenes:
            raise EvError("no training scenes")
        self.scenes, self.num_points, self.length = list(scenes), num_points, length
        self.xyz = [torch.from_numpy(s.coord) for s in scenes]
        self.rgb = [torch.from_numpy(s.color).float() / 255 for s in scenes]
        self.target = [torch.from_numpy(s.segment.astype(np.int64)) for s in scenes]
        self.label = [
            torch.where(torch.from_numpy(m), t, IGNORE_INDEX)
            for m, t in zip(masks, self.target, strict=True)
        ]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        s = i % len(self.scenes)
        p = self.xyz[s].shape[0]
        labelled = (self.label[s] >= 0).nonzero(as_tuple=True)[0]
        n = self.num_points
        if p >= n:
            pick = torch.randperm(p)[:n]
            missing = labelled[~torch.isin(labelled, pick)]
            if len(missing):  # keep every labelled point (up to n): replace unlabelled picks
                free = (~torch.isin(pick, labelled)).nonzero(as_tuple=True)[0]
                m = min(len(free), len(missing))
                pick[free[:m]] = missing[:m]
        else:
            pick = torch.cat([torch.randperm(p), torch.randint(0, p, (n - p,))])
        return {
            "xyz": self.xyz[s][pick],
            "rgb": self.rgb[s][pick],
            "label": self.label[s][pick],
            "target": self.target[s][pick],
        }


def _ramp(engine: Engine, cfg: PointMatchConfig) -> float:
    total = max(1, int(cfg.rampup_fraction * cfg.steps))
    return cfg.consistency_weight * min(1.0, engine.state.step / total)


def make_step_fn(cfg: PointMatchConfig, class_prior: Tensor | None = None) -> StepFn:
    """The step function for :meth:`Engine.fit` (see the module docstring).

    Args:
        cfg: the run's settings.
        class_prior: ``[C]`` estimated class frequencies for the alignment and the balancing
            (:func:`~ev_points.pointmatch.labels.label_prior` of randomly sampled labels); None:
            neither runs (the plain design), whatever ``cfg`` says.

    Besides the loss terms it logs, per step, ``pseudo_ratio`` (share of all points with a
    target), ``pseudo_coverage`` and ``pseudo_acc`` (share of the unlabelled points with a
    pseudo-label, and their accuracy against the hidden full labels: monitoring only) and
    ``teacher_acc`` (the teacher's argmax accuracy on the unlabelled points).
    """
    num_classes = cfg.model.num_classes
    prior = class_prior
    if prior is not None and prior.shape != (num_classes,):
        raise EvError(f"class_prior must have shape ({num_classes},), got {tuple(prior.shape)}")

    def step(model: torch.nn.Module, batch: dict[str, Tensor], engine: Engine) -> dict[str, Tensor]:
        batch = engine.to_device(batch)
        xyz, rgb, label = batch["xyz"], batch["rgb"], batch["label"]
        wx, wf = weak_view(xyz, rgb, cfg.augment)
        raw = engine.raw_model
        if not isinstance(raw, PointUNet):
            raise EvError(f"PointMatch trains a PointUNet, got {type(raw).__name__}")
        w_pyr = raw.pyramid(wx)
        logits_w = model(wx, wf, w_pyr)
        has = label >= 0
        zero = logits_w.sum() * 0
        sup = F.cross_entropy(logits_w[has].float(), label[has]) if has.any() else zero
        if cfg.method == "labelled-only" and cfg.labelled_views == "weak":
            return {"loss": sup, "loss_labelled": sup.detach()}
        sx, sf = strong_view(wx, wf, cfg.augment)
        logits_s = model(sx, sf, raw.pyramid(sx))
        if cfg.labelled_views == "both":
            sup_s = F.cross_entropy(logits_s[has].float(), label[has]) if has.any() else zero
            sup = sup + sup_s
        if cfg.method == "labelled-only":
            return {"loss": sup, "loss_labelled": sup.detach()}
        with torch.no_grad():
            teacher: torch.nn.Module = engine.ema.module if engine.ema is not None else raw
            probs = teacher(wx, wf, w_pyr).float().softmax(-1)
            teacher_guess = probs.argmax(-1)
            if cfg.distribution_alignment and prior is not None:
                probs = align_distribution(probs, prior, _teacher_mean(probs, engine, cfg))
            pseudo = pseudo_labels(
                probs, wx, label, threshold=cfg.threshold, propagate_k=cfg.propagate_k
            )
        valid = pseudo >= 0
        if valid.any():
            weight = (
                class_balance_weights(pseudo[valid], prior)
                if cfg.class_balance and prior is not None
                else None
            )
            unsup = F.cross_entropy(logits_s[valid].float(), pseudo[valid], weight=weight)
        else:
            unsup = zero
        lam = _ramp(engine, cfg)
        return {
            "loss": sup + lam * unsup,
            "loss_labelled": sup.detach(),
            "loss_pseudo": unsup.detach(),
            "lambda": torch.tensor(lam),
            "pseudo_ratio": valid.float().mean(),
            **_pseudo_stats(pseudo, teacher_guess, label, batch["target"]),
        }

    return step


TEACHER_MEAN_KEY = "pointmatch_teacher_mean"


@torch.no_grad()
def _teacher_mean(probs: Tensor, engine: Engine, cfg: PointMatchConfig) -> Tensor:
    """Update and return the running mean of the teacher's class distribution, kept in
    ``engine.extra_state`` so that it is checkpointed and resumed (averaged over DDP ranks)."""
    batch = probs.reshape(-1, probs.shape[-1]).mean(0)
    if engine.world_size > 1:
        torch.distributed.all_reduce(batch)
        batch /= engine.world_size
    previous = engine.extra_state.get(TEACHER_MEAN_KEY)
    m = cfg.alignment_momentum
    mean = batch if previous is None else m * previous.to(batch) + (1 - m) * batch
    engine.extra_state[TEACHER_MEAN_KEY] = mean.cpu()
    return mean


@torch.no_grad()
def _pseudo_stats(
    pseudo: Tensor, guess: Tensor, label: Tensor, target: Tensor
) -> dict[str, Tensor]:
    """Coverage / accuracy of the pseudo-labels and the teacher on the unlabelled points
    (0 where there is nothing to count, so that metrics.jsonl stays strict JSON)."""
    free = (label < 0) & (target >= 0)
    covered = free & (pseudo >= 0)

    def share(x: Tensor, of: Tensor) -> Tensor:
        return x.float().sum() / of.float().sum().clamp_min(1)

    return {
        "pseudo_coverage": share(covered, free),
        "pseudo_acc": share(covered & (pseudo == target), covered),
        "teacher_acc": share(free & (guess == target), free),
    }


@torch.no_grad()
def predict_scene(
    model: PointUNet, scene: PointScene, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Class of every point of ``scene`` (one forward over the whole scene)."""
    model.eval()
    xyz = torch.from_numpy(scene.coord)[None].to(device)
    rgb = (torch.from_numpy(scene.color).float() / 255)[None].to(device)
    return model(xyz, rgb).argmax(-1)[0].cpu().numpy()


def evaluate(
    model: PointUNet,
    scenes: Sequence[PointScene],
    num_classes: int,
    class_names: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """mIoU / OA / mAcc / per-class IoU over ``scenes`` (all points, no test-time augmentation)."""
    meter = SegmentationMeter(num_classes, IGNORE_INDEX, class_names)
    was_training = model.training
    for scene in scenes:
        meter.update(predict_scene(model, scene, device), scene.segment)
    model.train(was_training)
    out: dict[str, Any] = dict(meter.compute())
    out["protocol"] = "all original points, no TTA"
    return out


@dataclass
class TrainOutcome:
    """What :func:`train_pointmatch` returns.

    Attributes:
        model: the trained weights (PointMatch's student).
        teacher: the EMA of the weights (PointMatch's teacher; for the baseline the same
            average, not used in its training); None when ``ema_decay`` is None. Evaluate this.
        fit: the engine's result.
        labelled_points / total_points: over the training scenes.
        history: the logged lines (see :func:`make_step_fn`).
    """

    model: PointUNet
    teacher: PointUNet | None
    fit: FitResult
    labelled_points: int
    total_points: int
    history: list[dict[str, Any]]


class _EvalHook(Hook):
    def __init__(
        self, scenes: list[PointScene], num_classes: int, names: Sequence[str] | None
    ) -> None:
        self.scenes, self.num_classes, self.names = scenes, num_classes, names

    def on_eval(self, engine: Engine, epoch: int) -> dict[str, float] | None:
        model = engine.ema.module if engine.ema is not None else engine.raw_model
        if not isinstance(model, PointUNet):  # pragma: no cover - train_pointmatch builds one
            return None
        res = evaluate(model, self.scenes, self.num_classes, self.names, engine.device)
        return {"val_miou": res["miou"], "val_oa": res["oa"]}


def train_pointmatch(
    scenes: Sequence[PointScene],
    num_classes: int,
    config: PointMatchConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    eval_scenes: Sequence[PointScene] | None = None,
    class_names: Sequence[str] | None = None,
    resume: bool = True,
) -> TrainOutcome:
    """Train a :class:`PointUNet` on weakly labelled ``scenes`` with PointMatch or the baseline.

    The weak labels are drawn by :func:`weak_label_mask` from ``config.label_seed``; under the
    ratio protocol their class frequencies are the prior of the alignment and the balancing
    (with ``points_per_class`` neither runs: such labels say nothing about the frequencies). With ``out_dir`` the
    engine writes ``config.json``, ``metrics.jsonl`` and resumable checkpoints.
    """
    cfg = config or PointMatchConfig()
    model_cfg = dataclasses.replace(cfg.model, num_classes=num_classes)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    masks = [
        weak_label_mask(
            s, ratio=cfg.label_ratio, per_class=cfg.points_per_class, seed=cfg.label_seed
        )
        for s in scenes
    ]
    engine_cfg = dataclasses.replace(
        cfg.engine,
        max_steps=cfg.steps,
        epochs=max(cfg.engine.epochs, 10**6),
        ema_decay=cfg.ema_decay,  # both methods: the baseline is evaluated with its EMA too
        ema_warmup=True,
        eval_every=cfg.engine.eval_every if eval_scenes else 0,
    )
    torch.manual_seed(cfg.engine.seed)
    model = PointUNet(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    hooks = [_EvalHook(list(eval_scenes), num_classes, class_names)] if eval_scenes else []
    engine = Engine(model, optimizer, engine_cfg, scheduler=scheduler, out_dir=out_dir, hooks=hooks,
                    run_config=cfg, model_config=dataclasses.asdict(model_cfg), name=cfg.method)  # fmt: skip
    samples = cfg.batch_size * max(1, min(cfg.steps, 50))  # an "epoch" of at most 50 steps
    data = WeakLabelDataset(scenes, masks, cfg.num_points, samples * engine.world_size)
    if engine.world_size > 1:  # each rank its share; the engine calls set_epoch
        sampler: DistributedSampler[dict[str, Tensor]] = DistributedSampler(
            data, engine.world_size, engine.rank, shuffle=True, seed=cfg.engine.seed, drop_last=True
        )
        loader = DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    else:
        gen = torch.Generator().manual_seed(cfg.engine.seed)
        loader = DataLoader(
            data, batch_size=cfg.batch_size, shuffle=True, generator=gen, drop_last=True
        )
    # the ratio protocol's labels are a uniform random sample: their class histogram estimates
    # the class frequencies; N-per-class labels are uniform by construction and would pull the
    # teacher towards the rare classes (worse at 1 per class in tuning runs, not recorded)
    prior = (
        label_prior(
            [np.where(m, s.segment, IGNORE_INDEX) for s, m in zip(scenes, masks, strict=True)],
            num_classes,
        )
        if cfg.label_ratio is not None
        else None
    )
    fit = engine.fit(loader, make_step_fn(cfg, prior), resume=resume)
    teacher = engine.ema.module if engine.ema is not None else None
    return TrainOutcome(
        model=engine.raw_model,  # type: ignore[arg-type]
        teacher=teacher,  # type: ignore[arg-type]
        fit=fit,
        labelled_points=int(sum(m.sum() for m in masks)),
        total_points=int(sum(len(s) for s in scenes)),
        history=list(fit.history),
    )
