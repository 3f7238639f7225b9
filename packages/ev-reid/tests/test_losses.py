"""Re-id losses against explicit loop references in float64."""

from __future__ import annotations

import math

import pytest
import torch

from ev_reid.losses import (
    CrossEntropyLabelSmooth,
    TripletLoss,
    batch_hard_triplet_loss,
    label_smoothed_cross_entropy,
    triplet_distance,
)
from ev_testing import BaseTester, assert_close


def _ref_label_smooth(logits: torch.Tensor, targets: torch.Tensor, eps: float) -> torch.Tensor:
    total = torch.zeros((), dtype=logits.dtype)
    b, k = logits.shape
    for i in range(b):
        row = logits[i]
        logz = math.log(sum(math.exp(float(v)) for v in row))
        for c in range(k):
            q = (1 - eps) * (1.0 if c == int(targets[i]) else 0.0) + eps / k
            total = total + q * (logz - row[c])
    return total / b


def _dist(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "euclidean":
        return torch.sqrt(((a - b) ** 2).sum())
    return 1 - (a * b).sum() / (a.norm() * b.norm())


def _ref_triplet(
    x: torch.Tensor, y: torch.Tensor, margin: float, metric: str, soft: bool
) -> torch.Tensor:
    losses = []
    n = len(y)
    for i in range(n):
        pos = [_dist(x[i], x[j], metric) for j in range(n) if j != i and y[j] == y[i]]
        neg = [_dist(x[i], x[j], metric) for j in range(n) if y[j] != y[i]]
        if not pos or not neg:
            continue
        gap = max(pos) - min(neg)
        losses.append(torch.log1p(torch.exp(gap)) if soft else torch.clamp(gap + margin, min=0))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_label_smoothing_matches_loop(eps: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    assert_close(
        label_smoothed_cross_entropy(logits, targets, eps), _ref_label_smooth(logits, targets, eps)
    )
    assert_close(
        CrossEntropyLabelSmooth(eps)(logits, targets), _ref_label_smooth(logits, targets, eps)
    )


def test_label_smoothing_float32_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64)
    targets = torch.tensor([6, 0, 3, 3])
    assert_close(
        label_smoothed_cross_entropy(logits.float(), targets),
        _ref_label_smooth(logits, targets, 0.1),
    )
    assert BaseTester.gradcheck(lambda z: label_smoothed_cross_entropy(z, targets), [logits])


def test_label_smoothing_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="targets must lie"):
        label_smoothed_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="epsilon"):
        CrossEntropyLabelSmooth(1.0)
    with pytest.raises(ValueError, match="expected logits"):
        label_smoothed_cross_entropy(torch.zeros(2, 3), torch.tensor([0]))


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_triplet_distance_matches_loop(metric: str) -> None:
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = torch.stack([torch.stack([_dist(a, b, metric) for b in x]) for a in x])
    out = triplet_distance(x, metric)  # type: ignore[arg-type]
    off = ~torch.eye(5, dtype=torch.bool)
    assert_close(out[off], ref[off], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("soft", [False, True])
def test_batch_hard_triplet_matches_loop(metric: str, soft: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    ref = _ref_triplet(x, y, 0.3, metric, soft)
    out = TripletLoss(0.3, metric=metric, soft_margin=soft)(x, y)  # type: ignore[arg-type]
    assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert float(ref) > 0  # random features violate the margin: the test is not vacuous


def test_triplet_skips_anchors_without_triplet_and_gradients() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # ids 2 and 3 have a single image
    loss, d_ap, d_an = batch_hard_triplet_loss(x, y, margin=0.5)
    assert_close(loss, _ref_triplet(x, y, 0.5, "euclidean", False), rtol=1e-9, atol=1e-9)
    assert torch.isnan(d_ap[5:]).all() and torch.isfinite(d_ap[:5]).all()
    assert torch.isfinite(d_an[:5]).all()
    assert BaseTester.gradcheck(
        lambda z: batch_hard_triplet_loss(z, y, margin=5.0)[0], [x], atol=1e-6
    )


def test_triplet_without_any_triplet_is_zero_with_grad() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    loss = TripletLoss()(x, torch.tensor([0, 1, 2]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad is not None and torch.all(x.grad == 0)


def test_triplet_hinge_is_zero_when_separated() -> None:
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert float(TripletLoss(0.3)(x, y)) == 0.0
    soft = TripletLoss(soft_margin=True)(x, y)
    gaps = torch.tensor([0.1 - 5.0, 0.1 - 4.9, 0.1 - 4.9, 0.1 - 5.0], dtype=torch.float64)
    assert_close(soft, torch.log1p(torch.exp(gaps)).mean(), rtol=1e-9, atol=1e-9)


def test_triplet_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="metric"):
        TripletLoss(metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected features"):
        batch_hard_triplet_loss(torch.zeros(3, 2), torch.zeros(2))


# ----------------------------------------------------------------------------------------
# UP-ReID local stripe contrast: the within-image variant against an explicit loop
# ----------------------------------------------------------------------------------------
def _within_image_reference(s1, s2, tau, macl=None):
    """Per anchor: positive = same stripe in the other view; negatives = same image's others."""
    b, s, _ = s1.shape
    losses, aligns = [], []
    for i in range(b):
        z = torch.cat([s1[i], s2[i]]).double()
        z = z / z.norm(dim=1, keepdim=True)
        for r in range(2 * s):
            p = (r + s) % (2 * s)
            aligns.append(float(z[r] @ z[p]))
    align = sum(aligns) / len(aligns)
    t = tau if macl is None else max(tau * (1 + macl[0] * (align - macl[1])), 1e-3 * tau)
    for i in range(b):
        z = torch.cat([s1[i], s2[i]]).double()
        z = z / z.norm(dim=1, keepdim=True)
        for r in range(2 * s):
            p = (r + s) % (2 * s)
            cands = [p] + [c for c in range(2 * s) if c not in (r, p)]
            logits = torch.stack([z[r] @ z[c] for c in cands]) / t
            log_p = logits[0] - torch.logsumexp(logits, 0)
            weight = 1.0 if macl is None else float(1.0 / (1.0 - log_p.exp() + 1e-8))
            losses.append(-weight * log_p)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("loss", ["infonce", "macl"])
def test_local_stripe_contrast_within_image_matches_loop(loss: str) -> None:
    from ev_reid.losses import local_stripe_contrast

    g = torch.Generator().manual_seed(3)
    s1 = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    s2 = s1 + 0.3 * torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    out = local_stripe_contrast(s1, s2, negatives="image", loss=loss, temperature=0.2)  # type: ignore[arg-type]
    macl = (0.5, 0.0) if loss == "macl" else None
    assert_close(out.loss, _within_image_reference(s1, s2, 0.2, macl), rtol=1e-12, atol=1e-12)
    assert out.num_negatives == 4


def test_local_stripe_contrast_negatives_differ_and_validate() -> None:
    from ev_reid.losses import local_stripe_contrast

    g = torch.Generator().manual_seed(4)
    s1 = torch.randn(6, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    s2 = torch.randn(6, 3, 8, generator=g, dtype=torch.float64)
    batch = local_stripe_contrast(s1, s2, negatives="batch")
    image = local_stripe_contrast(s1, s2, negatives="image")
    assert batch.num_negatives == 2 * 6 * 3 - 2 and image.num_negatives == 4
    assert abs(float(batch.loss) - float(image.loss)) > 1e-3  # other images' stripes matter
    image.loss.backward()  # differentiable
    assert s1.grad is not None and torch.isfinite(s1.grad).all()
    with pytest.raises(ValueError, match="negatives"):
        local_stripe_contrast(s1, s2, negatives="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2 stripes"):
        local_stripe_contrast(s1[:, :1], s2[:, :1], negatives="image")
