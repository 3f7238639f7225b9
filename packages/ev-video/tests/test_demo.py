"""The quick demo runs end to end and writes its metrics, predictions and figure."""

from __future__ import annotations

import json
from pathlib import Path

from ev_video.demo import run_demo


def test_quick_demo(tmp_path: Path) -> None:
    metrics = run_demo(tmp_path, quick=True)
    for name in ("metrics.json", "config.json", "predictions.json", "timeline.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == metrics["steps"] == 40
    assert saved["map@0.5_trained"] > saved["map@0.5_untrained"]
    assert (tmp_path / "run" / "detector.safetensors").is_file()
