"""ev-video CLI: synth, detect errors (one line, exit 2), package basics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from ev_testing import check_package_basics
from ev_video.cli import app

runner = CliRunner()


def test_package_basics() -> None:
    check_package_basics("ev-video", "ev_video", "video")


def test_synth_command(tmp_path: Path) -> None:
    res = runner.invoke(app, ["synth", str(tmp_path / "d"), "--num-videos", "2", "--frames", "24",
                              "--height", "32", "--width", "32", "--num-classes", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "d" / "videos").glob("*.mp4"))) == 2
    assert (tmp_path / "d" / "annotations.json").is_file()
    bad = runner.invoke(app, ["synth", str(tmp_path / "e"), "--height", "15"])
    assert bad.exit_code != 0


def test_detect_missing_video_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from ev_video.cli import main; main()", "detect", str(tmp_path / "nope.mp4"),
         "--detector", str(tmp_path / "none.safetensors")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "none.safetensors" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_eval_and_detect_commands(synthetic_root: Path, tmp_path: Path) -> None:
    import json

    import torch

    from ev_video.inference import ClipConfig, save_detector
    from ev_video.models import create

    torch.manual_seed(0)
    det = save_detector(
        tmp_path / "det.safetensors",
        create("stpt_tiny", num_classes=4),
        ["Bounce", "Pulse", "Slide", "Spin"],
        ClipConfig(clip_len=32),
    )
    res = runner.invoke(
        app, ["eval", str(det), "--data-root", str(synthetic_root), "-o", str(tmp_path / "m.json")]
    )
    assert res.exit_code == 0, res.output
    assert "mAP@0.5=" in res.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (
        set(metrics) == {"metrics", "notes", "predictions"}
        and metrics["metrics"]["tiou_thresholds"][0] == 0.3
    )
    video = sorted((synthetic_root / "videos").glob("*.mp4"))[0]
    res = runner.invoke(
        app,
        [
            "detect",
            str(video),
            "--detector",
            str(det),
            "--min-score",
            "0",
            "-o",
            str(tmp_path / "s.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    segs = json.loads((tmp_path / "s.json").read_text())
    assert segs and all(0 <= s["t_start"] <= s["t_end"] <= 12.0 for s in segs)
