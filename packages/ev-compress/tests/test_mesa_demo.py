"""The Mesa demo (on ev_core.training.Engine) and the ``mesa-summary`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ev_compress.cli import app
from ev_compress.mesa.demo import FULL, QUICK, VARIANTS, MesaDemoConfig, run_demo_section


def test_demo_runs_track_the_baseline(tmp_path: Path) -> None:
    """EMA, both checkpointing modes and bf16 AMP under Mesa follow the fp32 loss curve."""
    pytest.importorskip("sklearn")
    metrics = run_demo_section(tmp_path, quick=True)  # QUICK: 1 epoch, width 48, depth 2
    assert set(metrics["runs"]) == set(VARIANTS)
    base = metrics["runs"]["full precision"]["loss"]
    assert len(base) == 12  # 1,437 training digits / 128
    for name, run in metrics["runs"].items():
        assert len(run["loss"]) == len(base)
        assert all(abs(o - b) <= 0.05 * b for o, b in zip(run["loss"], base, strict=True)), name
        if name != "full precision":
            assert run["mesa_estimates"] > 0
    assert sum(base[-3:]) < sum(base[:3])  # it learns (12 steps: a little)
    assert metrics["saved_ratio_fp32"] < 0.75 and metrics["saved_ratio_bf16"] < 0.8
    assert (tmp_path / "mesa_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((tmp_path / "mesa_config.json").read_text())
    assert config["demo"]["depth"] == QUICK.depth == 2
    assert config["policy"]["exclude"] == ["patch_embed*"]


def test_demo_sizes() -> None:
    """``ev demo`` passes ``full=True`` for ``--full``: the default is a 1-epoch width-96 run
    (the package's whole default demo fits ~45 s), ``--full`` the issue's 2-epoch run of a
    6-block width-192 model."""
    import inspect

    from ev_compress.demo import run_demo

    assert "full" in inspect.signature(run_demo).parameters
    assert "full" in inspect.signature(run_demo_section).parameters
    default = MesaDemoConfig()
    assert (default.epochs, default.embed_dim, default.depth, default.img_size) == (1, 96, 4, 32)
    assert (FULL.epochs, FULL.embed_dim, FULL.depth, FULL.img_size) == (2, 192, 6, 32)


def test_mesa_summary_command(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["mesa-summary", "vit_tiny_patch16_224", "--img-size", "32", "--exclude", "head"]
    )
    assert result.exit_code == 0, result.output
    assert "blocks.0.attn | sdpa0 | q" in result.output
    assert "| head | linear0" not in result.output  # excluded: listed as full precision only
    assert "excluded by the policy" in result.output and "expected saving" in result.output
    assert "exclude=['head']" in result.output
    default = runner.invoke(app, ["mesa-summary", "vit_tiny_patch16_224", "--img-size", "32"])
    assert "exclude=['patch_embed*']" in default.output  # the README's default
    policy = tmp_path / "policy.txt"
    policy.write_text("on fc:\n  by_index: all\n  enable: True\n")
    only_fc = runner.invoke(
        app, ["mesa-summary", "vit_tiny_patch16_224", "--img-size", "32", "--policy", str(policy)]
    )
    assert only_fc.exit_code == 0 and "compressed calls: linear: 49" in only_fc.output
    policy.write_text("on fc:\n  colour: red\n")
    bad = runner.invoke(app, ["mesa-summary", "vit_tiny_patch16_224", "--policy", str(policy)])
    assert bad.exit_code != 0 and isinstance(bad.exception, Exception)
