"""UP-ReID loss terms against explicit references; pre-training and fine-tuning runs; DDP."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ev_core.checkpoint import load_checkpoint
from ev_core.ssl import PretrainConfig
from ev_reid.data import PretrainViewConfig, ReidTransformConfig
from ev_reid.datasets import Market1501, ReidDataset, generate_synthetic_market
from ev_reid.models import ReidModel, ReidModelConfig, load_backbone_weights
from ev_reid.pretrain import (
    StripeProjection,
    UPReIDConfig,
    build_upreid_encoder,
    global_consistency_loss,
    local_stripe_contrast,
    pretrain_upreid,
    unlabelled_records,
)
from ev_reid.train import ReidCriterion, TrainConfig, bot_lr_factor, train, train_step
from ev_testing import assert_close, run_distributed

TINY = {"channels": [8, 16, 16, 32], "stem_width": 8}


# ----------------------------------------------------------------------------------------
# explicit references
# ----------------------------------------------------------------------------------------
def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def _ref_global(queries: list[torch.Tensor], key: torch.Tensor) -> torch.Tensor:
    per_view = []
    for q in queries:
        per_view.append(sum(1 - _cos(q[i], key[i]) for i in range(len(key))) / len(key))
    return sum(per_view) / len(per_view)  # type: ignore[return-value]


def _ref_local(
    s1: torch.Tensor, s2: torch.Tensor, tau: float, macl: tuple[float, float] | None = None
) -> torch.Tensor:
    """Loop over every (view, image, stripe) anchor; positive = same image+stripe, other view."""
    b, s, _ = s1.shape
    items = [(v, i, j) for v in (0, 1) for i in range(b) for j in range(s)]
    emb = {(0, i, j): s1[i, j] for i in range(b) for j in range(s)}
    emb |= {(1, i, j): s2[i, j] for i in range(b) for j in range(s)}
    pos_cos = [_cos(emb[a], emb[(1 - a[0], a[1], a[2])]) for a in items]
    if macl is not None:
        alpha, a0 = macl
        align = float(sum(pos_cos) / len(pos_cos))
        tau = tau * (1 + alpha * (align - a0))
    losses = []
    for a, pc in zip(items, pos_cos):
        positive = (1 - a[0], a[1], a[2])
        negs = [_cos(emb[a], emb[n]) for n in items if n != a and n != positive]
        denom = torch.exp(pc / tau) + sum(torch.exp(c / tau) for c in negs)
        log_p = pc / tau - torch.log(denom)
        weight = 1.0 if macl is None else 1.0 / (1.0 - float(torch.exp(log_p)) + 1e-8)
        losses.append(-weight * log_p)
    return torch.stack(losses).mean()


def test_global_consistency_matches_reference_and_stops_key_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    q1 = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    q2 = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    key = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    loss = global_consistency_loss([q1, q2], key)
    ref = _ref_global([q1, q2], key)
    assert_close(loss, ref)
    loss.backward()
    assert key.grad is None  # stop-gradient on the original's key
    q1r = q1.detach().clone().requires_grad_(True)
    _ref_global([q1r, q2.detach()], key.detach()).backward()
    assert q1.grad is not None and q1r.grad is not None
    assert_close(q1.grad, q1r.grad)
    # identical directions give zero loss; opposite give 2
    assert_close(global_consistency_loss([key * 3], key), torch.zeros((), dtype=torch.float64))
    assert_close(global_consistency_loss([-key], key), torch.full((), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["infonce", "macl"])
def test_local_stripe_contrast_matches_loop_reference(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    s1 = torch.randn(3, 3, 6, generator=g, dtype=torch.float64)
    s2 = s1 + 0.5 * torch.randn(3, 3, 6, generator=g, dtype=torch.float64)
    out = local_stripe_contrast(s1, s2, loss=kind, temperature=0.2)  # type: ignore[arg-type]
    ref = _ref_local(s1, s2, 0.2, (0.5, 0.0) if kind == "macl" else None)
    assert_close(out.loss, ref)
    assert out.num_negatives == 2 * 3 * 3 - 2
    with pytest.raises(ValueError, match="stripe embeddings"):
        local_stripe_contrast(s1, s2[:, :2])


def test_stripe_head_projects_pooled_stripes() -> None:
    torch.manual_seed(0)
    enc = build_upreid_encoder(
        "resnet18", backbone_kwargs=TINY, last_stride_1=True, proj_hidden_dim=16, proj_dim=8
    )
    enc.eval()
    x = torch.randn(2, 3, 96, 32)
    out = enc(x)
    head = enc.extra_heads["stripes"]
    assert isinstance(head, StripeProjection)
    assert out.feature_map is not None and out.feature_map.shape == (2, 32, 6, 2)
    fmap = out.feature_map
    stripes = torch.stack([fmap[:, :, 2 * k : 2 * k + 2].mean(dim=(2, 3)) for k in range(3)], dim=1)
    expected = head.head(stripes.reshape(6, 32)).reshape(2, 3, 8)
    assert_close(out.extras["stripes"], expected)
    assert_close(out.features, fmap.mean(dim=(2, 3)))
    assert (
        build_upreid_encoder("resnet18", backbone_kwargs=TINY, local_head=False).extra_heads.keys()
        == set()
    )


# ----------------------------------------------------------------------------------------
# runs on a tiny synthetic dataset
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Market1501:
    root = generate_synthetic_market(
        tmp_path_factory.mktemp("syn") / "market",
        num_ids=16,
        images_per_id=8,
        num_cameras=3,
        image_size=(64, 32),
        seed=0,
    )
    return Market1501(root)


def _tiny_upreid(out: Path, **kw: object) -> UPReIDConfig:
    ssl = PretrainConfig(
        method="moco", temperature=0.2, queue_size=64, momentum=0.9, epochs=1, max_steps=2,
        lr=0.05, amp=False, seed=0, log_every_steps=1,
    )  # fmt: skip
    return UPReIDConfig(
        out_dir=str(out),
        backbone="resnet18",
        backbone_kwargs=dict(TINY),
        last_stride_1=True,
        proj_hidden_dim=16,
        proj_dim=8,
        views=PretrainViewConfig(height=64, width=32),
        ssl=ssl,
        batch_size=8,
        num_workers=0,
        **kw,  # type: ignore[arg-type]
    )


def test_pretrain_upreid_writes_a_backbone_that_finetuning_loads(
    synthetic: Market1501, tmp_path: Path
) -> None:
    result = pretrain_upreid(_tiny_upreid(tmp_path / "full"), synthetic.train)
    assert result.steps == 2 and result.backbone_path is not None
    last = result.history[-1]
    assert {"instance", "global", "local", "loss"} <= set(last)
    assert math.isclose(
        last["loss"], last["instance"] + 1.0 * last["global"] + 0.5 * last["local"], rel_tol=1e-5
    )
    model = ReidModel(
        ReidModelConfig(backbone="resnet18", backbone_kwargs=dict(TINY), num_classes=3)
    )
    report = load_backbone_weights(model, result.backbone_path)
    assert not report.missing and not report.unexpected
    state, _ = load_checkpoint(result.backbone_path)
    assert_close(model.backbone.state_dict()["conv1.weight"], state["backbone.conv1.weight"])

    simclr = _tiny_upreid(tmp_path / "simclr", local_term=False)
    simclr.ssl.method = "simclr"
    logged = pretrain_upreid(simclr, synthetic.train).history[-1]
    assert "global" in logged and "local" not in logged
    assert math.isclose(logged["loss"], logged["instance"] + logged["global"], rel_tol=1e-5)
    ablated = pretrain_upreid(
        _tiny_upreid(tmp_path / "ablated", global_term=False, local_term=False), synthetic.train
    )
    assert not {"global", "local"} & set(ablated.history[-1])


def test_unlabelled_image_folder(synthetic: Market1501, tmp_path: Path) -> None:
    import shutil

    for i, rec in enumerate(synthetic.train[:5]):
        sub = tmp_path / "images" / f"part{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(rec.path, sub / Path(rec.path).name)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    records = unlabelled_records(tmp_path / "images")
    assert len(records) == 5 and all(r.pid == -1 for r in records)
    assert [r.path for r in records] == sorted(r.path for r in records)
    from ev_reid.datasets import DatasetLayoutError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="no image"):
        unlabelled_records(tmp_path / "empty")


def test_bot_lr_schedule() -> None:
    cfg = TrainConfig(warmup_epochs=10, warmup_factor=0.01, milestones=(40, 70), gamma=0.1)
    assert bot_lr_factor(0, cfg) == pytest.approx(0.01)
    assert bot_lr_factor(5, cfg) == pytest.approx(0.01 * 0.5 + 0.5)
    assert bot_lr_factor(10, cfg) == 1.0 and bot_lr_factor(39, cfg) == 1.0
    assert bot_lr_factor(40, cfg) == pytest.approx(0.1)
    assert bot_lr_factor(70, cfg) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="num_instances"):
        TrainConfig(num_instances=1)


def _train_cfg(out: Path, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        out_dir=str(out),
        model=ReidModelConfig(backbone="resnet18", backbone_kwargs=dict(TINY), last_stride_1=True),
        transform=ReidTransformConfig(height=64, width=32, padding=0, erasing_p=0.0),
        num_identities=4,
        num_instances=4,
        epochs=4,
        lr=1e-2,
        warmup_epochs=0,
        eval_every=0,
        num_workers=0,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_training_loss_goes_down_and_resume_is_exact(synthetic: Market1501, tmp_path: Path) -> None:
    train_only = ReidDataset(synthetic.train, [], [], dataset_dir=synthetic.dataset_dir)
    full = train(_train_cfg(tmp_path / "full", epochs=4), train_only)
    losses = [h["loss"] for h in full.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert full.model_path is not None and (tmp_path / "full" / "config.json").is_file()

    train(_train_cfg(tmp_path / "split", epochs=2), train_only)
    resumed = train(_train_cfg(tmp_path / "split", epochs=4, resume=True), train_only)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_finetune_from_upreid_checkpoint_and_evaluate(
    synthetic: Market1501, tmp_path: Path
) -> None:
    pre = pretrain_upreid(_tiny_upreid(tmp_path / "pre"), synthetic.train)
    cfg = _train_cfg(tmp_path / "ft", epochs=1, init_checkpoint=str(pre.backbone_path))
    result = train(cfg, synthetic)
    assert result.metrics is not None
    assert 0.0 <= result.metrics["mAP"] <= 1.0 and 0.0 <= result.metrics["rank1"] <= 1.0
    assert result.metrics["num_valid_queries"] > 0
    assert result.history[-1]["eval"] == result.metrics


def test_weights_are_saved_before_the_final_evaluation(
    synthetic: Market1501, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ev_reid.inference

    def failing_evaluation(*args: object, **kwargs: object) -> None:
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(ev_reid.inference, "evaluate_model", failing_evaluation)
    cfg = _train_cfg(tmp_path, epochs=1, max_steps_per_epoch=2)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(cfg, synthetic)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model.json").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000002"


# ----------------------------------------------------------------------------------------
# DDP: 2 gloo processes, gradients = mean of the single-process gradients of each shard
# ----------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world_size: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = ReidModel(
        ReidModelConfig(backbone="resnet18", backbone_kwargs=dict(TINY), num_classes=4)
    ).double()
    reference = copy.deepcopy(model)
    criterion = ReidCriterion()
    g = torch.Generator().manual_seed(123)
    images = torch.randn(16, 3, 32, 16, generator=g, dtype=torch.float64)
    pids = torch.arange(4).repeat_interleave(4)
    shards = [slice(0, 8), slice(8, 16)]  # each rank: 2 identities x 4 images

    ddp = DistributedDataParallel(model)
    loss, _ = train_step(ddp, criterion, images[shards[rank]], pids[shards[rank]])
    loss.backward()

    grads: dict[str, torch.Tensor] = {}
    for shard in shards:
        reference.zero_grad()
        ref_loss, _ = train_step(reference, criterion, images[shard], pids[shard])
        ref_loss.backward()
        for name, p in reference.named_parameters():
            if p.grad is not None:
                grads[name] = grads.get(name, torch.zeros_like(p)) + p.grad / len(shards)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert_close(p.grad, grads[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.distributed
def test_ddp_step_matches_single_process_gradient_average() -> None:
    run_distributed(_ddp_worker, world_size=2)


def _ddp_train_worker(rank: int, world_size: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    cfg = _train_cfg(Path(out), epochs=2, eval_every=1, data_root=root, dataset="market1501")
    result = train(cfg)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[0]["steps"] == result.history[1]["steps"] > 0
    if rank == 0:  # rank 0 evaluates (mid-run and final) and writes the outputs
        assert result.metrics is not None and "eval" in result.history[0]
        assert result.model_path is not None and result.model_path.is_file()
    else:
        assert result.metrics is None and result.model_path is None
    # every rank holds the same parameters (DDP; BatchNorm running statistics are per rank)
    # and logged the same rank-averaged losses
    for name, value in result.model.named_parameters():
        ref = value.detach().clone()
        torch.distributed.broadcast(ref, src=0)
        assert torch.equal(ref, value.detach()), name
    losses = torch.tensor([h["loss"] for h in result.history], dtype=torch.float64)
    ref = losses.clone()
    torch.distributed.broadcast(ref, src=0)
    assert torch.equal(ref, losses)


@pytest.mark.distributed
def test_train_under_two_ddp_ranks(synthetic: Market1501, tmp_path: Path) -> None:
    run_distributed(
        _ddp_train_worker, str(synthetic.dataset_dir), str(tmp_path / "ddp"), world_size=2
    )
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2] and metrics["final"] is not None


def test_bf16_autocast_step_is_finite_and_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = ReidModel(
        ReidModelConfig(backbone="resnet18", backbone_kwargs=dict(TINY), num_classes=4)
    )
    images = torch.randn(8, 3, 64, 32)
    pids = torch.arange(4).repeat_interleave(2)
    crit = ReidCriterion()
    ref, _ = train_step(model, crit, images, pids)
    amp, _ = train_step(
        model, crit, images, pids, autocast=torch.autocast("cpu", dtype=torch.bfloat16)
    )
    assert amp.dtype == torch.float32 and bool(torch.isfinite(amp.detach()))
    assert abs(float(amp.detach()) - float(ref.detach())) < 0.05 * float(ref.detach())


def test_criterion_matches_its_parts() -> None:
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(8, 6, generator=g, dtype=torch.float64)
    logits = torch.randn(8, 4, generator=g, dtype=torch.float64)
    parts = torch.randn(8, 2, 4, generator=g, dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    from ev_reid.losses import TripletLoss, label_smoothed_cross_entropy
    from ev_reid.models import ReidOutput

    total, logs = ReidCriterion()(ReidOutput(feats, logits, None, parts), pids)
    ce = [label_smoothed_cross_entropy(x, pids, 0.1) for x in (logits, parts[:, 0], parts[:, 1])]
    expected = sum(ce) / 3 + TripletLoss(0.3)(feats, pids)
    assert_close(total, expected)
    assert_close(logs["accuracy"], (logits.argmax(1) == pids).double().mean())
    assert F.mse_loss(logs["loss"], total.detach()) == 0
