"""The demo checks matplotlib first and, without it, still writes its metrics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ev_reid import demo


def test_quick_demo_without_matplotlib_writes_metrics(tmp_path: Path, monkeypatch, capsys) -> None:
    real_find_spec = importlib.util.find_spec

    def no_matplotlib(name: str, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_matplotlib)
    metrics = demo.run_demo(tmp_path, quick=True)
    out = capsys.readouterr().out
    assert out.index("ranked_lists.png will be skipped") < out.index("Market protocol")  # first
    assert "figure skipped: ranked_lists.png" in out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["figures"] == [] and not (tmp_path / "ranked_lists.png").exists()
    assert saved["skipped_figures"][0]["figure"] == "ranked_lists.png"
    assert 0.0 <= saved["mAP"] <= 1.0 and saved["mode"] == "quick"
    assert metrics["num_valid_queries"] > 0


def test_demo_modes_grow() -> None:
    # the default must stay small (≤ ~45 s on 2 idle cores); the bigger run is behind --full
    def work(s: demo.DemoSizes) -> int:
        r = s.recipe
        return s.num_ids * s.images_per_id * (r.pretrain_epochs + r.finetune_epochs)

    assert work(demo.QUICK) < work(demo.DEFAULT) < work(demo.FULL)
    with pytest.raises(TypeError):
        demo.run_demo(Path("unused"))  # type: ignore[call-arg]  (quick is required)
