"""Per-layer Mesa policies: rules by module pattern / call index / op kind, files (JSON, YAML,
the official Mesa text format), the registry as the single list of op kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ev_compress import mesa
from ev_compress.mesa.ops import HANDLERS, HOOKED, REGISTRY
from ev_core.errors import EvError


def tiny_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
    )


def test_registry_is_the_single_source_of_op_kinds() -> None:
    assert list(mesa.OP_KINDS) == [k.name for k in REGISTRY]
    assert {kind for kind, _ in HANDLERS.values()} <= set(mesa.OP_KINDS)
    assert set(HOOKED.values()) <= set(mesa.OP_KINDS)
    assert mesa.MesaPolicy().ops == tuple(mesa.OP_KINDS)
    for kind in ("einsum", "mul", "rms_norm", "dropout", "max_pool", "avg_pool", "function"):
        assert kind in mesa.OP_KINDS


def test_default_policy_matches_the_readme_and_summary() -> None:
    policy = mesa.MesaPolicy()
    assert policy.exclude == ("patch_embed*",)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert 'exclude=("patch_embed*",)' in readme
    assert "exclude=['patch_embed*']" in str(mesa.summary(mesa.convert(tiny_vit())))


def test_rules_by_name_index_and_kind() -> None:
    policy = mesa.MesaPolicy(
        rules=(
            mesa.LayerRule(modules=("blocks.1.*",), bits=4, momentum=0.5),
            mesa.LayerRule(ops=("gelu",), indices=(0,), enable=False),
            mesa.LayerRule(modules=("head",), ops=("linear",), groups=2),
        )
    )
    model = mesa.convert(tiny_vit(), policy)
    x = torch.randn(4, 3, 32, 32)
    model(x).sum().backward()
    s = mesa.summary(model)
    slots = {(r.module, r.slot, r.operand): r for r in s.slots}
    assert ("blocks.0.mlp.act", "gelu0", "input") not in slots  # first gelu call: disabled
    assert ("blocks.1.mlp.act", "gelu0", "input") in slots
    assert slots[("head", "linear0", "input")].groups == 2
    assert policy.settings("blocks.1.mlp.fc1", "linear", 5).bits == 4
    assert policy.settings("blocks.0.mlp.fc1", "linear", 1).bits == 8
    assert policy.settings("blocks.1.norm1", "layer_norm", 2).momentum == 0.5
    assert any(r.reason == "disabled by the policy" for r in s.full_precision) or any(
        r.module == "blocks.0.mlp.act" for r in s.full_precision
    )
    # 4-bit codes in blocks.1: a 4-bit code never exceeds 15 (checked through the quantiser)
    q = mesa.quantize(torch.randn(64, 8), mesa.make_layout((64, 8), "channels"), bits=4)
    assert int(q.data.max()) <= 15
    with pytest.raises(ValueError, match="unknown op"):
        mesa.LayerRule(ops=("lstm",))
    with pytest.raises(ValueError, match="bits"):
        mesa.LayerRule(bits=9)


def test_rules_enable_a_kind_the_defaults_leave_off() -> None:
    policy = mesa.MesaPolicy(ops=(), rules=(mesa.LayerRule(ops=("linear",), enable=True),))
    model = mesa.convert(tiny_vit(), policy)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert mesa.summary(model).counts() == {"linear": 9}


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_policy_files_round_trip(tmp_path: Path, suffix: str) -> None:
    policy = mesa.MesaPolicy(
        exclude=("head",),
        momentum=0.8,
        rules=(mesa.LayerRule(modules=("blocks.0.*",), ops=("softmax",), indices=(1, 2), bits=6),),
    )
    path = tmp_path / f"policy{suffix}"
    if suffix == ".json":
        policy.save(path)
    else:
        yaml = pytest.importorskip("yaml", reason="YAML policies need the yaml extra (PyYAML)")
        path.write_text(yaml.safe_dump(policy.to_dict()))
    assert mesa.load_policy(path) == policy
    assert json.loads(json.dumps(policy.to_dict())) == policy.to_dict()


OFFICIAL = """\
# DeiT policy in the official Mesa format
on gelu:
    by_index: all
    enable: True
    level: 256
    ema_decay: 0.9

on fc:
    by_index: all
    enable: True
    level: 256
    ema_decay: 0.9
    by_index: 0 1
    enable: False

on layernorm:
    by_index: all
    enable: True
    level: 16
"""


def test_official_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.txt"
    path.write_text(OFFICIAL)
    policy = mesa.load_policy(path)
    assert policy.ops == ()  # official files start from nothing compressed
    assert policy.settings("blocks.0.mlp.act", "gelu", 3) == mesa.OpSettings(True, 8, 8, None, 0.9)
    assert not policy.settings("blocks.0.attn.qkv", "linear", 0).enabled
    assert not policy.settings("blocks.0.attn.proj", "linear", 1).enabled
    assert policy.settings("blocks.0.mlp.fc1", "linear", 2).enabled
    assert policy.settings("norm", "layer_norm", 4).bits == 4
    assert not policy.settings("blocks.0.attn", "softmax", 0).enabled
    model = mesa.convert(tiny_vit(), policy)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    counts = mesa.summary(model).counts()
    assert counts == {"gelu": 2, "linear": 7, "layer_norm": 5}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("on lstm:\n  by_index: all\n  enable: True\n", "unknown section"),
        ("by_index: all\n", "before any"),
        ("on fc:\n  enable: True\n", "outside"),
        ("on fc:\n  by_index: all\n  level: 100\n", "power of two"),
        ("on fc:\n  by_index: all\n  colour: red\n", "unknown key"),
        ("on fc:\n  by_index: x y\n  enable: True\n", "invalid literal"),
    ],
)
def test_bad_policy_files_name_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(EvError, match=match) as info:
        mesa.load_policy(path)
    assert str(path) in str(info.value)
    with pytest.raises(EvError, match="cannot read"):
        mesa.load_policy(tmp_path / "missing.json")
    (tmp_path / "p.json").write_text('{"bits": 12}')
    with pytest.raises(EvError, match="bits"):
        mesa.load_policy(tmp_path / "p.json")


_LINES = st.sampled_from(
    [
        "on fc:",
        "on gelu:",
        "on nope:",
        "by_index: all",
        "by_index: 0 2",
        "by_index: -",
        "enable: True",
        "enable: maybe",
        "level: 256",
        "level: 0",
        "ema_decay: 0.5",
        "ema_decay: 7",
        "quant_groups: 0",
        "# comment",
        "",
        ":",
        "garbage",
    ]
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(st.one_of(_LINES, st.text(max_size=20)), max_size=12),
    suffix=st.sampled_from([".txt", ".json", ".yaml"]),
)
def test_fuzzed_policy_files_parse_or_raise_our_error(
    tmp_path: Path, lines: list[str], suffix: str
) -> None:
    path = tmp_path / f"fuzz{suffix}"
    try:
        path.write_text("\n".join(lines), encoding="utf-8")
    except UnicodeEncodeError:
        return
    try:
        policy = mesa.load_policy(path)
    except EvError as exc:
        assert str(path) in str(exc)  # noqa: PT017  (parses or raises: both are fine)
    else:
        assert isinstance(policy, mesa.MesaPolicy)
