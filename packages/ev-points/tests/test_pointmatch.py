"""PointMatch pieces: reproducible weak labels, views, pseudo-labels, the U-Net, and a short
run in which PointMatch beats the labelled-points-only baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ev_core.training import EngineConfig
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
    evaluate,
    pseudo_labels,
    strong_view,
    train_pointmatch,
    weak_label_mask,
    weak_view,
)


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


def _run(method: str, scenes, steps: int):
    cfg = PointMatchConfig(
        method=method, label_ratio=None, points_per_class=1, num_points=512, batch_size=4, steps=steps, lr=5e-3, ema_decay=0.99,
        model=PointUNetConfig.tiny(len(SYNTHETIC_CLASSES)),
        engine=EngineConfig(device="cpu", amp="off", seed=0, log_every=10**6, eval_every=0),
    )  # fmt: skip
    return train_pointmatch(scenes, len(SYNTHETIC_CLASSES), cfg)


@pytest.mark.slow
def test_pointmatch_beats_labelled_only_on_synthetic_scenes() -> None:
    # one labelled point per class and room (the "N per class" setting), one fixed seed: PointMatch
    # wins here, but over 3 seeds the short-run gain is not reliable (BENCHMARKS.md); this test
    # guards that the full method (teacher, pseudo-labels, propagation, ramp) keeps working.
    # one thread: float reductions (and so this short run's outcome) must not depend on the
    # runner's thread count (the nox session uses 2 threads, the benchmark 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_on_synthetic_scenes()
    finally:
        torch.set_num_threads(threads)


def _compare_on_synthetic_scenes() -> None:
    sc = SyntheticSceneConfig(num_points=1024)
    train = make_synthetic_scenes(10, 0, sc)
    val = make_synthetic_scenes(4, 10_000, sc)
    base = _run("labelled-only", train, 100)
    pm = _run("pointmatch", train, 100)
    assert base.labelled_points == pm.labelled_points
    base_miou = evaluate(base.model, val, 7)["miou"]
    pm_miou = evaluate(pm.teacher, val, 7)["miou"]
    assert pm_miou > base_miou + 0.02, (pm_miou, base_miou)
