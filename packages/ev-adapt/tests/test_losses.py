"""MCL's losses against explicit references (written here, loop by loop, in float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ev_adapt.losses import (
    PrototypeMemory,
    adversarial_entropy_loss,
    class_contrastive_loss,
    fixmatch_loss,
    prototype_ot_loss,
)
from ev_adapt.models import grad_reverse

ot = pytest.importorskip("ot", reason="POT (test dependency) is not installed")


def test_fixmatch_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(16, 5, generator=g, dtype=torch.float64) * 4
    ls = torch.randn(16, 5, generator=g, dtype=torch.float64)
    loss, mask = fixmatch_loss(lw, ls, threshold=0.8, temperature=1.25)
    total = 0.0
    for i in range(16):
        p = [math.exp(1.25 * v) for v in lw[i].tolist()]
        p = [v / sum(p) for v in p]
        c = max(range(5), key=lambda k: p[k])
        if p[c] >= 0.8:
            z = ls[i].tolist()
            total += -(z[c] - math.log(sum(math.exp(v) for v in z)))
            assert mask[i] == 1
        else:
            assert mask[i] == 0
    assert loss.item() == pytest.approx(total / 16, rel=1e-6)


def test_fixmatch_no_gradient_through_weak_view() -> None:
    lw = torch.randn(4, 3, requires_grad=True)
    ls = torch.randn(4, 3, requires_grad=True)
    loss, _ = fixmatch_loss(lw * 10, ls, threshold=0.0)
    loss.backward()
    assert lw.grad is None or torch.all(lw.grad == 0)
    assert ls.grad is not None and ls.grad.abs().sum() > 0


def test_class_contrastive_closed_form() -> None:
    g = torch.Generator().manual_seed(1)
    pw = torch.softmax(torch.randn(12, 4, generator=g, dtype=torch.float64), 1)
    ps = torch.softmax(torch.randn(12, 4, generator=g, dtype=torch.float64), 1)
    m = [
        [sum(pw[b, i].item() * ps[b, j].item() for b in range(12)) for j in range(4)]
        for i in range(4)
    ]
    rows = [[m[i][j] / sum(m[i]) for j in range(4)] for i in range(4)]
    cols = [[m[i][j] / sum(m[k][j] for k in range(4)) for j in range(4)] for i in range(4)]
    off = 0.5 * (sum(map(sum, rows)) - sum(rows[i][i] for i in range(4))) / 4
    off += 0.5 * (sum(map(sum, cols)) - sum(cols[i][i] for i in range(4))) / 4
    assert class_contrastive_loss(pw, ps).item() == pytest.approx(off, rel=1e-10)


def test_class_contrastive_zero_for_identical_one_hot() -> None:
    p = F.one_hot(torch.tensor([0, 1, 2, 2, 1]), 3).double()
    assert class_contrastive_loss(p, p).item() == pytest.approx(0.0, abs=1e-12)
    uniform = torch.full((5, 3), 1 / 3, dtype=torch.float64)
    assert class_contrastive_loss(uniform, uniform).item() == pytest.approx(1 - 1 / 3)


def test_prototypes_ema_warmup_and_renormalisation() -> None:
    mem = PrototypeMemory(3, 2, momentum=0.9, warmup_updates=1)
    f1 = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    mem.update(f1, torch.tensor([0, 1]))
    torch.testing.assert_close(mem.prototypes, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    mem.update(torch.tensor([[0.0, 5.0]]), torch.tensor([0]))
    expected = F.normalize(torch.tensor([0.9, 0.1]), dim=0)
    torch.testing.assert_close(mem.prototypes[0], expected)
    torch.testing.assert_close(mem.prototypes[1], torch.tensor([0.0, 1.0]))  # absent class kept


def test_prototype_ot_loss_reference() -> None:
    g = torch.Generator().manual_seed(2)
    protos = F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1)
    fw = torch.randn(10, 6, generator=g, dtype=torch.float64)
    fs = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    loss, assign = prototype_ot_loss(fw, fs, protos, reg=1.0, reg_m=1.0, num_iters=1000)
    cost = 1 - protos @ F.normalize(fw, dim=1).t()
    plan = ot.unbalanced.sinkhorn_unbalanced(
        [1 / 4] * 4, [1 / 10] * 10, cost.numpy(), 1.0, 1.0, numItermax=1000
    )
    ref_assign = torch.from_numpy(plan.argmax(0))
    assert torch.equal(assign, ref_assign)
    ref = (
        sum(
            1 - F.cosine_similarity(fs[j : j + 1], protos[ref_assign[j] : ref_assign[j] + 1]).item()
            for j in range(10)
        )
        / 10
    )
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    loss.backward()
    assert fs.grad is not None and torch.isfinite(fs.grad).all()


def test_adversarial_entropy_signs() -> None:
    feats = torch.randn(8, 5, requires_grad=True)
    w = torch.randn(3, 5, requires_grad=True)
    loss = adversarial_entropy_loss(grad_reverse(feats) @ w.t(), weight=0.1)
    probs = torch.softmax(feats.detach() @ w.detach().t(), 1)
    assert loss.item() == pytest.approx(
        0.1 * (probs * torch.log(probs + 1e-5)).sum(1).mean().item(), rel=1e-5
    )
    loss.backward()
    # the feature gradient is the reversed classifier-side gradient
    feats2 = feats.detach().clone().requires_grad_(True)
    adversarial_entropy_loss(feats2 @ w.detach().t(), weight=0.1).backward()
    torch.testing.assert_close(feats.grad, -feats2.grad)
