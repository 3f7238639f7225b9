"""SIGKILL mid-run, then resume: the final weights and evaluations equal an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("sklearn", reason="the digits shift needs scikit-learn (ev-adapt[digits])")

SCRIPT = Path(__file__).with_name("_adapt_kill_script.py")


def _run(out: Path, kill_after: int = 0) -> int:
    env = {**os.environ, "EV_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), str(out)] + ([str(kill_after)] if kill_after else [])
    return subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    assert _run(tmp_path / "full") == 0
    # killed at step 13: after epoch 1's checkpoint (step 8) and its evaluation, mid-epoch 2
    assert _run(tmp_path / "split", kill_after=13) == -9
    assert not (tmp_path / "split" / "model.safetensors").exists()
    assert _run(tmp_path / "split") == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "full" / name))
        b = load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    split = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert split["evaluations"] == full["evaluations"]
    assert [e["step"] for e in full["evaluations"]] == [8.0, 16.0, 20.0]
