"""Contrastive losses (InfoNCE, MACL, SupCon) and the MoCo queue against explicit references."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ev_core.losses import (
    InfoNCELoss,
    MACLLoss,
    SupConLoss,
    info_nce_loss,
    macl_loss,
    macl_temperature,
    supcon_loss,
)
from ev_core.ssl import NegativeQueue
from ev_testing import BaseTester, assert_close, run_distributed

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny tensors: OpenMP threads only add contention on the shared CI cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# explicit references (float64, loops over anchors, exp-sum form instead of log_softmax)
# ------------------------------------------------------------------------------------------
def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def _ref_pairs(
    z1: torch.Tensor, z2: torch.Tensor, bank: torch.Tensor | None, arrangement: str
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(positive cosine, negative cosines) of every anchor, written out index by index."""
    b = z1.shape[0]
    bank_rows = [] if bank is None else list(bank)
    pairs = []
    if arrangement == "simclr":
        z = torch.cat([z1, z2])
        for i in range(2 * b):
            p = i + b if i < b else i - b
            negs = [_cos(z[i], z[j]) for j in range(2 * b) if j not in (i, p)]
            pairs.append((_cos(z[i], z[p]), negs + [_cos(z[i], r) for r in bank_rows]))
    else:
        for i in range(b):
            negs = [_cos(z1[i], z2[j]) for j in range(b) if j != i]
            pairs.append((_cos(z1[i], z2[i]), negs + [_cos(z1[i], r) for r in bank_rows]))
    return pairs


def _ref_info_nce_terms(
    z1: torch.Tensor, z2: torch.Tensor, bank: torch.Tensor | None, tau: float, arrangement: str
) -> torch.Tensor:
    terms = []
    for pos, negs in _ref_pairs(z1, z2, bank, arrangement):
        num = torch.exp(pos / tau)
        den = num + sum(torch.exp(n / tau) for n in negs)
        terms.append(-torch.log(num / den))
    return torch.stack(terms)


def _ref_macl(
    z1: torch.Tensor,
    z2: torch.Tensor,
    bank: torch.Tensor | None,
    tau0: float,
    alpha: float,
    a0: float,
    arrangement: str,
) -> tuple[torch.Tensor, float, float]:
    """MACL as in SYSTEMS §1.5: returns (loss, τ, A) with A and V treated as constants."""
    pairs = _ref_pairs(z1, z2, bank, arrangement)
    a = sum(float(p.detach()) for p, _ in pairs) / len(pairs)
    tau = tau0 * (1 + alpha * (a - a0))
    terms = []
    for pos, negs in pairs:
        num = torch.exp(pos / tau)
        prob = num / (num + sum(torch.exp(n / tau) for n in negs))
        v = 1.0 / (1.0 - float(prob.detach()) + 1e-8)
        terms.append(-v * torch.log(prob))
    return torch.stack(terms).mean(), tau, a


def _inputs(
    b: int = 6, d: int = 5, k: int | None = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g, dtype=F64)
    z2 = (z1 + 0.7 * torch.randn(b, d, generator=g, dtype=F64)).requires_grad_(True)
    z1.requires_grad_(True)
    bank = None if k is None else torch.randn(k, d, generator=g, dtype=F64)
    return z1, z2, bank


def _grads(loss: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, xs, retain_graph=True)


# ------------------------------------------------------------------------------------------
# InfoNCE
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arrangement", ["simclr", "moco"])
@pytest.mark.parametrize("bank_size", [None, 4])
def test_info_nce_matches_reference(arrangement: str, bank_size: int | None) -> None:
    if arrangement == "moco" and bank_size is None:
        bank_size = 3
    z1, z2, bank = _inputs(k=bank_size)
    out = info_nce_loss(z1, z2, bank, temperature=0.2, arrangement=arrangement)  # type: ignore[arg-type]
    ref = _ref_info_nce_terms(z1, z2, bank, 0.2, arrangement).mean()
    assert out.loss.dtype == F64
    assert_close(out.loss, ref)
    for g, r in zip(_grads(out.loss, z1, z2), _grads(ref, z1, z2)):
        assert_close(g, r)
    pairs = _ref_pairs(z1.detach(), z2.detach(), bank, arrangement)
    assert out.num_negatives == len(pairs[0][1])
    assert_close(
        out.alignment, torch.tensor(sum(float(p) for p, _ in pairs) / len(pairs), dtype=F64)
    )
    assert float(out.temperature) == pytest.approx(0.2)
    acc = sum(all(float(p) > float(n) for n in negs) for p, negs in pairs) / len(pairs)
    assert float(out.accuracy) == pytest.approx(acc)


def test_info_nce_per_anchor_and_module() -> None:
    z1, z2, bank = _inputs()
    per = info_nce_loss(z1, z2, bank, temperature=0.1, reduction="none").loss
    assert_close(per, _ref_info_nce_terms(z1, z2, bank, 0.1, "simclr"))
    module = InfoNCELoss(0.1)
    loss = module(z1, z2, bank)
    assert loss.ndim == 0
    loss.backward()  # a plain call is usable for training
    assert z1.grad is not None and torch.isfinite(z1.grad).all()
    assert module.last_output is not None
    logs = module.last_output.logs("train/")
    assert set(logs) == {"train/loss", "train/temperature", "train/alignment", "train/accuracy"}
    assert logs["train/temperature"] == pytest.approx(0.1)


def test_info_nce_gradcheck() -> None:
    z1, z2, bank = _inputs(b=3, d=4, k=2)
    assert bank is not None
    assert BaseTester.gradcheck(
        lambda a, b, c: info_nce_loss(a, b, c, temperature=0.3).loss, [z1, z2, bank]
    )


def test_info_nce_low_precision_inputs() -> None:
    z1, z2, bank = _inputs(b=8, d=16)
    assert bank is not None
    lo1, lo2 = z1.detach().bfloat16(), z2.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = info_nce_loss(lo1, lo2, bank.bfloat16(), temperature=0.1)
    assert out.loss.dtype == torch.float32  # computed in float32 whatever the input dtype
    ref = _ref_info_nce_terms(lo1.double(), lo2.double(), bank.bfloat16().double(), 0.1, "simclr")
    assert_close(out.loss, ref.mean())


def test_batch_order_invariance() -> None:
    z1, z2, bank = _inputs(b=7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    for fn in (
        lambda a, b: info_nce_loss(a, b, bank).loss,
        lambda a, b: macl_loss(a, b, bank).loss,
        lambda a, b: macl_loss(a, b, bank, arrangement="moco").loss,
    ):
        loss = fn(z1, z2)
        g1, g2 = _grads(loss, z1, z2)
        p1 = z1.detach()[perm].requires_grad_(True)
        p2 = z2.detach()[perm].requires_grad_(True)
        loss_p = fn(p1, p2)
        gp1, gp2 = _grads(loss_p, p1, p2)
        assert_close(loss_p, loss)
        assert_close(gp1, g1[perm])
        assert_close(gp2, g2[perm])


# ------------------------------------------------------------------------------------------
# MACL
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arrangement", "bank_size", "tau0", "alpha", "a0"),
    [
        ("simclr", None, 0.1, 0.5, 0.0),
        ("simclr", 4, 0.2, 1.0, 0.3),
        ("moco", 5, 0.1, 0.5, 0.0),
    ],
)
def test_macl_matches_reference(
    arrangement: str, bank_size: int | None, tau0: float, alpha: float, a0: float
) -> None:
    z1, z2, bank = _inputs(k=bank_size)
    out = macl_loss(z1, z2, bank, tau0=tau0, alpha=alpha, a0=a0, arrangement=arrangement)  # type: ignore[arg-type]
    ref, tau, a = _ref_macl(z1, z2, bank, tau0, alpha, a0, arrangement)
    assert_close(out.loss, ref)
    assert float(out.temperature) == pytest.approx(tau, rel=1e-12)
    assert float(out.alignment) == pytest.approx(a, rel=1e-12)
    for g, r in zip(_grads(out.loss, z1, z2), _grads(ref, z1, z2)):
        assert_close(g, r)
    module = MACLLoss(tau0, alpha, a0, arrangement=arrangement)  # type: ignore[arg-type]
    assert_close(module(z1, z2, bank), ref)
    assert module.last_output is not None
    assert module.last_output.logs()["temperature"] == pytest.approx(tau)


def test_macl_temperature_rises_with_alignment() -> None:
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(32, 16, generator=g, dtype=F64)
    temps, aligns = [], []
    for noise in (3.0, 1.0, 0.3, 0.05):  # less noise → better aligned views
        z2 = z1 + noise * torch.randn(32, 16, generator=g, dtype=F64)
        out = macl_loss(z1, z2, tau0=0.1, alpha=0.5, a0=0.0)
        a = float(torch.nn.functional.cosine_similarity(z1, z2).mean())
        assert float(out.alignment) == pytest.approx(a, rel=1e-10)
        assert float(out.temperature) == pytest.approx(0.1 * (1 + 0.5 * a), rel=1e-10)
        temps.append(float(out.temperature))
        aligns.append(a)
    assert aligns == sorted(aligns)
    assert temps == sorted(temps) and temps[-1] > temps[0] + 0.02
    # above/below the reference alignment A0 the temperature is above/below τ0
    assert (
        float(macl_temperature(0.9, 0.1, 0.5, 0.5))
        > 0.1
        > float(macl_temperature(0.1, 0.1, 0.5, 0.5))
    )
    assert float(macl_temperature(torch.tensor(0.4), 0.2, 1.0, 0.4)) == pytest.approx(0.2)


def test_macl_alpha_zero_is_reweighted_infonce() -> None:
    """α = 0: τ = τ0 and ℓ_MACL,i = V_i·ℓ_InfoNCE,i with V_i = 1/(1 − exp(−ℓ_i) + 1e-8) constant."""
    z1, z2, bank = _inputs(b=5, k=3)
    tau0 = 0.15
    macl = macl_loss(z1, z2, bank, tau0=tau0, alpha=0.0, a0=0.7, reduction="none")
    assert float(macl.temperature) == tau0
    nce = info_nce_loss(z1, z2, bank, temperature=tau0, reduction="none").loss
    v = 1.0 / (1.0 - torch.exp(-nce.detach()) + 1e-8)
    assert_close(macl.loss, v * nce)
    assert (v > 1).all()  # the reweighting is not the identity
    reweighted = (v * nce).mean()
    for g, r in zip(_grads(macl.loss.mean(), z1, z2), _grads(reweighted, z1, z2)):
        assert_close(g, r)
    # per anchor, V cancels InfoNCE's (1 − P) factor: dℓ_MACL,i/dℓ_i = V_i = 1/(1 − P_i)
    g_nce = _grads(nce[0], z1)[0]
    g_macl = _grads(macl_loss(z1, z2, bank, tau0=tau0, alpha=0.0, reduction="none").loss[0], z1)[0]
    assert_close(g_macl, v[0] * g_nce)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"a0": 2.0}, "a0"),
        ({"tau0": 0.0}, "tau0"),
    ],
)
def test_macl_validates_hyperparameters(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MACLLoss(**kwargs)
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=match):
        macl_loss(z, z, **kwargs)


def test_bad_inputs_are_reported() -> None:
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        info_nce_loss(z, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        info_nce_loss(z[0], z[0])
    with pytest.raises(ValueError, match=r"negatives must be \[K, D=3\]"):
        info_nce_loss(z, z, torch.randn(2, 4))
    with pytest.raises(ValueError, match="no negatives"):
        info_nce_loss(z[:1], z[:1], arrangement="moco")
    with pytest.raises(ValueError, match="arrangement"):
        InfoNCELoss(arrangement="byol")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)
    # one sample is fine as soon as a bank provides negatives
    assert torch.isfinite(info_nce_loss(z[:1], z[:1], torch.randn(3, 3)).loss)


# ------------------------------------------------------------------------------------------
# SupCon
# ------------------------------------------------------------------------------------------
def _ref_supcon(feats: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    n = feats.shape[0]
    losses = []
    for i in range(n):
        pos = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        den = sum(torch.exp(_cos(feats[i], feats[a]) / tau) for a in range(n) if a != i)
        terms = [torch.log(torch.exp(_cos(feats[i], feats[p]) / tau) / den) for p in pos]
        losses.append(-torch.stack(terms).sum() / len(pos))
    return torch.stack(losses).mean()


def test_supcon_matches_reference() -> None:
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(9, 4, generator=g, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1])  # class 3 has no positive: left out
    loss = SupConLoss(temperature=0.2)(feats, labels)
    ref = _ref_supcon(feats, labels, 0.2)
    assert_close(loss, ref)
    assert_close(_grads(loss, feats)[0], _grads(ref, feats)[0])
    assert BaseTester.gradcheck(lambda f: supcon_loss(f, labels, temperature=0.5), [feats])
    per = supcon_loss(feats, labels, temperature=0.2, reduction="none")
    assert per[6] == 0 and (per[[0, 1, 2, 3, 4, 5, 7, 8]] > 0).all()


def test_supcon_with_unique_labels_is_simclr() -> None:
    """Two views per sample and one label per sample: the positive set is the other view only."""
    z1, z2, _ = _inputs(b=6, k=None)
    views = torch.stack([z1, z2], dim=1)  # [N, V=2, D]
    sup = supcon_loss(views, torch.arange(6), temperature=0.3, reduction="none")
    nce = info_nce_loss(z1, z2, temperature=0.3, reduction="none").loss
    assert_close(sup, nce)


def test_supcon_without_positives_is_zero_with_graph() -> None:
    feats = torch.randn(4, 3, requires_grad=True)
    loss = supcon_loss(feats, torch.arange(4))
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None and (feats.grad == 0).all()
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(feats, torch.arange(3))
    with pytest.raises(TypeError, match="integers"):
        supcon_loss(feats, torch.zeros(4))


# ------------------------------------------------------------------------------------------
# queue
# ------------------------------------------------------------------------------------------
def _fifo(q: NegativeQueue) -> torch.Tensor:
    """Rows oldest → newest."""
    if len(q) < q.size:
        return q.negatives()
    return torch.roll(q.queue, -int(q.ptr), dims=0)


def test_queue_fifo_wraps_and_caps() -> None:
    q = NegativeQueue(dim=2, size=5)
    assert len(q) == 0 and q.negatives().shape == (0, 2)
    rows = torch.arange(40, dtype=torch.float32).view(20, 2)  # row r = [2r, 2r+1]
    q.enqueue(rows[:3])
    assert len(q) == 3 and int(q.ptr) == 3
    torch.testing.assert_close(q.negatives(), rows[:3])
    q.enqueue(rows[3:7])  # wraps: rows 0 and 1 are evicted
    assert len(q) == 5 and int(q.ptr) == 2
    torch.testing.assert_close(_fifo(q), rows[2:7])
    torch.testing.assert_close(q.queue, torch.stack([rows[5], rows[6], rows[2], rows[3], rows[4]]))
    q.enqueue(rows[7:8])
    torch.testing.assert_close(_fifo(q), rows[3:8])
    q.enqueue(rows[8:20])  # more keys than slots: only the last five remain, in order
    torch.testing.assert_close(_fifo(q), rows[15:20])
    assert len(q) == 5 and q.negatives().shape == (5, 2)
    restored = NegativeQueue(dim=2, size=5)
    restored.load_state_dict(q.state_dict())
    torch.testing.assert_close(_fifo(restored), rows[15:20])
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        q.enqueue(torch.zeros(3, 4))


def test_queue_feeds_the_loss() -> None:
    q = NegativeQueue(dim=5, size=8)
    z1, z2, _ = _inputs(b=4, k=None)
    q.enqueue(torch.randn(6, 5, dtype=F64))
    out = info_nce_loss(z1, z2, q.negatives(), arrangement="moco")
    assert out.num_negatives == 3 + 6
    ref = _ref_info_nce_terms(z1, z2, q.negatives().double(), 0.1, "moco").mean()
    assert_close(out.loss, ref.float(), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# DDP: 2 gloo processes must reproduce the single-process full batch
# ------------------------------------------------------------------------------------------
def _dist_worker(rank: int, world: int, data: dict[str, torch.Tensor], expected: dict) -> None:
    torch.set_num_threads(1)
    b = data["z1"].shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    for name, fn in _dist_cases():
        z1 = data["z1"][sl].clone().requires_grad_(True)
        z2 = data["z2"][sl].clone().requires_grad_(True)
        out = fn(z1, z2, data["bank"], data["labels"][sl], True)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        g1, g2 = torch.autograd.grad(loss, (z1, z2), allow_unused=True)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        exp = expected[name]
        assert_close(mean_loss / world, exp["loss"], msg=f"{name}: loss")
        # each rank's gradient is world × the full-batch one; DDP's averaging cancels it
        assert_close(g1 / world, exp["g1"][sl], msg=f"{name}: grad z1")
        if exp["g2"] is not None:
            assert_close(g2 / world, exp["g2"][sl], msg=f"{name}: grad z2")
        if not isinstance(out, torch.Tensor):
            assert_close(out.alignment, exp["alignment"], msg=f"{name}: alignment")
            assert_close(out.temperature, exp["temperature"], msg=f"{name}: temperature")
    q = NegativeQueue(dim=data["z1"].shape[1], size=10, dtype=F64)
    q.enqueue(data["z2"][sl], gather_distributed=True)
    q.enqueue(data["z1"][sl], gather_distributed=True)
    torch.testing.assert_close(q.queue, expected["queue"], rtol=0, atol=0)
    assert int(q.ptr) == int(expected["queue_ptr"])


def _dist_cases() -> list[tuple[str, Any]]:
    return [
        ("infonce", lambda a, b, bank, y, g: info_nce_loss(a, b, bank, gather_distributed=g)),
        ("macl", lambda a, b, bank, y, g: macl_loss(a, b, tau0=0.2, gather_distributed=g)),
        (
            "macl_moco",
            lambda a, b, bank, y, g: macl_loss(
                a, b, bank, arrangement="moco", gather_distributed=g
            ),
        ),
        (
            "supcon",
            lambda a, b, bank, y, g: supcon_loss(
                torch.stack([a, b], 1), y, temperature=0.2, gather_distributed=g
            ),
        ),
    ]


@pytest.mark.distributed
def test_gather_path_matches_full_batch() -> None:
    z1, z2, bank = _inputs(b=8, d=5, k=3, seed=4)
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 3, 0])  # rank 1 also holds classes of rank 0
    data = {"z1": z1.detach(), "z2": z2.detach(), "bank": bank, "labels": labels}
    expected: dict = {}
    for name, fn in _dist_cases():
        a, b = z1.detach().requires_grad_(True), z2.detach().requires_grad_(True)
        out = fn(a, b, bank, labels, False)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        g1, g2 = torch.autograd.grad(loss, (a, b))
        expected[name] = {"loss": loss.detach(), "g1": g1, "g2": g2}
        if not isinstance(out, torch.Tensor):
            expected[name] |= {"alignment": out.alignment, "temperature": out.temperature}
    q = NegativeQueue(dim=5, size=10, dtype=F64)
    q.enqueue(z2.detach())  # rank order = batch order
    q.enqueue(z1.detach())
    expected["queue"], expected["queue_ptr"] = q.queue.clone(), q.ptr.clone()
    assert math.isfinite(float(expected["infonce"]["loss"]))
    run_distributed(_dist_worker, data, expected, world_size=2)
