"""Benchmark harness and the umbrella `ev` command."""

import json
import math
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ev_core.benchmark import BenchmarkSuite, measure_peak_memory
from ev_core.cli import app, core_app


def test_suite_ratios_against_baseline(tmp_path: Path) -> None:
    # sleeps long against scheduler wake-up latency (~10 ms on a loaded 2-core machine)
    suite = BenchmarkSuite("unit", min_run_time=0.1, warmup=1)
    slow = suite.add("slow", lambda: time.sleep(0.06), group="g", baseline=True)
    fast = suite.add("fast", lambda: time.sleep(0.006), group="g", items_per_call=10)
    assert slow.ratio_vs_baseline == pytest.approx(1.0)
    assert fast.ratio_vs_baseline is not None and fast.ratio_vs_baseline > 1.5
    assert fast.throughput == pytest.approx(10 / (fast.median_ms / 1e3))
    with pytest.raises(ValueError, match="baseline"):
        suite.add("again", lambda: None, group="g", baseline=True)
    suite.add_failure("oom", "g", "out of memory")
    table = suite.table()
    assert "slow (baseline)" in table and "failed: out of memory" in table
    data = json.loads(suite.write_json(tmp_path / "r.json").read_text())
    assert data["metadata"]["torch"]
    assert {"git_sha", "device", "num_threads"} <= data["metadata"].keys()
    assert [r["name"] for r in data["rows"]] == ["slow", "fast", "oom"]
    assert math.isnan(data["rows"][2]["median_ms"])


def test_peak_memory_sees_a_large_allocation() -> None:
    import numpy as np

    def alloc() -> None:
        a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        time.sleep(0.02)
        del a

    assert measure_peak_memory(alloc) > 40


def test_ev_demo_reports_packages_without_demo(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--only", "core", "--quick"])
    assert result.exit_code in (0, 1), result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"ran", "no_demo_yet", "failed"}
    assert "ev-core" in {*summary["ran"], *summary["no_demo_yet"], *summary["failed"]}
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--only", "nope"])
    assert result.exit_code != 0


def test_core_cli_version() -> None:
    result = CliRunner().invoke(core_app, ["version"])
    assert result.exit_code == 0
    assert result.output.startswith("ev-core ")
