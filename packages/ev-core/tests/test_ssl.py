"""The two-view pre-training core: encoder, views, trainer (resume, accumulation, DDP), probes."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ev_core.checkpoint import load_checkpoint
from ev_core.losses import InfoNCELoss, info_nce_loss
from ev_core.ssl import (
    ContrastiveEncoder,
    ContrastiveTrainer,
    EncoderOutput,
    LossTermSpec,
    PretrainConfig,
    ProjectionHead,
    StepContext,
    TwoViewTransform,
    ViewBatch,
    as_view_batch,
    backbone_state_dict,
    build_encoder,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    momentum_update,
    pretrain,
)
from ev_testing import assert_close, run_distributed


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _clusters(
    n: int = 128, dim: int = 16, k: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(k, dim, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    return centers[labels] + 0.3 * torch.randn(n, dim, generator=g), labels


def _noise_views(batch: Any) -> ViewBatch:
    """Random augmentation drawn from the global RNG (so resume must restore it)."""
    (x,) = batch
    return ViewBatch(x + 0.3 * torch.randn_like(x), x + 0.3 * torch.randn_like(x), original=x)


def _encoder(seed: int = 0, *, batch_norm: bool = True) -> ContrastiveEncoder:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32))
    head = ProjectionHead(32, 32, 16, batch_norm=batch_norm)
    return ContrastiveEncoder(backbone, projection=head)


# ------------------------------------------------------------------------------------------
# encoder, views
# ------------------------------------------------------------------------------------------
class _TimmLike(nn.Module):
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        assert pre_logits
        return x.mean(dim=(2, 3))


def test_encoder_exposes_feature_map_and_extra_heads() -> None:
    def stripes(out: EncoderOutput) -> torch.Tensor:  # 2 horizontal stripes, pooled
        assert out.feature_map is not None
        return torch.stack([s.mean(dim=(2, 3)) for s in out.feature_map.chunk(2, dim=2)], dim=1)

    stripe_proj = nn.Linear(6, 4)
    enc = ContrastiveEncoder(
        _TimmLike(),
        proj_hidden_dim=8,
        proj_dim=5,
        extra_heads={"stripes": stripes, "stripe_emb": lambda o: stripe_proj(o.extras["stripes"])},
    )
    x = torch.randn(3, 3, 8, 4)
    out = enc(x)
    conv = enc.backbone.conv(x)  # type: ignore[operator]
    torch.testing.assert_close(out.feature_map, conv)
    torch.testing.assert_close(out.features, conv.mean(dim=(2, 3)))
    torch.testing.assert_close(out.embedding, enc.projection(out.features))
    torch.testing.assert_close(out.extras["stripes"][:, 0], conv[:, :, :4].mean(dim=(2, 3)))
    assert out.extras["stripe_emb"].shape == (3, 2, 4)
    halves = out.split([1, 2])
    torch.testing.assert_close(halves[1].extras["stripes"], out.extras["stripes"][1:])
    torch.testing.assert_close(halves[0].feature_map, out.feature_map[:1])
    # an nn.Module head is a registered submodule (trained and checkpointed)
    enc2 = ContrastiveEncoder(_TimmLike(), proj_dim=5, extra_heads={"p": nn.Identity()})
    assert "extra_heads.p" in dict(enc2.named_modules())


def test_encoder_errors_and_plain_backbones() -> None:
    with pytest.raises(ValueError, match="feature_dim"):
        ContrastiveEncoder(nn.Linear(4, 3))
    enc = ContrastiveEncoder(nn.Linear(4, 3), feature_dim=3, proj_hidden_dim=8, proj_dim=2)
    out = enc(torch.randn(5, 4))
    assert out.feature_map is None and out.embedding.shape == (5, 2)
    bad = ContrastiveEncoder(nn.Conv2d(3, 4, 1), feature_dim=4, proj_dim=2)
    with pytest.raises(ValueError, match=r"pooled features \[B, C\]"):
        bad(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="model name"):
        build_encoder(nn.Linear(2, 2), drop_rate=0.1)


def test_build_encoder_from_timm_name() -> None:
    enc = build_encoder("resnet10t", proj_hidden_dim=16, proj_dim=8)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.features.shape == (2, enc.backbone.num_features)
    assert out.feature_map is not None and out.feature_map.ndim == 4
    assert out.embedding.shape == (2, 8)
    state = backbone_state_dict(enc.state_dict())
    assert set(state) == set(enc.backbone.state_dict())


def test_momentum_update_formula() -> None:
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = copy.deepcopy(target)
    momentum_update(online, target, 0.9)
    for (_, t), (_, b), (_, o) in zip(
        target.named_parameters(), before.named_parameters(), online.named_parameters()
    ):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(online, target, 1.5)


def test_view_batch_layouts() -> None:
    a, b, c, y = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 2.0), torch.tensor([4, 5])
    assert as_view_batch((a, b)).original is None
    vb = as_view_batch([[a, b, c], y])
    assert vb.original is c and vb.extras["target"] is y
    vb = as_view_batch({"view1": a, "view2": b, "index": y})
    assert vb.view2 is b and vb.extras == {"index": y}
    for bad in ([a], 3, {"view1": a}):
        with pytest.raises(ValueError, match="view"):
            as_view_batch(bad)
    with pytest.raises(ValueError, match="same number"):
        ViewBatch(a, torch.zeros(3, 3))
    tf = TwoViewTransform(lambda s: s + 1, original_transform=lambda s: s * 0)
    v1, v2, orig = tf(torch.ones(2))
    torch.testing.assert_close(v1, torch.full((2,), 2.0))
    torch.testing.assert_close(v2, v1)  # transform2 defaults to transform
    torch.testing.assert_close(orig, torch.zeros(2))


# ------------------------------------------------------------------------------------------
# trainer
# ------------------------------------------------------------------------------------------
def test_simclr_training_lowers_the_loss() -> None:
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(0))  # distinct instances
    loader = DataLoader(TensorDataset(x), batch_size=32, shuffle=True, drop_last=True)
    cfg = PretrainConfig(
        epochs=6, optimizer="adamw", lr=1e-2, lr_scaling="none", log_every_steps=1, amp=False
    )
    result = pretrain(_encoder(), loader, cfg, view_generator=_noise_views)
    assert result.finished and result.step == 24 and result.epoch == 6
    assert result.encoder_path is None  # no out_dir: nothing written
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 24
    assert {"temperature", "alignment", "accuracy", "instance", "lr"} <= set(result.history[0])
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)


def test_moco_macl_with_extra_terms(tmp_path: Path) -> None:
    x, _ = _clusters(n=64)
    loader = DataLoader(TensorDataset(x), batch_size=16, shuffle=False)
    seen: list[StepContext] = []

    def global_term(ctx: StepContext) -> torch.Tensor:
        seen.append(ctx)
        assert ctx.original is not None
        target = ctx.original.embedding
        gaps = [(1 - torch.cosine_similarity(o.embedding, target)).mean() for o in ctx.online]
        return torch.stack(gaps).mean()

    def two_parts(ctx: StepContext) -> dict[str, torch.Tensor]:
        e1, e2 = (o.embedding for o in ctx.online)
        return {"a": (e1 - e2).pow(2).mean(), "b": e1.pow(2).mean() * 0}

    enc = _encoder()
    init = copy.deepcopy(enc.state_dict())
    cfg = PretrainConfig(
        method="moco",
        loss="macl",
        queue_size=40,
        momentum=0.8,
        epochs=1,
        max_steps=1,
        lr=0.5,
        lr_scaling="none",
        amp=True,  # bf16 autocast on the CPU
        out_dir=str(tmp_path),
        log_every_steps=1,
    )
    trainer = ContrastiveTrainer(
        enc,
        cfg,
        view_generator=_noise_views,
        loss_terms=[
            LossTermSpec("global", global_term, 1.0),
            LossTermSpec("parts", two_parts, 0.5),
        ],
    )
    result = trainer.fit(loader)
    assert result.step == 1 and len(seen) == 1
    ctx = seen[0]
    assert ctx.momentum is not None and ctx.queue is trainer.queue and not ctx.distributed
    assert ctx.online[0].embedding.requires_grad and not ctx.momentum[0].embedding.requires_grad
    assert ctx.online[0].embedding.dtype == torch.bfloat16  # ran under autocast
    rec = result.history[-1]
    assert {"global", "parts/a", "parts/b", "instance", "temperature", "alignment"} <= set(rec)
    assert rec["loss"] == pytest.approx(
        rec["instance"] + rec["global"] + 0.5 * rec["parts/a"], rel=2e-2
    )
    assert rec["temperature"] == pytest.approx(0.1 * (1 + 0.5 * rec["alignment"]), rel=1e-5)
    # the queue received both views' keys of the step
    assert trainer.queue is not None and len(trainer.queue) == 32
    # one step: θ_k = m·θ_0 + (1 − m)·θ_1 (the key encoder started as a copy)
    online = dict(trainer.encoder.named_parameters())
    for name, p in trainer.momentum_encoder.named_parameters():  # type: ignore[union-attr]
        torch.testing.assert_close(p, 0.8 * init[name] + 0.2 * online[name])
    assert not torch.equal(online["projection.net.0.weight"], init["projection.net.0.weight"])
    # outputs beside the run
    assert result.encoder_path == tmp_path / "encoder.safetensors"
    state, info = load_checkpoint(result.encoder_path)
    assert info["config"]["loss"] == "macl" and info["metadata"]["step"] == 1
    assert set(backbone_state_dict(state)) == set(enc.backbone.state_dict())
    dumped = json.loads((tmp_path / "config.json").read_text())
    assert dumped["config"]["run"]["loss_terms"] == [
        {"name": "global", "weight": 1.0},
        {"name": "parts", "weight": 0.5},
    ]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 1.0


def test_gradient_accumulation_is_the_mean_of_micro_batches() -> None:
    x, _ = _clusters(n=32)
    g = torch.Generator().manual_seed(5)
    batches = [
        ViewBatch(
            xb + 0.2 * torch.randn(xb.shape, generator=g),
            xb + 0.2 * torch.randn(xb.shape, generator=g),
        )
        for xb in x.split(16)
    ]
    enc = _encoder()
    ref = copy.deepcopy(enc)
    sgd = torch.optim.SGD(enc.parameters(), lr=1.0)
    cfg = PretrainConfig(
        epochs=1, grad_accum_steps=2, lr_schedule="constant", amp=False, weight_decay=0.0
    )
    result = ContrastiveTrainer(enc, cfg, optimizer=sgd).fit(batches)
    assert result.step == 1
    total = torch.zeros(())
    for vb in batches:
        out = ref(torch.cat([vb.view1, vb.view2]))
        e1, e2 = out.embedding.split(16)
        total = total + info_nce_loss(e1, e2, temperature=0.1).loss / 2
    grads = torch.autograd.grad(total, list(ref.parameters()))
    for (name, p), p0, grad in zip(enc.named_parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p, p0 - grad, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_cuda_fp16_training(method: str) -> None:
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x), batch_size=16, shuffle=True)
    seen: list[StepContext] = []

    def spy(ctx: StepContext) -> torch.Tensor:
        seen.append(ctx)
        return ctx.online[0].embedding.float().pow(2).mean() * 0

    cfg = PretrainConfig(method=method, loss="macl", epochs=2, queue_size=40, lr=0.1)  # type: ignore[arg-type]
    trainer = ContrastiveTrainer(
        _encoder(), cfg, view_generator=_noise_views, loss_terms=[LossTermSpec("spy", spy)]
    )
    assert trainer.device.type == "cuda" and trainer.scaler.is_enabled()  # fp16 + GradScaler
    result = trainer.fit(loader)
    assert result.step == 8
    assert seen[0].online[0].embedding.dtype == torch.float16
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert all(p.is_cuda and torch.isfinite(p).all() for p in trainer.encoder.parameters())
    if method == "moco":
        assert trainer.queue is not None and len(trainer.queue) == 40


def _resume_config(out_dir: Path) -> PretrainConfig:
    return PretrainConfig(
        method="moco",
        loss="macl",
        queue_size=48,
        momentum=0.9,
        epochs=3,
        lr=0.4,
        warmup_steps=3,
        amp=False,
        out_dir=str(out_dir),
        resume=True,
        log_every_steps=1,
        checkpoint_every_steps=4,
    )


def _run_state(trainer: ContrastiveTrainer) -> dict[str, torch.Tensor]:
    state = dict(trainer._model_tensors())
    for i, s in enumerate(trainer.optimizer.state_dict()["state"].values()):
        state |= {f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)}
    return state


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    x, _ = _clusters(n=96)

    def loader() -> DataLoader:
        return DataLoader(TensorDataset(x), batch_size=12, shuffle=True)  # 8 batches per epoch

    full = ContrastiveTrainer(
        _encoder(0), _resume_config(tmp_path / "full"), view_generator=_noise_views
    )
    ref = full.fit(loader())
    assert ref.finished and ref.step == 24

    parts = tmp_path / "parts"
    stops = [5, 16, None]  # mid-epoch, then an epoch end, then to the end
    for i, stop in enumerate(stops):  # a fresh "process" each time: new model, loader, RNG
        torch.manual_seed(100 + i)
        # the first part starts like the full run; later ones must load everything
        trainer = ContrastiveTrainer(
            _encoder(0 if i == 0 else 7 + i), _resume_config(parts), view_generator=_noise_views
        )
        res = trainer.fit(loader(), stop_at_step=stop)
        assert res.finished == (stop is None)
        assert res.step == (stop or 24)
    expected, got = _run_state(full), _run_state(trainer)
    assert set(expected) == set(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)

    def logged(run: Path) -> list[dict[str, Any]]:  # without the wall-clock time
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]

    assert logged(parts) == logged(tmp_path / "full")  # every loss/τ/A identical, step by step
    assert (parts / "encoder.safetensors").is_file()


def test_non_finite_term_stops_with_step_and_name_and_keeps_the_checkpoint(
    tmp_path: Path,
) -> None:
    from ev_core.training import CheckpointManager, NonFiniteLossError

    x, _ = _clusters(n=64)
    loader = DataLoader(TensorDataset(x), batch_size=16, shuffle=True)

    def breaks_at_step_3(ctx: StepContext) -> torch.Tensor:
        value = ctx.online[0].embedding.float().pow(2).mean() * 0
        return value + (float("nan") if ctx.step == 2 else 0.0)

    cfg = PretrainConfig(
        method="moco", queue_size=32, epochs=2, amp=False, out_dir=str(tmp_path),
        checkpoint_every_steps=1, log_every_steps=1,
    )  # fmt: skip
    trainer = ContrastiveTrainer(
        _encoder(),
        cfg,
        view_generator=_noise_views,
        loss_terms=[LossTermSpec("bad", breaks_at_step_3)],
    )
    with pytest.raises(NonFiniteLossError, match="non-finite bad") as err:
        trainer.fit(loader)
    assert err.value.step == 3 and err.value.term == "bad"
    kept = CheckpointManager(tmp_path / "checkpoints").latest()
    assert kept is not None and kept.name == "step-00000002" and err.value.checkpoint == kept
    state, _ = load_checkpoint(kept / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (tmp_path / "encoder.safetensors").exists()


def test_config_and_trainer_validation() -> None:
    with pytest.raises(ValueError, match="method"):
        PretrainConfig(method="byol")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grad_accum_steps"):
        PretrainConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="momentum"):
        PretrainConfig(momentum=1.2)
    cfg = PretrainConfig(amp=False)
    with pytest.raises(ValueError, match="owns parameters"):
        ContrastiveTrainer(_encoder(), cfg, loss_terms=[LossTermSpec("x", nn.Linear(2, 2))])
    with pytest.raises(ValueError, match="nothing to train"):
        ContrastiveTrainer(_encoder(), PretrainConfig(instance_weight=0.0))
    with pytest.raises(ValueError, match="arrangement"):
        ContrastiveTrainer(_encoder(), PretrainConfig(method="moco"), loss=InfoNCELoss())
    trainer = ContrastiveTrainer(nn.Linear(16, 4), cfg)
    with pytest.raises(TypeError, match="EncoderOutput"):
        trainer.fit([(torch.randn(4, 16), torch.randn(4, 16))])
    with pytest.raises(TypeError, match="length"):
        ContrastiveTrainer(_encoder(), cfg).fit(iter([]))


# ------------------------------------------------------------------------------------------
# DDP: two gloo ranks with half batches == one process with the full batches
# ------------------------------------------------------------------------------------------
def _ddp_configs() -> dict[str, PretrainConfig]:
    common: dict[str, Any] = {"epochs": 1, "amp": False, "lr": 2.0, "seed": None}
    return {
        "simclr": PretrainConfig(**common),
        "moco": PretrainConfig(method="moco", loss="macl", queue_size=20, momentum=0.5, **common),
    }


def _ddp_batches() -> list[ViewBatch]:
    x, _ = _clusters(n=24, seed=3)
    g = torch.Generator().manual_seed(9)
    return [
        ViewBatch(
            xb + 0.3 * torch.randn(xb.shape, generator=g),
            xb + 0.3 * torch.randn(xb.shape, generator=g),
        )
        for xb in x.split(8)
    ]


def _ddp_worker(rank: int, world: int, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    torch.set_num_threads(1)
    b = 8 // world
    local = [
        ViewBatch(v.view1[rank * b : (rank + 1) * b], v.view2[rank * b : (rank + 1) * b])
        for v in _ddp_batches()
    ]
    for name, cfg in _ddp_configs().items():
        trainer = ContrastiveTrainer(_encoder(rank, batch_norm=False), cfg)  # rank 0's init wins
        assert trainer.loss.gather_distributed
        result = trainer.fit(local)
        assert result.step == 3
        got = trainer._model_tensors()
        for key, value in expected[name].items():
            assert_close(got[key], value, rtol=1e-4, atol=2e-5, msg=f"{name}: {key}")


@pytest.mark.distributed
def test_ddp_training_matches_single_process() -> None:
    expected = {}
    for name, cfg in _ddp_configs().items():
        trainer = ContrastiveTrainer(_encoder(0, batch_norm=False), cfg)
        trainer.fit(_ddp_batches())
        expected[name] = {k: v.clone() for k, v in trainer._model_tensors().items()}
    assert any(k.startswith("queue.") for k in expected["moco"])
    run_distributed(_ddp_worker, expected, world_size=2)


# ------------------------------------------------------------------------------------------
# frozen-feature evaluation
# ------------------------------------------------------------------------------------------
def test_knn_matches_explicit_vote() -> None:
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    query = torch.randn(7, 4, generator=g)
    k, tau = 5, 0.5
    expected = []
    for q in query:
        sims = torch.stack([torch.cosine_similarity(q, t, dim=0) for t in train])
        top = sims.argsort(descending=True)[:k]
        votes = [0.0, 0.0, 0.0]
        for j in top:
            votes[int(labels[j])] += float(torch.exp(sims[j] / tau))
        expected.append(max(range(3), key=lambda c: (votes[c], -c)))
    pred = knn_predict(train, labels, query, k=k, temperature=tau, chunk_size=3)
    assert pred.tolist() == expected
    acc = knn_accuracy(train, labels, query, torch.tensor(expected), k=k, temperature=tau)
    assert acc == 1.0
    with pytest.raises(ValueError, match="query features"):
        knn_predict(train, labels, torch.randn(2, 5))


def test_linear_probe_solves_the_regularised_objective() -> None:
    x, y = _clusters(n=120, dim=6, k=3, seed=1)
    xt, yt = _clusters(n=60, dim=6, k=3, seed=1)
    res = linear_probe(x, y, xt, yt, l2=1e-2, standardize=False, max_iter=200)
    # optimality: the gradient of mean CE + l2/2·‖W‖² vanishes at the returned (W, b)
    w = res.weight.clone().requires_grad_(True)
    b = res.bias.clone().requires_grad_(True)
    obj = torch.nn.functional.cross_entropy(x.double() @ w.T + b, y) + 0.5 * 1e-2 * (w * w).sum()
    gw, gb = torch.autograd.grad(obj, (w, b))
    assert gw.abs().max() < 1e-6 and gb.abs().max() < 1e-6
    assert res.accuracy > 0.95 and res.train_accuracy > 0.95
    assert (res.predict(xt) == yt).double().mean().item() == pytest.approx(res.accuracy)
    # scikit-learn (the optional backend) solves the same objective
    sk = linear_probe(x, y, xt, yt, l2=1e-2, standardize=False, max_iter=2000, backend="sklearn")
    torch.testing.assert_close(sk.weight, res.weight, rtol=1e-3, atol=1e-4)


def test_linear_probe_selects_l2_on_held_out_data() -> None:
    x, y = _clusters(n=90, dim=6, k=3, seed=2)
    res = linear_probe(x, y, x, y, l2=[1e-3, 1e2], max_iter=100)
    assert set(res.val_accuracy) == {1e-3, 1e2}
    assert res.l2 == max(res.val_accuracy, key=lambda v: (res.val_accuracy[v], v))
    assert res.mean is not None and res.std is not None
    with pytest.raises(ValueError, match="l2"):
        linear_probe(x, y, x, y, l2=[])


def test_extract_features_uses_pooled_features() -> None:
    enc = _encoder()
    x, y = _clusters(n=20)
    enc.train()
    feats, labels = extract_features(enc, DataLoader(TensorDataset(x, y), batch_size=8))
    assert enc.training  # mode restored
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, enc(x).features)
    emb, _ = extract_features(enc, [(x, y)], use_embedding=True)
    with torch.no_grad():
        torch.testing.assert_close(emb, enc(x).embedding)
    torch.testing.assert_close(labels, y)
