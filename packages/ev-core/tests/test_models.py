"""LIT / LITv2 models: official test vectors, parameter counts, layouts, timm integration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ev_core  # noqa: F401  (registers the models with timm)
from ev_core.models import checkpoint_filter_fn
from ev_testing import assert_close

OFFICIAL_PARAMS = {
    "litv2_s": 27_844_000,
    "litv2_m": 48_830_368,
    "litv2_b": 86_520_704,
    "lit_ti": 19_886_272,
    "lit_s": 27_973_720,
    "lit_m": 49_372_264,
    "lit_b": 87_292_384,
}
VECTORS = {"litv2_s": "litv2_tiny", "lit_s": "lit_tiny", "lit_ti": "lit_ti_tiny"}
TINY: dict[str, dict[str, Any]] = {
    "litv2_s": dict(img_size=64, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                    alpha=0.5, local_ws=[0, 0, 2, 1], num_classes=10),
    "lit_s": dict(img_size=64, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8],
                  num_classes=10),
    "lit_ti": dict(img_size=64, embed_dims=[16, 32, 48, 64], num_heads=[1, 2, 3, 4],
                   depths=[1, 1, 2, 1], num_classes=10),
}  # fmt: skip


REFERENCE_DIR = Path(__file__).resolve().parent / "reference"  # provenance: reference/README.md


def reference_dir() -> Path:
    """The official test vectors and key layouts kept beside this file (``tests/reference``)."""
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference data folder {REFERENCE_DIR} is missing from the checkout")
    return REFERENCE_DIR


def load_vectors(name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = reference_dir() / f"vectors_{VECTORS[name]}.safetensors"
    if not path.is_file():
        pytest.fail(f"missing test vectors {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["mode"] == "eval"
    return json.loads(meta["config"]), load_file(str(path))


def official_layout(name: str) -> dict[str, tuple[int, ...]]:
    path = reference_dir() / f"keys_{name}.tsv"
    if not path.is_file():
        pytest.fail(f"missing key layout {path}")
    layout = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, _ = line.split("\t")
        layout[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return layout


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_official_vectors(name: str, tmp_path: Path) -> None:
    """Official weights (under ``model``, as released) load through timm's pretrained path and
    reproduce the official output."""
    config, tensors = load_vectors(name)
    state = {k[len("state.") :]: v for k, v in tensors.items() if k.startswith("state.")}
    ckpt = tmp_path / f"{name}.pth"
    torch.save({"model": state, "epoch": 299}, ckpt)
    overlay = dict(file=str(ckpt), num_classes=config["num_classes"])
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **config)
    with torch.no_grad():
        out = model.eval()(tensors["input"])
    assert_close(out, tensors["output"], atol=1e-4, rtol=0)
    # the torchvision reference DTM path gives the same logits
    for m in model.modules():
        if hasattr(m, "dconv"):
            m.path = "torchvision"
    with torch.no_grad():
        assert_close(model(tensors["input"]), tensors["output"], atol=1e-4, rtol=0)


def test_pretrained_plain_state_dict_and_filter(tmp_path: Path) -> None:
    """A bare state dict (DataParallel-prefixed) of a full-size layout loads via the filter."""
    torch.manual_seed(0)
    src = timm.create_model("litv2_s", **TINY["litv2_s"]).eval()
    ckpt = tmp_path / "litv2_s.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, ckpt)
    overlay = dict(file=str(ckpt), num_classes=10)
    dst = timm.create_model("litv2_s", pretrained=True, pretrained_cfg_overlay=overlay,
                            **TINY["litv2_s"]).eval()  # fmt: skip
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    lit = timm.create_model("lit_s", **TINY["lit_s"])
    sd = {k: torch.zeros_like(v) if k.endswith("relative_position_index") else v
          for k, v in lit.state_dict().items()}  # fmt: skip
    filtered = checkpoint_filter_fn({"model": sd}, lit)
    key = "layers.2.blocks.0.attn.relative_position_index"
    assert torch.equal(filtered[key], lit.state_dict()[key])


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_param_counts_and_state_dict_layout(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_layout(name)


@pytest.mark.parametrize("name", sorted(TINY))
def test_features_only(name: str) -> None:
    feats = timm.create_model(name, features_only=True, **TINY[name])
    chans = feats.feature_info.channels()
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    outs = feats(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [
        (2, c, 64 // r, 64 // r) for c, r in zip(chans, (4, 8, 16, 32), strict=True)
    ]
    sub = timm.create_model(name, features_only=True, out_indices=(1, 2), **TINY[name])
    assert [o.shape[1] for o in sub(torch.randn(1, 3, 64, 64))] == chans[1:3]


def test_litv2_any_input_size() -> None:
    model = timm.create_model("litv2_s", **TINY["litv2_s"]).eval()
    for h, w in ((61, 77), (40, 96)):
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            feats = model.forward_intermediates(x, intermediates_only=True)
            assert model(x).shape == (1, 10)
        hp, wp = -(-h // 4), -(-w // 4)
        sizes = [(hp, wp)]
        for _ in range(3):
            sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
        assert [tuple(f.shape[2:]) for f in feats] == sizes
    with pytest.raises(ValueError, match="resolution-locked"):
        timm.create_model("lit_s", **TINY["lit_s"])(torch.randn(1, 3, 96, 96))


def test_lit_ti_any_input_size() -> None:
    """LIT-Ti at another size = LIT-Ti built for that size with bicubically resampled position
    embeddings (timm's ``dynamic_img_size``); at its own size nothing is resampled."""
    torch.manual_seed(0)
    small = timm.create_model("lit_ti", **TINY["lit_ti"]).eval()
    big = timm.create_model("lit_ti", **{**TINY["lit_ti"], "img_size": 96}).eval()
    state = small.state_dict()
    for i, (gh, gw) in enumerate(small.resolutions):
        pos = state[f"pos_embed{i + 1}"].double()
        prefix = 1 if i == 3 else 0
        grid = pos[:, prefix:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        th, tw = big.resolutions[i]
        grid = torch.nn.functional.interpolate(grid, size=(th, tw), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, th * tw, -1)
        state[f"pos_embed{i + 1}"] = torch.cat((pos[:, :prefix], grid), 1).float()
    big.load_state_dict(state)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert_close(small(x), big(x), atol=1e-5, rtol=1e-5)
        for h, w in ((61, 77), (40, 96)):
            feats = small.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
            hp, wp = -(-h // 4), -(-w // 4)
            sizes = [(hp >> i, wp >> i) for i in range(4)]
            assert [tuple(f.shape[2:]) for f in feats] == sizes


@pytest.mark.parametrize("name", sorted(TINY))
def test_timm_api_and_grad_checkpointing(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0, **TINY[name])
    x = torch.randn(2, 3, 64, 64)
    model.train()
    model.zero_grad()
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.set_grad_checkpointing(True)
    model.zero_grad()
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert_close(p.grad, grads[n], msg=n)
    model.eval()
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_drop_path_is_stochastic_in_training_only() -> None:
    model = timm.create_model("litv2_s", drop_path_rate=0.5, **TINY["litv2_s"])
    x = torch.randn(2, 3, 64, 64)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_compile_fullgraph_has_no_graph_breaks() -> None:
    """Dynamo traces the whole LITv2 forward as one graph (``fullgraph=True`` raises on any
    break); the ``eager`` backend skips code generation to keep this test fast."""
    torch._dynamo.reset()
    model = timm.create_model("litv2_s", **{**TINY["litv2_s"], "depths": [1, 1, 1, 1]}).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(compiled(x), model(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_compile_fullgraph_forward_backward(name: str) -> None:
    """All three families trace forward + backward without graph breaks (``aot_eager``)."""
    torch._dynamo.reset()
    model = timm.create_model(name, **TINY[name]).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(compiled(x), model(x))
    model.train()
    compiled(x).sum().backward()
    assert model.head.weight.grad is not None


@pytest.mark.parametrize("name", sorted(TINY))
def test_config_is_the_single_source_and_backend_reaches_attention(name: str) -> None:
    """``create_model(name)`` builds the registered dataclass config; overrides land in
    ``model.cfg``; ``attn_backend`` reaches every attention layer (HiLo, relative-position MSA,
    MSA), settled at construction, and gives the same logits as the default backend."""
    from ev_core.layers import HiLo, MultiHeadSelfAttention
    from ev_core.registry import get_model_config

    with torch.device("meta"):
        default = timm.create_model(name)
    assert default.cfg == dataclasses.replace(get_model_config(name), img_size=default.cfg.img_size)
    torch.manual_seed(0)
    sdpa = timm.create_model(name, **TINY[name]).eval()
    torch.manual_seed(0)
    math = timm.create_model(name, attn_backend="math", **TINY[name]).eval()
    assert math.cfg.attn_backend == "math" and math.cfg.depths == tuple(TINY[name]["depths"])
    layers = [m for m in math.modules() if isinstance(m, HiLo | MultiHeadSelfAttention)]
    assert layers and {m.backend for m in layers} == {"math"}
    assert {m.backend for m in sdpa.modules() if isinstance(m, HiLo | MultiHeadSelfAttention)} == {
        "sdpa"
    }
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(math(x), sdpa(x))
    with pytest.raises(TypeError, match=r"has no option\(s\) embed_dimm"):
        timm.create_model(name, embed_dimm=8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        timm.create_model(name, attn_backend="flash3", **TINY[name])
