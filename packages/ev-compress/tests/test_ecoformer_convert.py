"""convert / fit_hash / revert on timm PVTv2 and ev LIT-Ti / LITv2, save/load, official checkpoints."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ev_core  # noqa: F401  (registers lit_* / litv2_* with timm)
from ev_compress import ecoformer
from ev_compress.ecoformer import EcoAttention
from ev_core.errors import EvError
from ev_testing import assert_close

IMG = 96  # stage-3 map 6x6 = 36 tokens ≥ 2·topk and ≥ 25 anchors


@pytest.fixture(scope="module")
def pvt_pair() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    original = timm.create_model("pvt_v2_b0", num_classes=10).eval()
    model = timm.create_model("pvt_v2_b0", num_classes=10).eval()
    model.load_state_dict(original.state_dict())
    ecoformer.convert(model, form="token")
    x = torch.randn(2, 3, IMG, IMG)
    ecoformer.fit_hash(
        model,
        [x[:1], (x[1:], torch.zeros(1))],
        generator=torch.Generator().manual_seed(0),
        iterations=3,
    )
    return original, model, x


def test_convert_initialises_from_msa_weights(pvt_pair) -> None:  # type: ignore[no-untyped-def]
    original, model, _ = pvt_pair
    ecos = ecoformer.eco_attentions(model)
    assert sorted(ecos) == [f"stages.{i}.blocks.{j}.attn" for i in range(3) for j in range(2)]
    assert type(model.stages[3].blocks[0].attn).__name__ == "Attention"  # stage 4 keeps MSA
    for name, eco in ecos.items():
        src = original.get_submodule(name)
        C = src.dim
        assert eco.num_heads == src.num_heads and eco.form == "token"
        assert torch.equal(eco.qk.weight, src.q.weight) and torch.equal(eco.qk.bias, src.q.bias)
        assert torch.equal(eco.v.weight, src.kv.weight[C:]) and torch.equal(
            eco.v.bias, src.kv.bias[C:]
        )
        assert torch.equal(eco.proj.weight, src.proj.weight) and torch.equal(
            eco.proj.bias, src.proj.bias
        )
        assert eco.hash.is_fitted
        assert not any(k.startswith("sr.") or k.startswith("norm.") for k in eco.state_dict())


def test_converted_forward_finite_and_train_step(pvt_pair) -> None:  # type: ignore[no-untyped-def]
    _, model, x = pvt_pair
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    model.train()
    try:
        model(x).logsumexp(-1).sum().backward()
        eco = model.stages[0].blocks[0].attn
        assert eco.qk.weight.grad is not None and torch.isfinite(eco.qk.weight.grad).all()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_save_load_keeps_codes(pvt_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, model, x = pvt_pair
    path = tmp_path / "eco.pt"
    torch.save(model.state_dict(), path)
    fresh = ecoformer.convert(timm.create_model("pvt_v2_b0", num_classes=10).eval(), form="token")
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for name, eco in ecoformer.eco_attentions(model).items():
        tokens = torch.randn(1, 40, eco.dim)
        assert torch.equal(fresh.get_submodule(name).codes(tokens), eco.codes(tokens))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_revert_restores_the_original(pvt_pair) -> None:  # type: ignore[no-untyped-def]
    original, _, x = pvt_pair
    model = timm.create_model("pvt_v2_b0", num_classes=10).eval()
    model.load_state_dict(original.state_dict())
    ecoformer.convert(model, stages=(1,))
    assert len(ecoformer.eco_attentions(model)) == 2
    ecoformer.revert(model)
    assert not ecoformer.eco_attentions(model)
    assert model.state_dict().keys() == original.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    with pytest.raises(EvError, match="no attention converted"):
        ecoformer.revert(model)


def test_convert_errors() -> None:
    model = timm.create_model("pvt_v2_b0", num_classes=0)
    with pytest.raises(EvError, match="no attention module found in stages"):
        ecoformer.convert(model, stages=(7,))
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, depths=(1, 1, 1, 1))
    with pytest.raises(EvError, match="WindowAttention, which has no EcoFormer conversion"):
        ecoformer.convert(swin)
    with pytest.raises(EvError, match="no EcoAttention"):
        ecoformer.fit_hash(model, [torch.randn(1, 3, 64, 64)])


def test_unfitted_model_tells_the_user_to_fit() -> None:
    model = ecoformer.convert(timm.create_model("pvt_v2_b0", num_classes=0))
    with pytest.raises(ecoformer.HashNotFittedError, match="fit_hash"):
        model(torch.randn(1, 3, 64, 64))


TINY_LITV2 = dict(
    embed_dim=16,
    depths=[1, 1, 2, 1],
    num_heads=[1, 2, 4, 8],
    alpha=0.5,
    local_ws=[0, 0, 2, 1],
    num_classes=5,
    drop_path_rate=0.0,
)


def test_convert_litv2_hilo_block_diagonal_init() -> None:
    torch.manual_seed(0)
    original = timm.create_model("litv2_s", **TINY_LITV2).eval()
    model = timm.create_model("litv2_s", **TINY_LITV2).eval()
    model.load_state_dict(original.state_dict())
    ecoformer.convert(model)  # stages 0/1 are MLP-only: stage 2 (HiLo) is converted
    ecos = ecoformer.eco_attentions(model)
    assert sorted(ecos) == ["layers.2.blocks.0.attn", "layers.2.blocks.1.attn"]
    for name, eco in ecos.items():
        hilo = original.get_submodule(name)
        hd, ld = hilo.h_dim, hilo.l_dim
        assert hd > 0 and ld > 0
        assert torch.equal(eco.qk.weight, torch.cat([hilo.h_qkv.weight[:hd], hilo.l_q.weight]))
        assert torch.equal(
            eco.v.weight, torch.cat([hilo.h_qkv.weight[2 * hd :], hilo.l_kv.weight[ld:]])
        )
        assert torch.equal(eco.proj.weight[:hd, :hd], hilo.h_proj.weight)
        assert torch.equal(eco.proj.weight[hd:, hd:], hilo.l_proj.weight)
        assert not eco.proj.weight[:hd, hd:].any() and not eco.proj.weight[hd:, :hd].any()
        assert torch.equal(eco.proj.bias, torch.cat([hilo.h_proj.bias, hilo.l_proj.bias]))
    x = torch.randn(2, 3, 128, 128)  # stage-3 map 8x8
    ecoformer.fit_hash(model, [x], iterations=2)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    ecoformer.revert(model)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def test_convert_lit_ti_msa() -> None:
    torch.manual_seed(0)
    original = timm.create_model("lit_ti", img_size=128, depths=(1, 1, 2, 1), num_classes=3).eval()
    model = timm.create_model("lit_ti", img_size=128, depths=(1, 1, 2, 1), num_classes=3).eval()
    model.load_state_dict(original.state_dict())
    ecoformer.convert(model, stages=(2,))
    ecos = ecoformer.eco_attentions(model)
    assert len(ecos) == 2 and all(n.startswith("block3.") for n in ecos)
    eco = ecos["block3.0.attn"]
    src = original.get_submodule("block3.0.attn")
    C = src.qkv.in_features
    assert torch.equal(eco.qk.weight, src.qkv.weight[:C])
    assert torch.equal(eco.v.weight, src.qkv.weight[2 * C :])
    x = torch.randn(1, 3, 128, 128)
    ecoformer.fit_hash(model, [x], iterations=1)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


# --- official checkpoints ------------------------------------------------------------------


def _to_official_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Write ``model`` (converted timm pvt_v2) in the official EcoFormer PVTv2 layout.

    Derived from reading ziplab/EcoFormer ``pvt/pvt_v2.py``, ``performer.py`` and
    ``hashing/ksh.py``: ``patch_embed{k}``/``block{k}.{j}``/``norm{k}``, ``mlp.dwconv.dwconv``,
    EcoFormer ``to_qk``/``to_v``/``fast_attention.ksh.{A, mvec [1,h,1,m], anchor [1,h,m,d]}``
    plus the Performer ``fast_attention.projection_matrix [int(d·ln d), d]``, MSA ``qkv``.
    """
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key
        k = re.sub(r"^patch_embed\.", "patch_embed1.", k)
        k = re.sub(
            r"^stages\.(\d)\.downsample\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", k
        )
        k = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"block{int(m.group(1)) + 1}.", k)
        k = re.sub(r"^stages\.(\d)\.norm\.", lambda m: f"norm{int(m.group(1)) + 1}.", k)
        k = k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        k = k.replace("attn.qk.", "attn.to_qk.").replace("attn.v.", "attn.to_v.")
        if k.endswith("hash.fitted"):
            continue
        if ".hash." in k:
            eco = model.get_submodule(key.split(".attn.")[0] + ".attn")
            h, d = eco.num_heads, eco.head_dim
            name = k.split(".hash.")[1]
            base = k.split(".hash.")[0] + ".fast_attention."
            if name == "projection":
                out[base + "ksh.A"] = value
            elif name == "kernel_mean":
                out[base + "ksh.mvec"] = value.reshape(1, h, 1, -1)
            elif name == "anchors":
                out[base + "ksh.anchor"] = value.reshape(1, h, -1, d)
            out[base + "projection_matrix"] = torch.randn(int(d * math.log(d)), d)
            continue
        out[k] = value
    for i in range(2):  # stage-4 MSA: one fused qkv
        pre = f"block4.{i}.attn."
        for p in ("weight", "bias"):
            out[pre + f"qkv.{p}"] = torch.cat([out.pop(pre + f"q.{p}"), out.pop(pre + f"kv.{p}")])
    return out


def test_official_checkpoint_loads(pvt_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, model, x = pvt_pair
    official = _to_official_layout(model)
    assert (
        "block1.0.attn.fast_attention.ksh.A" in official and "block4.0.attn.qkv.weight" in official
    )
    path = tmp_path / "checkpoint.pth"
    # the official train script also stores its argparse Namespace under "args"
    torch.save({"model": official, "epoch": 29, "args": argparse.Namespace(nbits=16, m=25)}, path)
    fresh = ecoformer.convert(timm.create_model("pvt_v2_b0", num_classes=10).eval(), form="token")
    ecoformer.load_official_checkpoint(fresh, path)
    assert all(e.hash.is_fitted for e in ecoformer.eco_attentions(fresh).values())
    with torch.no_grad():
        assert_close(fresh(x), model(x))
        assert torch.equal(fresh(x), model(x))


def test_official_msa_finetune_checkpoint_initialises_qk_and_v(pvt_pair) -> None:  # type: ignore[no-untyped-def]
    original, _, _ = pvt_pair
    sd = {}
    for k, v in _to_official_layout(original).items():  # an MSA model: every stage has q/kv
        sd[k] = v
    for i, depth in ((1, 2), (2, 2), (3, 2)):
        for j in range(depth):
            pre = f"block{i}.{j}.attn."
            for p in ("weight", "bias"):
                sd[pre + f"qkv.{p}"] = torch.cat([sd.pop(pre + f"q.{p}"), sd.pop(pre + f"kv.{p}")])
            for extra in [
                k for k in sd if k.startswith(pre + "sr.") or k.startswith(pre + "norm.")
            ]:
                sd.pop(extra)
    fresh = ecoformer.convert(timm.create_model("pvt_v2_b0", num_classes=10))
    ecoformer.load_official_checkpoint(fresh, {"model": sd})
    eco = fresh.stages[1].blocks[1].attn
    src = original.stages[1].blocks[1].attn
    assert torch.equal(eco.qk.weight, src.q.weight) and torch.equal(
        eco.v.weight, src.kv.weight[src.dim :]
    )
    assert not eco.hash.is_fitted  # MSA fine-tune: fit the hash next


def test_official_checkpoint_errors(tmp_path: Path) -> None:
    model = ecoformer.convert(timm.create_model("pvt_v2_b0", num_classes=10))
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EvError, match=r"broken\.pth"):
        ecoformer.load_official_checkpoint(model, bad)
    with pytest.raises(EvError, match="does not match"):
        ecoformer.load_official_checkpoint(
            model, {"model": {"block1.0.attn.to_qk.weight": torch.zeros(3, 3)}}
        )
    with pytest.raises(EvError, match="not an EcoFormer checkpoint"):
        ecoformer.load_official_checkpoint(model, {"model": {"x": 1}})


def test_eco_attention_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="divisible"):
        EcoAttention(30, 4)
    with pytest.raises(ValueError, match="form"):
        EcoAttention(32, 4, form="exact")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small_eco_pvt() -> torch.nn.Module:
    return ecoformer.convert(timm.create_model("pvt_v2_b0", num_classes=10, depths=(1, 1, 1, 1)))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300))
def test_fuzz_checkpoint_file_bytes(small_eco_pvt, tmp_path_factory, data: bytes) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("fuzz") / "ckpt.pth"
    path.write_bytes(data)
    with pytest.raises(EvError, match=re.escape(str(path))):
        ecoformer.load_official_checkpoint(small_eco_pvt, path)


_KEYS = st.sampled_from(
    [
        "block1.0.attn.to_qk.weight",
        "block1.0.attn.fast_attention.ksh.mvec",
        "block1.0.attn.fast_attention.ksh.anchor",
        "block1.0.attn.fast_attention.ksh.A",
        "block4.0.attn.qkv.weight",
        "patch_embed1.proj.weight",
        "norm1.weight",
        "head.bias",
        "block9.0.attn.x",
    ]
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    state=st.dictionaries(
        _KEYS,
        st.lists(st.integers(1, 7), min_size=1, max_size=4).map(lambda s: torch.zeros(*s)),
        max_size=5,
    )
)
def test_fuzz_checkpoint_structure(small_eco_pvt, tmp_path_factory, state) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("fuzz") / "ckpt.pth"
    torch.save({"model": state}, path)
    with pytest.raises(EvError, match=re.escape(str(path))):  # never a bare RuntimeError
        ecoformer.load_official_checkpoint(small_eco_pvt, path)
