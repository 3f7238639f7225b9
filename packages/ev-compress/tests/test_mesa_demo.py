"""The ev-compress demo and the ``mesa-summary`` command."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from ev_compress.cli import app
from ev_compress.demo import run_demo


def test_demo_training_tracks_baseline(tmp_path: Path) -> None:
    """A short training run of a tiny ViT with Mesa follows the full-precision loss curve."""
    metrics = run_demo(tmp_path, quick=True)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["saved_bytes_mesa"] == metrics["saved_bytes_mesa"]
    assert metrics["saved_ratio"] < 0.3
    assert len(metrics["loss_mesa"]) == len(metrics["loss_baseline"]) == 12
    base, ours = metrics["loss_baseline"], metrics["loss_mesa"]
    assert sum(ours[-4:]) < 0.8 * sum(ours[:4])  # it learns
    assert all(abs(o - b) <= 0.1 * b + 0.02 for o, b in zip(ours, base, strict=True)), (base, ours)
    assert (tmp_path / "mesa_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "config.json").exists()


def test_mesa_summary_command() -> None:
    result = CliRunner().invoke(
        app,
        ["mesa-summary", "vit_tiny_patch16_224", "--img-size", "32", "--exclude", "head"],
    )
    assert result.exit_code == 0, result.output
    assert "blocks.0.attn | sdpa0 | q" in result.output
    assert "| head |" not in result.output
    assert "expected saving" in result.output
