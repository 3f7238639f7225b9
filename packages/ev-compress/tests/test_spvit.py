"""SPViT: weight sharing, gates, FLOPs model, convert / force_choice / export on tiny models."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import ev_core  # noqa: F401  (registers litv2_* with timm)
from ev_compress import spvit
from ev_compress.spvit.layers import GatedFFN, UnifiedAttention
from ev_core.flops import extra_flop_formulas

VIT_KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10)
SWIN_KW = dict(
    img_size=56, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10
)
LIT_KW = dict(
    img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), num_classes=10
)
MODELS = {
    "vit": ("deit_tiny_patch16_224", VIT_KW),
    "swin": ("swin_tiny_patch4_window7_224", SWIN_KW),
    "lit": ("litv2_s", LIT_KW),
}


def count_macs(model: nn.Module, size: tuple[int, int, int]) -> int:
    """Measured MACs of one image: torch's FlopCounterMode (+ ev-core's SDPA/deform formulas),
    with autograd on so that ev-core's uncounted fused oneDNN inference ops stay off."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
    was_training = model.training
    model.eval()
    with counter, torch.enable_grad():
        model(torch.randn(1, *size, dtype=param.dtype))
    model.train(was_training)
    return counter.get_total_flops() // 2


def make(family: str) -> tuple[nn.Module, dict]:
    name, kw = MODELS[family]
    torch.manual_seed(0)
    return timm.create_model(name, **kw).eval(), kw


def converted(family: str) -> tuple[nn.Module, nn.Module, dict]:
    model, kw = make(family)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the FLOPs model must match the probe's measurement
        spvit.convert(model, model_name=MODELS[family][0], model_kwargs=kw)
    return model, ref, kw


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Random gates, head mixtures and batch-norm statistics (as after a search)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, UnifiedAttention):
                m.kernel_thresholds.copy_(torch.randn(3, generator=g) * 2)
                m.head_probs.copy_(torch.randn(m.head_probs.shape, generator=g) * 0.02)
                for bn in (m.bn_1x1, m.bn_3x3):
                    bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
                    bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                    bn.weight.copy_(torch.randn(bn.num_features, generator=g))
                    bn.bias.copy_(torch.randn(bn.num_features, generator=g))
            if isinstance(m, GatedFFN):
                m.ffn_thresholds.copy_(torch.randn(m.hidden, generator=g))


# ---------------------------------------------------------------- weight sharing

DEIT_TAPS = {p: (p % 3, p // 3) for p in range(9)}  # column-major (official DeiT fine-tune)
SWIN_TAPS = {0: (1, 1), 1: (0, 0), 2: (1, 0), 3: (2, 0), 4: (0, 1),
             5: (2, 1), 6: (0, 2), 7: (1, 2), 8: (2, 2)}  # fmt: skip


@pytest.mark.parametrize(
    ("tap_order", "taps", "centre"), [("deit", DEIT_TAPS, 4), ("swin", SWIN_TAPS, 0)]
)
def test_conv_kernels_are_the_head_mixtures(tap_order, taps, centre):
    h, d, C, T = 3, 4, 6, 0.7
    g = torch.Generator().manual_seed(1)
    wv = torch.randn(h * d, C, generator=g, dtype=torch.float64)
    bv = torch.randn(h * d, generator=g, dtype=torch.float64)
    wo = torch.randn(C, h * d, generator=g, dtype=torch.float64)
    probs = torch.randn(h, 9, generator=g, dtype=torch.float64)
    P = torch.exp(probs / T) / torch.exp(probs / T).sum(0, keepdim=True)
    assert spvit.centre_tap(tap_order) == centre
    w3, b3, o3 = spvit.conv_kernels(wv, bv, wo, probs, T, 3, tap_order)
    w1, b1, o1 = spvit.conv_kernels(wv, bv, wo, probs, T, 1, tap_order)
    for p, (r, c) in taps.items():
        k_p = sum(P[i, p] * wv[i * d : (i + 1) * d] for i in range(h))
        torch.testing.assert_close(w3[:, :, r, c], k_p, rtol=1e-12, atol=1e-12)
    exp_b = sum(P[i, p] * bv[i * d : (i + 1) * d] for i in range(h) for p in range(9))
    exp_o = sum(P[i, p] * wo[:, i * d : (i + 1) * d] for i in range(h) for p in range(9))
    torch.testing.assert_close(b3, exp_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o3, exp_o, rtol=1e-12, atol=1e-12)
    k_c = sum(P[i, centre] * wv[i * d : (i + 1) * d] for i in range(h))
    torch.testing.assert_close(w1[:, :, 0, 0], k_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b1, sum(P[i, centre] * bv[i * d : (i + 1) * d] for i in range(h)))
    torch.testing.assert_close(o1, sum(P[i, centre] * wo[:, i * d : (i + 1) * d] for i in range(h)))


def test_conv_branch_equals_explicit_tap_sum():
    """3×3 branch of a ViT block = Σ_p K_p·x(shifted by tap p) (+bias, BN, ReLU, proj); cls passes."""
    model, _, _ = converted("vit")
    model.double()
    attn = model.blocks[0].attn
    randomise(model)
    attn.eval()
    x = torch.randn(2, 1 + 16, 48, dtype=torch.float64)
    wv, bv, wo, bo = attn.shared_weights()
    P = torch.softmax(attn.head_probs / attn.temperature, dim=0)
    h, d = attn.num_heads, attn.head_dim
    grid = x[:, 1:].reshape(2, 4, 4, 48)
    pad = F.pad(grid, (0, 0, 1, 1, 1, 1))
    z = torch.zeros(2, 4, 4, d, dtype=torch.float64)
    for p, (r, c) in DEIT_TAPS.items():
        k_p = sum(P[i, p] * wv[i * d : (i + 1) * d] for i in range(h))
        b_p = sum(P[i, p] * bv[i * d : (i + 1) * d] for i in range(h))
        z = z + pad[:, r : r + 4, c : c + 4] @ k_p.T + b_p
    bn = attn.bn_3x3
    z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    o = sum(P[i, p] * wo[:, i * d : (i + 1) * d] for i in range(h) for p in range(9))
    expected = torch.relu(z) @ o.T + bo
    out = attn.branch(2, x, (), {})
    torch.testing.assert_close(out[:, 1:], expected.reshape(2, 16, 48), rtol=1e-10, atol=1e-10)
    assert torch.equal(out[:, 0], x[:, 0])  # the cls token bypasses the convolution


# ---------------------------------------------------------------- gates


def test_relaxed_bernoulli_hard_values_and_rate():
    torch.manual_seed(0)
    theta = torch.full((20000,), 0.8, requires_grad=True)
    g = spvit.relaxed_bernoulli_st(theta)
    assert set(g.detach().unique().tolist()) <= {0.0, 1.0}
    rate = float(g.detach().mean())
    assert abs(rate - torch.sigmoid(torch.tensor(0.8)).item()) < 0.015
    g.sum().backward()
    assert theta.grad is not None and bool((theta.grad > 0).all())  # straight-through σ(l)'


def test_cumulative_gates_and_detach_rule():
    raw = torch.tensor([1.0, 1.0, 0.0], requires_grad=True)
    g = spvit.cumulative_gates(raw)
    assert g.tolist() == [1.0, 1.0, 0.0]
    # g2 is on: g1 is detached; g3 is off: g2 keeps its gradient
    g[0].backward(retain_graph=True)
    assert raw.grad is None or float(raw.grad.abs().sum()) == 0.0
    g[1].backward()
    assert float(raw.grad.abs().sum()) > 0
    assert spvit.cumulative_gates(torch.tensor([1.0, 0.0, 1.0])).tolist() == [1.0, 0.0, 0.0]
    ind = spvit.flops_indicator(torch.tensor([0.3, -0.2]))
    assert ind.tolist() == [1.0, 0.0]


def test_eval_decision_follows_thresholds():
    model, _, _ = converted("vit")
    with torch.no_grad():
        model.blocks[0].attn.kernel_thresholds.copy_(torch.tensor([1.0, -1.0, 1.0]))
        model.blocks[1].attn.kernel_thresholds.copy_(torch.tensor([-1.0, 1.0, 1.0]))
    assert spvit.block_choices(model) == ["conv1x1", "skip"]


# ---------------------------------------------------------------- forced attention = MSA


@pytest.mark.parametrize("family", ["vit", "swin", "lit"])
def test_forced_attention_is_the_original_msa(family):
    model, ref, kw = converted(family)
    randomise(model)
    spvit.force_choice(model, "attention")
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    for mode in ("eval", "train"):  # forced gates hold in training too (same drop-path RNG)
        getattr(model, mode)()
        getattr(ref, mode)()
        with torch.no_grad():
            torch.manual_seed(1)
            out = model(x)
            torch.manual_seed(1)
            assert torch.equal(out, ref(x))


def test_force_choice_validates():
    model, _, _ = converted("vit")
    with pytest.raises(spvit.SPViTArchError, match="unknown choice"):
        spvit.force_choice(model, "conv5x5")
    with pytest.raises(spvit.SPViTArchError, match="2 attention blocks"):
        spvit.force_choice(model, ["skip"])
    spvit.force_choice(model, ["skip", "conv3x3"])
    assert spvit.block_choices(model) == ["skip", "conv3x3"]
    with pytest.raises(spvit.SPViTArchError, match="converted"):
        spvit.force_choice(nn.Linear(2, 2), "skip")


def test_convert_rejects_unsupported_models():
    with pytest.raises(spvit.SPViTArchError, match="no supported transformer block"):
        spvit.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    model, _, _ = converted("vit")
    with pytest.raises(spvit.SPViTArchError, match="already converted"):
        spvit.convert(model)


def test_search_mode_mixes_all_branches_with_gradients():
    model, _, _ = converted("vit")
    model.train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    attn = model.blocks[0].attn
    assert attn.head_probs.grad is not None
    assert attn.kernel_thresholds.grad is not None
    assert model.blocks[0].mlp.ffn_thresholds.grad is not None


# ---------------------------------------------------------------- FLOPs model


@pytest.mark.parametrize("family", ["vit", "swin", "lit"])
def test_flops_model_equals_measured(family):
    model, ref, kw = converted(family)
    size = (3, kw["img_size"], kw["img_size"])
    assert int(spvit.model_macs(model)) == count_macs(ref, size)
    for seed in range(2):
        randomise(model, seed)
        small = spvit.export(model)
        assert int(spvit.model_macs(model, differentiable=False)) == count_macs(small, size)
    for choice in ("conv3x3", "conv1x1", "skip"):
        spvit.force_choice(model, choice)
        assert int(spvit.model_macs(model)) == count_macs(spvit.export(model), size)


def test_flops_formulas_match_systems_md():
    """DeiT-S block: MSA 4(HW+1)C² + 2C(HW+1)², 3×3 (9Cd+dC)HW, 1×1 2CdHW, FFN 2·N·C per unit."""
    from ev_compress.spvit.hybrid import TokenLayout

    C, h, d, HW = 384, 6, 64, 196
    costs = spvit.block_costs(
        "vit",
        dim=C,
        num_heads=h,
        head_dim=d,
        hw=(14, 14),
        ffn_hidden=1536,
        layout=TokenLayout("vit", num_prefix_tokens=1),
    )
    assert costs.attention == 4 * (HW + 1) * C**2 + 2 * C * (HW + 1) ** 2
    assert costs.conv3x3 == (9 * C * d + d * C) * HW
    assert costs.conv1x1 == 2 * C * d * HW
    assert costs.ffn_per_unit == 2 * (HW + 1) * C


def test_flops_gradient_reaches_thresholds():
    model, _, _ = converted("vit")
    spvit.model_gflops(model).backward()
    assert float(model.blocks[0].attn.kernel_thresholds.grad.abs().sum()) > 0
    assert bool((model.blocks[0].mlp.ffn_thresholds.grad > 0).all())


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("family", ["vit", "swin", "lit"])
def test_export_equals_gated_model_and_is_smaller(family, tmp_path):
    model, ref, kw = converted(family)
    model.double()
    randomise(model, seed=3)
    model.eval()
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"], dtype=torch.float64)
    small = spvit.export(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(small(x), expected, rtol=1e-10, atol=1e-10)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in ref.parameters())
    size = (3, kw["img_size"], kw["img_size"])
    assert count_macs(small, size) < count_macs(ref, size)
    assert not any(isinstance(m, (UnifiedAttention, GatedFFN)) for m in small.modules())
    assert not any("thresholds" in k or "head_probs" in k for k in small.state_dict())
    # save → load without the search model: same outputs
    path = spvit.save_exported(small.float(), tmp_path / "small.safetensors")
    again = spvit.load_exported(path)
    with torch.no_grad():
        assert torch.equal(again(x.float()), small(x.float()))
    assert again.spvit_arch["blocks"] == small.spvit_arch["blocks"]


def test_export_keep_bn_matches_too():
    model, _, _ = converted("swin")
    model.double()
    randomise(model, seed=5)
    spvit.force_choice(model, "conv3x3", ffn=None)
    model.eval()
    x = torch.randn(1, 3, 56, 56, dtype=torch.float64)
    small = spvit.export(model, fold_bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-10, atol=1e-10)


def test_save_exported_errors(tmp_path):
    with pytest.raises(spvit.SPViTArchError, match="not an exported"):
        spvit.save_exported(nn.Linear(2, 2), tmp_path / "a.safetensors")
    model, _, _ = converted("vit")
    with pytest.raises(spvit.SPViTArchError, match=r"\.safetensors"):
        spvit.save_exported(spvit.export(model), tmp_path / "a.pt")
    with pytest.raises(spvit.SPViTArchError, match="no exported"):
        spvit.load_exported(tmp_path / "missing.safetensors")


def test_searched_model_round_trip(tmp_path):
    model, _, _ = converted("lit")
    randomise(model, seed=2)
    path = spvit.save_searched(model, tmp_path / "s.safetensors")
    again = spvit.load_searched(path)
    assert spvit.block_choices(again) == spvit.block_choices(model)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))
    assert math.isclose(float(spvit.model_gflops(again)), float(spvit.model_gflops(model)))
