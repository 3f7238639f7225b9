"""Re-id model: head shapes, BNNeck behaviour, pooling maths, last stride, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ev_core.checkpoint import save_checkpoint
from ev_reid.models import (
    GeneralizedMeanPooling,
    ReidModel,
    ReidModelConfig,
    ReidOutput,
    gem,
    load_backbone_weights,
    load_reid_model,
    stripe_pool,
)
from ev_testing import BaseTester, assert_close

TINY = {"channels": [8, 16, 16, 32], "stem_width": 8}


def _tiny(**kw: object) -> ReidModel:
    cfg = ReidModelConfig(backbone="resnet18", backbone_kwargs=dict(TINY), **kw)  # type: ignore[arg-type]
    return ReidModel(cfg)


def test_gem_matches_explicit_formula_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64) + 0.01
    p = torch.tensor(2.5, dtype=torch.float64)
    ref = torch.stack([(x[b].pow(2.5).mean(dim=(1, 2))) ** (1 / 2.5) for b in range(2)])
    assert_close(gem(x, p).flatten(1), ref)
    assert_close(GeneralizedMeanPooling(2.5).double()(x), ref)
    assert BaseTester.gradcheck(lambda t, q: gem(t, q), [x, p])
    # p = 1 is average pooling; large p approaches max pooling
    assert_close(gem(x, 1.0).flatten(1), x.mean(dim=(2, 3)))
    assert_close(gem(x, 200.0).flatten(1), x.amax(dim=(2, 3)), rtol=0.05, atol=0.0)


def test_stripe_pool_splits_rows_top_to_bottom() -> None:
    x = torch.arange(2 * 3 * 6 * 2, dtype=torch.float64).reshape(2, 3, 6, 2)
    out = stripe_pool(x, 3)
    assert out.shape == (2, 3, 3)
    for s in range(3):
        assert_close(out[:, s], x[:, :, 2 * s : 2 * s + 2].mean(dim=(2, 3)))
    ref_gem = torch.stack(
        [
            (x[:, :, 2 * s : 2 * s + 2].clamp(min=1e-6) ** 3).mean(dim=(2, 3)) ** (1 / 3)
            for s in range(3)
        ],
        dim=1,
    )
    assert_close(stripe_pool(x, 3, mode="gem", p=3.0), ref_gem)
    with pytest.raises(ValueError, match="num_stripes"):
        stripe_pool(x, 7)


def test_train_and_eval_outputs_shapes() -> None:
    model = _tiny(num_classes=5, num_stripes=3, pooling="gem", last_stride_1=True)
    x = torch.randn(4, 3, 96, 32)  # 6 x 2 feature map: two rows per stripe
    out = model(x)
    assert isinstance(out, ReidOutput)
    assert out.features.shape == (4, 32)
    assert out.logits is not None and out.logits.shape == (4, 5)
    assert out.part_features is not None and out.part_features.shape == (4, 3, 32)
    assert out.part_logits is not None and out.part_logits.shape == (4, 3, 5)
    model.eval()
    feats = model(x)
    assert isinstance(feats, torch.Tensor) and feats.shape == (4, model.feature_dim) == (4, 128)


def test_bnneck_classifier_is_bias_free_and_eval_feature_is_bn_output() -> None:
    torch.manual_seed(0)
    model = _tiny(num_classes=6)
    assert model.classifier is not None and model.classifier.bias is None
    bn = model.bottleneck
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.bias.requires_grad
    x = torch.randn(8, 3, 64, 32)
    out = model(x)
    assert isinstance(out, ReidOutput) and out.logits is not None
    # training mode: BN uses batch statistics; logits = W · BN(f)
    f = out.features.detach()
    f_bn = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + bn.eps) * bn.weight
    assert_close(out.logits, F.linear(f_bn, model.classifier.weight), rtol=1e-3, atol=1e-5)
    # eval mode: the returned feature is BN with the running statistics (after_bn) ...
    model.eval()
    with torch.no_grad():
        f_eval = model.pool_global(model.forward_feature_map(x))
        expected = (f_eval - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
        assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        # ... or the raw pooled feature (before_bn)
        model.config.eval_feature = "before_bn"
        assert_close(model(x), f_eval)


def test_neck_none_and_no_classifier() -> None:
    model = _tiny(neck="none")
    assert model.config.eval_feature == "before_bn" and model.classifier is None
    out = model(torch.randn(2, 3, 64, 32))
    assert isinstance(out, ReidOutput) and out.logits is None and out.part_features is None


def test_last_stride_one_doubles_resolution() -> None:
    x = torch.randn(1, 3, 64, 32)
    assert _tiny().forward_feature_map(x).shape[-2:] == (2, 1)
    assert _tiny(last_stride_1=True).forward_feature_map(x).shape[-2:] == (4, 2)
    with pytest.raises(ValueError, match="layer4"):
        ReidModel(
            ReidModelConfig(
                backbone="convnext_atto", last_stride_1=True, backbone_kwargs={"dims": (8, 8, 8, 8)}
            )
        )


def test_any_timm_backbone_and_bad_names() -> None:
    model = ReidModel(
        ReidModelConfig(backbone="convnext_atto", backbone_kwargs={"dims": (8, 8, 16, 16)})
    ).eval()
    assert model(torch.randn(2, 3, 64, 32)).shape == (2, 16)
    with pytest.raises(ValueError, match="unknown backbone"):
        ReidModel(ReidModelConfig(backbone="resnet_does_not_exist"))
    with pytest.raises(ValueError, match="pooling"):
        ReidModelConfig(pooling="max")  # type: ignore[arg-type]


def test_ev_core_litv2_backbone_with_stripes() -> None:
    cfg = ReidModelConfig(
        backbone="litv2_s",
        backbone_kwargs={"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)},
        num_classes=3,
        num_stripes=2,
        pooling="gem",
    )
    model = ReidModel(cfg)
    out = model(torch.randn(2, 3, 128, 64))  # stride 32: a 4 x 2 map, two rows per stripe
    assert isinstance(out, ReidOutput) and out.part_logits is not None
    assert out.features.shape == (2, 128) and out.part_logits.shape == (2, 2, 3)


def test_load_backbone_weights_from_timm_file_and_reid_checkpoint(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=10, **TINY)
    file = tmp_path / "imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, file)
    model = _tiny(num_classes=3)
    report = load_backbone_weights(model, file)
    assert "fc.weight" in report.unexpected and not report.missing and not report.mismatched
    assert_close(model.backbone.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])

    # a full re-id checkpoint (keys under "backbone.") round-trips, config included
    model.eval()
    ckpt = save_checkpoint(tmp_path / "reid.safetensors", model.state_dict(), config=model.config)
    loaded = load_reid_model(ckpt).eval()
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert_close(loaded(x), model(x))
    other = _tiny()
    assert load_backbone_weights(other, ckpt).loaded

    torch.save({"foo": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no tensor matches"):
        load_backbone_weights(other, tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(other, tmp_path / "missing.pth")
