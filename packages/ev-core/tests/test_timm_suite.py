"""timm's own model test suite (``tests/test_models.py`` of the timm release we pin), run for
every ev model.

The checks follow timm's tests one for one (forward + grad-checkpointing equality, backward with
every parameter reached, default-cfg shapes with ``output_fmt``, TorchScript, ``features_only``,
``forward_intermediates``, FX forward/backward through timm's notrace registry, FX +
TorchScript). They are written here rather than imported, and run on small configs of each
registered name (same code paths; timm runs the full-size defaults, which cost minutes on CI's
two cores); ``test_full_size_default_cfgs`` runs the full-size LITv2-S, LIT-S and LIT-Ti once.
LIT-Ti returns ``[B, 1 + N, C]`` tokens from ``forward_features`` (a cls token, like timm's
ViTs), so it takes timm's "non-standard" default-cfg test, as ViTs do.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import (
    NodePathTracer,
    create_feature_extractor,
    get_graph_node_names,
)

import ev_core  # noqa: F401  (registers the models)
from ev_core.registry import list_ev_models

SMALL: dict[str, dict[str, Any]] = {
    "lit_ti": dict(embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4]),
    **{
        name: dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
        for name in ("lit_s", "lit_m", "lit_b", "litv2_s", "litv2_m", "litv2_b")
    },
}
SIZE = 64  # every small model runs at 64² (LIT-S/M/B are built for it: resolution-locked)
NON_STD = ("lit_ti",)  # token output with a cls token (timm: ViT-like "non-std" models)
OVERLAY = dict(input_size=(3, SIZE, SIZE), pool_size=(SIZE // 32, SIZE // 32))


def small(name: str, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {**SMALL[name], "img_size": SIZE, "pretrained_cfg_overlay": OVERLAY, **kwargs}
    return timm.create_model(name, **kw)


def test_every_ev_model_is_covered() -> None:
    assert sorted(SMALL) == list_ev_models()


def _fx(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's FX helper: trace with its notrace registry and return the final node(s)."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(),
        autowrap_functions=get_notrace_functions(),
        param_shapes_constant=True,
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        out_names = [n.name for n in nodes[0]._input_nodes]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n)] for n in out_names]
    return create_feature_extractor(
        model,
        train_return_nodes=train_return,
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_forward(name: str) -> None:
    model = small(name).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    out = model(x)
    assert out.shape[0] == 1 and not torch.isnan(out).any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_backward(name: str) -> None:
    model = small(name, num_classes=42).train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


@pytest.mark.parametrize("name", sorted(set(SMALL) - set(NON_STD)))
def test_model_default_cfgs(name: str) -> None:
    _default_cfgs(small(name).eval(), lambda **kw: small(name, **kw))


@pytest.mark.parametrize("name", NON_STD)
def test_model_default_cfgs_non_std(name: str) -> None:
    _default_cfgs_non_std(small(name).eval(), lambda **kw: small(name, **kw))


@pytest.mark.parametrize("name", ["litv2_s", "lit_s", "lit_ti"])
def test_full_size_default_cfgs(name: str) -> None:
    def make(**kw: Any) -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, **kw)

    with torch.no_grad():
        if name in NON_STD:
            _default_cfgs_non_std(make().eval(), make)
        else:
            _default_cfgs(make().eval(), make)


def _default_cfgs(model: Any, make: Any) -> None:
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.default_cfg
    pool, size = cfg["pool_size"], cfg["input_size"]
    fmt = getattr(model, "output_fmt", "NCHW")
    assert fmt == "NHWC"  # forward_features is channels-last, declared like timm's Swin
    sp, ch = get_spatial_dim(fmt), get_channel_dim(fmt)
    x = torch.randn(1, *size)
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert (feats.shape[sp[0]], feats.shape[sp[1]]) == tuple(pool)
    assert feats.shape[ch] == model.num_features and pre.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0
    out = model(x)
    assert out.shape == pre.shape == (1, model.head_hidden_size)
    model.reset_classifier(0, "")
    out = model(x)
    assert out.dim() == 4 and (out.shape[sp[0]], out.shape[sp[1]]) == tuple(pool)
    out = make(num_classes=0, global_pool="").eval()(x)
    assert out.dim() == 4 and (out.shape[sp[0]], out.shape[sp[1]]) == tuple(pool)
    _cfg_names(model, cfg)


def _default_cfgs_non_std(model: Any, make: Any) -> None:
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.default_cfg
    x = torch.randn(1, *cfg["input_size"])
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert feats.shape[-1] == model.num_features and pre.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0
    out = model(x)
    assert out.shape == pre.shape and out.shape[-1] == model.head_hidden_size
    assert make(num_classes=0).eval()(x).shape[-1] == model.num_features
    _cfg_names(model, cfg)


def _cfg_names(model: Any, cfg: dict[str, Any]) -> None:
    state = model.state_dict()
    fresh = type(model)(cfg=model.cfg)  # the classifier exists in the configured model
    assert f"{cfg['classifier']}.weight" in fresh.state_dict()
    assert f"{cfg['first_conv']}.weight" in state


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_forward_torchscript(name: str) -> None:
    with timm.set_scriptable(True):
        model = small(name).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    scripted = torch.jit.script(model)
    out = scripted(x)
    assert out.shape[0] == 1 and not torch.isnan(out).any()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("getter", [False, True])
def test_model_forward_features(name: str, getter: bool) -> None:
    kw = dict(feature_cls="getter") if getter else {}
    model = small(name, features_only=True, **kw).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    outs = model(torch.randn(1, 3, SIZE, SIZE))
    fmt = getattr(model, "output_fmt", "NCHW")
    ch, sp = get_channel_dim(fmt), get_spatial_dim(fmt)
    assert len(outs) == len(channels)
    for c, r, o in zip(channels, reductions, outs, strict=True):
        assert o.shape[ch] == c and o.shape[0] == 1 and not torch.isnan(o).any()
        assert (
            o.shape[sp[0]] <= math.ceil(SIZE / r) + 1 and o.shape[sp[1]] <= math.ceil(SIZE / r) + 1
        )


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_forward_intermediates(name: str) -> None:
    model = small(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(1, 3, SIZE, SIZE)
    final, inter = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(inter) == len(info.channels()) >= 3
    for c, r, o in zip(info.channels(), info.reduction(), inter, strict=True):
        assert o.shape[1] == c and o.shape[2] <= math.ceil(SIZE / r) + 1
    torch.testing.assert_close(final, model.forward_features(x))
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_forward_fx(name: str) -> None:
    model = small(name).eval()
    with torch.inference_mode():
        x = torch.randn(1, 3, SIZE, SIZE)
        out = model(x)
        fx_out = torch.cat(tuple(_fx(model)(x).values()))
    assert torch.equal(fx_out, out) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", ["litv2_s", "lit_s", "lit_ti"])
def test_model_backward_fx(name: str) -> None:
    model = small(name, num_classes=42).train()
    n_params = sum(p.numel() for p in model.parameters())
    fx_model = _fx(model, train=True)
    out = torch.cat(tuple(fx_model(torch.randn(2, 3, SIZE, SIZE)).values()))
    out.mean().backward()
    missing = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert sum(p.grad.numel() for p in fx_model.parameters()) == n_params
    assert out.shape[-1] == 42


@pytest.mark.parametrize("name", ["litv2_s", "lit_s", "lit_ti"])
def test_model_forward_fx_torchscript(name: str) -> None:
    with timm.set_scriptable(True):
        model = small(name).eval()
    scripted = torch.jit.script(_fx(model))
    with torch.inference_mode():
        out = torch.cat(tuple(scripted(torch.randn(1, 3, SIZE, SIZE)).values()))
    assert out.shape[0] == 1 and not torch.isnan(out).any()
