"""SPViT search (CPU, tiny ViT, small data), resume, CLI, demo and the exported-file parser."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from ev_compress import spvit

KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=10)


def tiny_vit(theta: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spvit.convert(model, theta=theta, model_name="deit_tiny_patch16_224", model_kwargs=KW)
    return model


def loader(n: int = 256, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long() + 2 * (x[:, 1].mean(dim=(1, 2)) > 0).long()
    return DataLoader(
        TensorDataset(x, y), batch_size=batch, shuffle=True, generator=torch.Generator()
    )


def config(**kw: object) -> spvit.SearchConfig:
    base = dict(
        flops_lambda=None,
        arch_lr=0.02,
        lr=1e-3,
        epochs=6,
        schedule="cosine",
        device="cpu",
        amp="off",
        log_every=8,
    )
    base.update(kw)
    return spvit.SearchConfig(**base)  # type: ignore[arg-type]


def test_search_reaches_flops_target_within_5_percent(tmp_path, monkeypatch):
    monkeypatch.setenv("EV_QUIET", "1")
    model = tiny_vit()
    original = float(spvit.model_gflops(model, differentiable=False))
    target = 0.6 * original
    result = spvit.search(model, loader(), target, config=config(), out_dir=tmp_path / "run")
    assert result.steps == 96
    assert abs(result.gflops - target) / target < 0.05
    assert result.gflops == pytest.approx(float(spvit.model_gflops(model, differentiable=False)))
    assert len(result.history) == 96 and result.history[0]["gflops"] == pytest.approx(original)
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "flops_loss", "gflops"} <= set(lines[0])
    small = spvit.export(model)
    assert small.spvit_arch["macs"] / 1e9 == pytest.approx(result.gflops)


def test_search_resumes_bit_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("EV_QUIET", "1")
    cfg = config(epochs=1, schedule="constant", max_steps=6, checkpoint_every=3)
    full = tiny_vit()
    spvit.search(full, loader(96), 0.0004, config=cfg, out_dir=tmp_path / "a")
    part = tiny_vit()
    first = spvit.search(
        part, loader(96), 0.0004, config=config(**{**vars(cfg), "max_steps": 3}),
        out_dir=tmp_path / "b",
    )  # fmt: skip
    assert first.steps == 3
    resumed = tiny_vit()  # a fresh process would rebuild the model the same way
    result = spvit.search(resumed, loader(96), 0.0004, config=cfg, out_dir=tmp_path / "b")
    assert result.steps == 6 and len(result.history) == 6
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_search_rejects_bad_targets():
    model = tiny_vit()
    with pytest.raises(spvit.SPViTArchError, match="positive"):
        spvit.search(model, loader(), -1.0)
    with pytest.raises(spvit.SPViTArchError, match="unsearchable"):
        spvit.search(model, loader(), 1e-9)
    with pytest.raises(spvit.SPViTArchError, match="converted"):
        spvit.search(torch.nn.Linear(2, 2), loader(), 1.0)


def test_param_groups_put_thresholds_apart():
    from ev_compress.spvit.search import param_groups

    groups = param_groups(tiny_vit(), spvit.SearchConfig(arch_lr=0.1, weight_decay=0.05))
    gates = groups[2]
    assert gates["weight_decay"] == 0.0 and gates["lr"] == 0.1
    assert len(gates["params"]) == 4  # 2 blocks × (kernel_thresholds, ffn_thresholds)
    assert all(p.ndim >= 2 for p in groups[0]["params"])


def _image_folder(root: Path) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(6):
            arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


def test_cli_search_then_export(tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from ev_compress.spvit.cli import register
    from ev_core.cli import make_package_app

    monkeypatch.setenv("EV_QUIET", "1")
    app = make_package_app("ev-compress", "test")
    register(app)
    data = _image_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    args = ["spvit-search", "deit_tiny_patch16_224", "--data", str(data), "--target-gflops",
            "0.0004", "--img-size", "32", "--out", str(run), "--max-steps", "4", "--batch-size",
            "6", "--epochs", "2", "--device", "cpu"]  # fmt: skip
    for kv in ("patch_size=8", "depth=2", "embed_dim=32", "num_heads=2"):
        args += ["--model-kwarg", kv]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "search_result.json").read_text())
    assert summary["steps"] == 4 and summary["ffn_total"] == [128, 128]
    out = tmp_path / "small.safetensors"
    res = CliRunner().invoke(app, ["spvit-export", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    model = spvit.load_exported(out)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    res = CliRunner().invoke(app, ["spvit-export", str(tmp_path / "nope")])
    assert res.exit_code != 0 and isinstance(res.exception, spvit.SPViTArchError)
    assert "nope" in str(res.exception)
    assert isinstance(app, typer.Typer)


@pytest.fixture(scope="module")
def exported_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_vit()
    spvit.force_choice(model, ["conv3x3", "skip"], ffn="all")
    folder = tmp_path_factory.mktemp("exported")
    return spvit.save_exported(spvit.export(model), folder / "m.safetensors")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mutation=st.sampled_from(["config", "blocks", "entry", "raw"]),
    value=_json,
    raw=st.binary(max_size=40),
)
def test_load_exported_fuzz(exported_file, tmp_path_factory, mutation, value, raw):
    """Any damaged architecture JSON loads or raises SPViTArchError naming the file."""
    info = json.loads(exported_file.with_suffix(".json").read_text())
    folder = tmp_path_factory.mktemp("fuzz")
    target = folder / "m.safetensors"
    target.write_bytes(exported_file.read_bytes())
    if mutation == "config":
        info["config"] = value
    elif mutation == "blocks":
        info["config"]["blocks"] = value
    elif mutation == "entry":
        info["config"]["blocks"][0] = value
    if mutation == "raw":
        target.with_suffix(".json").write_bytes(raw)
    else:
        target.with_suffix(".json").write_text(json.dumps(info))
    try:
        spvit.load_exported(target)
    except spvit.SPViTArchError as exc:
        message = str(exc)
    else:
        return
    assert str(target) in message


def test_demo_section_quick(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("EV_QUIET", "1")
    from ev_compress.spvit.demo import run_demo_section

    metrics = run_demo_section(tmp_path, quick=True)
    assert (tmp_path / "spvit_metrics.json").is_file()
    assert metrics["exported_gflops_measured"] == pytest.approx(metrics["exported_gflops"])
    assert metrics["exported_gflops"] < metrics["original_gflops"]
    assert metrics["exported_params"] < metrics["original_params"]
