"""PointMatch pieces: reproducible weak labels, views, pseudo-labels, the U-Net, and a short
run in which PointMatch beats the labelled-points-only baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ev_core.errors import EvError
from ev_core.training import Engine, EngineConfig
from ev_points.data import (
    IGNORE_INDEX,
    SYNTHETIC_CLASSES,
    PointScene,
    SyntheticSceneConfig,
    make_synthetic_scene,
    make_synthetic_scenes,
)
from ev_points.data.scene import PointDataError
from ev_points.models import PointUNet, PointUNetConfig
from ev_points.pointmatch import (
    AugmentConfig,
    PointMatchConfig,
    WeakLabelDataset,
    align_distribution,
    class_balance_weights,
    evaluate,
    label_prior,
    make_step_fn,
    pseudo_labels,
    strong_view,
    train_pointmatch,
    weak_label_mask,
    weak_view,
)
from ev_points.pointmatch.train import TEACHER_MEAN_KEY


def test_weak_labels_reproducible_and_sized() -> None:
    scene = make_synthetic_scene(0, SyntheticSceneConfig(num_points=20_000))
    a = weak_label_mask(scene, ratio=0.001, seed=3)
    b = weak_label_mask(scene, ratio=0.001, seed=3)
    c = weak_label_mask(scene, ratio=0.001, seed=4)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 20 and not np.array_equal(a, c)
    assert weak_label_mask(scene, ratio=0.0001, seed=0).sum() == 2
    tiny = make_synthetic_scene(1, SyntheticSceneConfig(num_points=500))
    assert weak_label_mask(tiny, ratio=0.0001).sum() == 1  # at least one point per scene
    per = weak_label_mask(scene, per_class=3, seed=0)
    assert (np.bincount(scene.segment[per], minlength=7) == 3).all()
    ignored = PointScene(
        "x", scene.coord, scene.color, np.full(len(scene), IGNORE_INDEX), scene.instance
    )
    assert weak_label_mask(ignored, ratio=0.5).sum() == 0
    with pytest.raises(PointDataError):
        weak_label_mask(scene, ratio=0.1, per_class=2)


def test_dataset_keeps_every_labelled_point() -> None:
    scenes = make_synthetic_scenes(2, 0, SyntheticSceneConfig(num_points=3000))
    masks = [weak_label_mask(s, ratio=0.01) for s in scenes]
    data = WeakLabelDataset(scenes, masks, num_points=256, length=4)
    item = data[1]
    assert item["xyz"].shape == (256, 3) and item["rgb"].max() <= 1
    assert int((item["label"] >= 0).sum()) == int(masks[1].sum())
    agree = item["label"] >= 0
    assert torch.equal(item["label"][agree], item["target"][agree])


def test_views_keep_point_order_and_shape() -> None:
    torch.manual_seed(0)
    xyz = torch.rand(2, 100, 3) * 4
    rgb = torch.rand(2, 100, 3)
    wx, wf = weak_view(xyz, rgb, AugmentConfig(jitter=0.0, scale=(1.0, 1.0)))

    # a rigid motion (rotation/flip about the centroid): pairwise distances unchanged
    def pairwise(p: torch.Tensor) -> torch.Tensor:
        p = p.double()
        return ((p[:, :, None] - p[:, None]) ** 2).sum(-1)

    torch.testing.assert_close(pairwise(wx), pairwise(xyz), rtol=1e-5, atol=1e-5)
    assert torch.equal(wf, rgb)
    sx, sf = strong_view(wx, wf, AugmentConfig())
    assert sx.shape == wx.shape and (sx - wx).abs().max() < 0.05 + 0.02 + 1e-6
    assert sf.min() >= 0 and sf.max() <= 1 and not torch.equal(sf, wf)


def test_pseudo_labels_threshold_propagation_and_override() -> None:
    xyz = torch.tensor([[[0.0, 0, 0], [0.1, 0, 0], [0.2, 0, 0], [5.0, 0, 0], [5.1, 0, 0]]])
    probs = torch.tensor([[[0.5, 0.5], [0.6, 0.4], [0.3, 0.7], [0.05, 0.95], [0.6, 0.4]]])
    labels = torch.tensor([[0, -1, -1, -1, -1]])
    out = pseudo_labels(probs, xyz, labels, threshold=0.9, propagate_k=2)
    # 0: labelled; 1: near the seed, teacher agrees (0) -> 0; 2: near but teacher says 1 and
    # is not confident -> none; 3: confident -> 1; 4: far, unconfident -> none
    assert out.tolist() == [[0, 0, -1, 1, -1]]
    assert pseudo_labels(probs, xyz, labels, threshold=0.9, propagate_k=0).tolist() == [
        [0, -1, -1, 1, -1]
    ]


def test_label_prior_counts_labelled_points_only() -> None:
    labels = [np.array([0, 0, -1, 2]), np.array([[2, -1], [2, 0]])]
    prior = label_prior(labels, 4, smoothing=1.0)
    expected = np.array([3 + 1, 0 + 1, 3 + 1, 0 + 1], dtype=np.float64)
    np.testing.assert_allclose(prior.numpy(), expected / expected.sum(), rtol=1e-6)
    np.testing.assert_allclose(label_prior([np.array([-1])], 2).numpy(), [0.5, 0.5])
    with pytest.raises(PointDataError, match="num_classes"):
        label_prior([np.array([5])], 3)


def test_align_distribution_matches_explicit_formula() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 50, 4, generator=g, dtype=torch.float64).softmax(-1)
    prior = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    out = align_distribution(probs, prior)
    mean = probs.reshape(-1, 4).mean(0)
    ref = torch.empty_like(probs)
    for b in range(2):
        for i in range(50):
            row = [float(probs[b, i, c] * prior[c] / mean[c]) for c in range(4)]
            ref[b, i] = torch.tensor(row, dtype=torch.float64) / sum(row)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # a teacher whose mean already is the prior is left unchanged
    torch.testing.assert_close(align_distribution(probs, mean), probs, rtol=1e-12, atol=1e-12)
    # an explicit reference (a running mean) replaces the batch mean
    reference = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    scaled = probs * prior / reference
    torch.testing.assert_close(
        align_distribution(probs, prior, reference),
        scaled / scaled.sum(-1, keepdim=True),
        rtol=1e-12,
        atol=1e-12,
    )
    # the alignment raises the share of the rare class it was under-predicting
    skew = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]], dtype=torch.float64)
    aligned = align_distribution(skew, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert (aligned[..., 1] > skew[..., 1]).all()


def test_class_balance_weights_reweight_to_the_prior() -> None:
    pseudo = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 3, 3])  # class 2 absent
    prior = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    w = class_balance_weights(pseudo, prior)
    share = torch.tensor([0.6, 0.2, 0.0, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.25 / 0.6, 0.25 / 0.2, 0.0, 0.25 / 0.2], dtype=torch.float64)
    torch.testing.assert_close(w, ref, rtol=1e-12, atol=0)
    # every present class gets the same total weight (the prior is uniform): N * prior_c
    totals = w * share * len(pseudo)
    torch.testing.assert_close(totals[[0, 1, 3]], torch.full((3,), 2.5, dtype=torch.float64))
    logits = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    nll = -logits.log_softmax(-1)[torch.arange(10), pseudo]
    torch.testing.assert_close(
        torch.nn.functional.cross_entropy(logits, pseudo, weight=w),
        (w[pseudo] * nll).sum() / w[pseudo].sum(),
        rtol=1e-12,
        atol=1e-12,
    )


def test_baseline_has_an_ema_and_pointmatch_logs_pseudo_label_quality() -> None:
    scenes = make_synthetic_scenes(2, 0, SyntheticSceneConfig(num_points=800))
    outs = {}
    for method in ("labelled-only", "pointmatch"):
        cfg = PointMatchConfig(
            method=method, label_ratio=0.02, num_points=256, batch_size=2, steps=3,
            threshold=0.0, model=PointUNetConfig.tiny(7),
            engine=EngineConfig(device="cpu", amp="off", seed=0, log_every=1, eval_every=0),
        )  # fmt: skip
        outs[method] = train_pointmatch(scenes, 7, cfg)
    for out in outs.values():  # both methods are evaluated with an EMA of their weights
        assert out.teacher is not None
        assert not torch.equal(out.teacher.head.weight, out.model.head.weight)
    base_logs = [h for h in outs["labelled-only"].history if "loss" in h]
    assert base_logs and all("loss_pseudo" not in h for h in base_logs)
    logs = [h for h in outs["pointmatch"].history if "pseudo_coverage" in h]
    assert len(logs) == 3
    for h in logs:  # threshold 0: every unlabelled point gets a pseudo-label
        assert h["pseudo_coverage"] == 1.0 and h["pseudo_ratio"] == 1.0
        assert 0.0 <= h["pseudo_acc"] <= 1.0 and 0.0 <= h["teacher_acc"] <= 1.0
    with pytest.raises(EvError, match="labelled_views"):
        PointMatchConfig(labelled_views="strong")


def test_pointmatch_resume_restores_the_alignment_mean(tmp_path) -> None:
    """A run stopped after 2 steps and resumed ends bit-identical to an uninterrupted one,
    including the running mean of the teacher's predictions (checkpointed in extra_state)."""
    scenes = make_synthetic_scenes(2, 0, SyntheticSceneConfig(num_points=600))
    masks = [weak_label_mask(s, ratio=0.01) for s in scenes]
    cfg = PointMatchConfig(
        num_points=128, batch_size=2, steps=4, threshold=0.5, model=PointUNetConfig.tiny(7)
    )
    prior = label_prior([np.where(m, s.segment, -1) for s, m in zip(scenes, masks)], 7)

    def fit(out: str, stop: int | None) -> Engine:
        torch.manual_seed(0)
        model = PointUNet(cfg.model)
        engine = Engine(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-3),
            EngineConfig(max_steps=4, device="cpu", amp="off", ema_decay=0.9, ema_warmup=True,
                         log_every=1, eval_every=0, checkpoint_every=1),
            out_dir=tmp_path / out,
        )  # fmt: skip
        loader = DataLoader(
            WeakLabelDataset(scenes, masks, 128, 8),
            batch_size=2,
            generator=torch.Generator().manual_seed(0),
        )
        engine.fit(loader, make_step_fn(cfg, prior), stop_at_step=stop)
        return engine

    straight = fit("a", None)
    fit("b", 2)
    resumed = fit("b", None)
    mean = resumed.extra_state[TEACHER_MEAN_KEY]
    assert torch.equal(mean, straight.extra_state[TEACHER_MEAN_KEY])
    assert mean.shape == (7,) and float(mean.sum()) == pytest.approx(1.0, abs=1e-5)
    for a, b in zip(straight.raw_model.parameters(), resumed.raw_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_unet_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    model = PointUNet(PointUNetConfig.tiny(5))
    xyz, rgb = torch.rand(2, 300, 3) * 3, torch.rand(2, 300, 3)
    out = model(xyz, rgb)
    assert out.shape == (2, 300, 5)
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    single = model(xyz[:1], rgb[:1])
    torch.testing.assert_close(single, model(xyz, rgb)[:1], rtol=1e-4, atol=1e-4)


# The comparison test's configuration: 6 training rooms of 16,384 points, 0.1 % of them labelled
# (102 points), 400 steps of batch 4 x 512 points, 4 held-out rooms of 2,048 points. Measured
# (one thread, mIoU in %, labelled-only -> PointMatch, both evaluated with their EMA weights):
#   seed 0: 48.49 -> 53.95 (+5.46)   seed 1: 49.59 -> 50.18 (+0.60)   seed 2: 45.73 -> 48.57 (+2.84)
#   seed 3: 50.19 -> 53.77 (+3.59)   seed 4: 57.80 -> 61.30 (+3.50)
# PointMatch won 5/5 (mean gain +3.2, min +0.6). The test runs seeds 0 and 1 (mean gain +3.0) and
# asserts a mean gain above 1 point. Shorter runs do not show a reliable gain (measured over the
# same 5 seeds: 200 steps x 512 points, 6 rooms of 8,192 or 16,384 points: 1/5 and 3/5 wins, mean
# -1.3 and -0.7; 150 steps x 1,024 points: 2/5 wins, mean +0.3; 300 steps x 512 points and 400
# steps x 256 points lost on seed 0, by 2.4 and 1.8), nor did the old 100-step runs
# (BENCHMARKS.md); this is the smallest configuration we found where it held on every seed.
# The test took 107 s on the 2 shared cores (load average ~3).
_CMP_STEPS, _CMP_POINTS, _CMP_SEEDS, _CMP_MARGIN = 400, 512, (0, 1), 0.01


def _paired_gain(seed: int) -> float:
    """PointMatch's mIoU minus the labelled-only baseline's for one seed (scenes, labels, weights)."""
    n = len(SYNTHETIC_CLASSES)
    train = make_synthetic_scenes(6, 100 * seed, SyntheticSceneConfig(num_points=16384))
    val = make_synthetic_scenes(4, 100 * seed + 10_000, SyntheticSceneConfig(num_points=2048))
    miou, labelled = {}, set()
    for method in ("labelled-only", "pointmatch"):
        cfg = PointMatchConfig(
            method=method, label_ratio=0.001, label_seed=seed, num_points=_CMP_POINTS, batch_size=4,
            steps=_CMP_STEPS, lr=5e-3, model=PointUNetConfig.tiny(n),
            engine=EngineConfig(device="cpu", amp="off", seed=seed, log_every=10**6, eval_every=0),
        )  # fmt: skip
        out = train_pointmatch(train, n, cfg)
        assert out.teacher is not None  # both methods are evaluated with their EMA weights
        miou[method] = evaluate(out.teacher, val, n)["miou"]
        labelled.add(out.labelled_points)
    assert labelled == {102}  # the same weak labels for both methods
    return miou["pointmatch"] - miou["labelled-only"]


@pytest.mark.slow
def test_pointmatch_beats_labelled_only_on_synthetic_scenes() -> None:
    """A short run where PointMatch beats the labelled-points-only baseline: the paired mIoU gain,
    averaged over two seeds, exceeds 1 point (measured margins above ``_CMP_STEPS``)."""
    # one thread: float reductions (and so these short runs' outcomes) must not depend on the
    # runner's thread count (the nox session uses 2 threads, the measurements 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gains = [_paired_gain(seed) for seed in _CMP_SEEDS]
    finally:
        torch.set_num_threads(threads)
    assert sum(gains) / len(gains) > _CMP_MARGIN, gains
