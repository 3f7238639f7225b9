"""The EcoFormer section of ``ev demo``."""

from __future__ import annotations

import json
from pathlib import Path

from ev_compress.ecoformer.demo import run_demo_section


def test_demo_section_writes_metrics_and_figure(tmp_path: Path) -> None:
    metrics = run_demo_section(tmp_path, quick=True)
    on_disk = json.loads((tmp_path / "ecoformer.json").read_text())
    assert on_disk["energy_pvt_v2_b0"] == metrics["energy_pvt_v2_b0"]
    eco = metrics["energy_pvt_v2_b0"]["EcoFormer"]
    # the paper: 0.54 B mul / 0.56 B add / 2.5 B pJ, −73 % energy against MSA without SR
    assert abs(eco["mul_B"] / 0.54 - 1) < 0.1 and abs(eco["add_B"] / 0.56 - 1) < 0.1
    assert 0.65 < metrics["energy_saving_vs_msa"] < 0.8
    assert len(metrics["scaling"]["ecoformer_ms"]) == len(metrics["scaling"]["tokens"]) == 3
    assert all(t > 0 for t in metrics["scaling"]["sdpa_ms"])
    assert (tmp_path / "ecoformer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["files"] == ["ecoformer.json", "ecoformer.png"]
