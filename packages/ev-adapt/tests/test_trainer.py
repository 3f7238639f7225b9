"""The trainer: resume equals an uninterrupted run; MCL beats source-only on the digits shift."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ev_adapt import AdaptConfig, AdaptModelConfig, build_model, train_adaptation
from ev_adapt.data import digits_shift
from ev_core.errors import EvError

pytest.importorskip("sklearn", reason="the digits shift needs scikit-learn (ev-adapt[digits])")

MODEL = AdaptModelConfig(backbone="digits_cnn", num_classes=10, bottleneck_dim=32, in_chans=1)


def _config(method: str, steps: int = 24, **kw: object) -> AdaptConfig:
    small = {
        "source_batch": 8,
        "target_batch": 8,
        "unlabeled_batch": 16,
        "ot_start": 6,
        "proto_warmup": 2,
    }
    return AdaptConfig.preset(
        "digits", method=method, steps=steps, eval_every=8, device="cpu", **{**small, **kw}
    )


@pytest.mark.parametrize("method", ["mcl", "mme"])
def test_resume_equals_uninterrupted(tmp_path: Path, method: str) -> None:
    data = digits_shift(seed=0, shots=1)
    torch.manual_seed(0)
    full = train_adaptation(data, build_model(MODEL), _config(method), tmp_path / "full", MODEL)
    torch.manual_seed(0)
    stopped = train_adaptation(
        data, build_model(MODEL), _config(method), tmp_path / "split", MODEL, stop_at_step=13
    )
    assert stopped.final["step"] == 8.0  # only the first evaluation happened
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = train_adaptation(data, build_model(MODEL), _config(method), tmp_path / "split", MODEL)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "full" / name))
        b = load_file(str(tmp_path / "split" / name))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert resumed.evaluations == full.evaluations


def test_mcl_adapts_on_digits_shift(tmp_path: Path) -> None:
    """MCL trains to well above chance on the target domain and stays level with source-only.

    Not "MCL beats source-only": over 5 seeds it does not at this toy scale (BENCHMARKS.md:
    EMA test accuracy 49.1 ± 6.6 vs 51.9 ± 3.7 at 3 shots). Seed 0 gave MCL +5 points on one
    machine (AMD) and +2.3 on another (Intel with AMX: 51.6 vs 49.3; oneDNN's kernels differ, so
    the trajectories do), so a gain is not asserted. A broken MCL term (wrong sign, pseudo-labels
    from the wrong view, a collapsed assignment) drops the accuracy far below source-only.
    """
    data = digits_shift(seed=0, shots=3)
    acc = {}
    for method in ("source_only", "mcl"):
        torch.manual_seed(0)
        config = AdaptConfig.preset(
            "digits", method=method, steps=300, eval_every=100, device="cpu"
        )
        acc[method] = train_adaptation(data, build_model(MODEL), config, None, MODEL).final[
            "ema_test_acc"
        ]
    assert acc["mcl"] > 40.0, acc  # chance: 10 %
    assert acc["mcl"] > acc["source_only"] - 5.0, acc


def test_model_shapes_and_errors() -> None:
    model = build_model(MODEL)
    logits, feats = model(torch.rand(5, 1, 16, 16))
    assert logits.shape == (5, 10) and feats.shape == (5, 32)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(logits, model.fc2(feats) / 0.05)
    with pytest.raises(EvError, match="not a timm or ev model"):
        build_model(AdaptModelConfig(backbone="no_such_net", num_classes=3))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from ev_adapt.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "EV_QUIET": "1"},
    )


def test_cli_train_eval_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _cli(
        "train",
        "--out",
        str(out),
        "--method",
        "fixmatch",
        "--steps",
        "8",
        "--shots",
        "1",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["step"] == 8.0
    assert json.loads((out / "config.json").read_text())["config"]["run"]["method"] == "fixmatch"
    evaluated = _cli("eval", str(out / "ema.safetensors"), "--shots", "1")
    assert evaluated.returncode == 0, evaluated.stderr
    assert set(json.loads(evaluated.stdout)) == {"validation", "test"}
    missing = _cli("eval", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "nope.safetensors" in missing.stderr
    no_lists = _cli("train", "--out", str(tmp_path / "x"), "--benchmark", "office_home")
    assert no_lists.returncode == 2 and "--list-dir" in no_lists.stderr


def _ddp_worker(rank: int, world_size: int, out: str) -> None:
    from ev_adapt.data import SSDABatches

    data = digits_shift(seed=0, shots=1)
    batches = SSDABatches(data, steps=2, source_batch=4, target_batch=4, unlabeled_batch=4)
    batches.generator.manual_seed(0)
    first = next(iter(batches))
    torch.manual_seed(0)
    model = build_model(MODEL)
    result = train_adaptation(data, model, _config("mcl", steps=8), None, MODEL)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    torch.save(
        {"first_source": first.source, "params": params, "final": result.final}, f"{out}.{rank}"
    )


def test_ddp_two_processes(tmp_path: Path) -> None:
    from ev_testing import run_distributed

    out = str(tmp_path / "ddp")
    run_distributed(_ddp_worker, out, world_size=2)
    r0, r1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["first_source"], r1["first_source"])  # each rank its own images
    for key, value in r0["params"].items():  # DDP keeps the replicas' weights identical
        assert torch.equal(value, r1["params"][key]), key
    assert r0["final"]["step"] == r1["final"]["step"] == 8.0
