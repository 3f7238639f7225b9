"""``ev-reid train`` killed with SIGKILL inside a checkpoint write, then ``--resume``.

Each kill point is one the issue found on the old ``last.*`` file trio: while the weights'
temporary file is being written, after the weights but before the training state, and after the
step folder is complete but before the ``latest`` pointer moved. The resumed run must start from
the newest complete checkpoint, clean the leftovers and end with the same weights as a run that
was never interrupted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ev_core.training import CheckpointManager
from ev_reid.datasets import generate_synthetic_market

TINY_KW = '{"channels": [8, 16, 16, 32], "stem_width": 8}'
KILL_STEP = 4  # end of epoch 2 of 3 (2 steps per epoch)

# the child: patch a writer so that the process SIGKILLs itself at the chosen point, then run
# the real console script
_CHILD = r"""
import os, signal, sys
from pathlib import Path

mode, tag = os.environ["KILL_MODE"], "step-%08d" % int(os.environ["KILL_STEP"])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "weights-tmp":  # half-way through the weights' temporary file
    import ev_core.checkpoint as ck
    original = ck.save_file
    def save_file(tensors, filename, *args, **kwargs):
        if tag in filename:
            Path(filename).write_bytes(b"\0" * 4096)
            die()
        return original(tensors, filename, *args, **kwargs)
    ck.save_file = save_file
elif mode == "before-state":  # weights and JSON written, training state not
    import ev_core.training.engine as engine
    original = engine.save_training_state
    def save_training_state(path, state):
        if tag in str(path):
            die()
        return original(path, state)
    engine.save_training_state = save_training_state
elif mode == "before-pointer":  # folder complete and in place, `latest` still the old one
    import ev_core.training.checkpoints as checkpoints
    original = checkpoints.atomic_write
    def atomic_write(path, write):
        if Path(path).name == "latest" and (Path(path).parent / tag).is_dir():
            die()
        return original(path, write)
    checkpoints.atomic_write = atomic_write

from ev_reid.cli import main
sys.argv = ["ev-reid", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_market(
        tmp_path_factory.mktemp("syn") / "market",
        num_ids=8,
        images_per_id=6,
        num_cameras=2,
        image_size=(64, 32),
        seed=0,
    )


def _train(
    out: Path, data: Path, kill: str = "none", *extra: str
) -> subprocess.CompletedProcess[str]:
    args = [
        "--quiet", "train", "--out", str(out), "--data-root", str(data),
        "--backbone", "resnet18", "--backbone-kwargs", TINY_KW, "--height", "64", "--width", "32",
        "--num-workers", "0", "--device", "cpu", "-P", "4", "-K", "2", "--epochs", "3",
        "--max-steps-per-epoch", "2", "--warmup-epochs", "1", "--lr", "0.01", "--eval-every", "0",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "KILL_MODE": kill, "KILL_STEP": str(KILL_STEP), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def uninterrupted(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("full")
    proc = _train(out, data)
    assert proc.returncode == 0, proc.stderr
    return load_file(str(out / "model.safetensors"))


def _leftovers(ckpts: Path) -> list[str]:
    return sorted(
        p.name
        for p in ckpts.iterdir()
        if p.name.endswith((".partial", ".tmp", ".trash")) or p.name.startswith(".")
    )


@pytest.mark.parametrize("kill", ["weights-tmp", "before-state", "before-pointer"])
def test_kill_during_checkpoint_write_then_resume_equals_uninterrupted(
    data: Path, tmp_path: Path, kill: str, uninterrupted: dict[str, torch.Tensor]
) -> None:
    proc = _train(tmp_path, data, kill)
    assert proc.returncode == -9, proc.stderr
    ckpts = tmp_path / "checkpoints"
    newest = CheckpointManager(ckpts).latest()
    assert newest is not None
    if kill == "before-pointer":  # the complete step-4 folder is found although `latest` lags
        assert (ckpts / "latest").read_text().strip() == "step-00000002"
        assert newest.name == "step-00000004"
    else:
        assert newest.name == "step-00000002" and _leftovers(ckpts)
    assert not (tmp_path / "model.safetensors").exists()

    proc = _train(tmp_path, data, "none", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert _leftovers(ckpts) == []
    assert (ckpts / "latest").read_text().strip() == "step-00000006"
    final = load_file(str(tmp_path / "model.safetensors"))
    assert final.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(final[key], value), key
