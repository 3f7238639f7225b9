"""Checkpoints: safetensors + JSON round trip, atomic writes, safe torch.load."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from ev_core.checkpoint import (
    config_path_for,
    load_checkpoint,
    load_torch_file,
    save_checkpoint,
    save_training_state,
    unwrap_state_dict,
)
from ev_core.io import atomic_write


@dataclass
class TinyConfig:
    width: int = 4
    depths: tuple[int, ...] = (1, 2)
    out: Path = Path("runs/x")


def test_round_trip_with_config_and_metadata(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    path = save_checkpoint(
        tmp_path / "m.safetensors", model.state_dict(), TinyConfig(), {"epoch": 3}
    )
    state, info = load_checkpoint(path)
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    assert info["config"] == {"width": 4, "depths": [1, 2], "out": "runs/x"}
    assert info["metadata"] == {"epoch": 3}
    assert config_path_for(path) == tmp_path / "m.json"


def test_tied_and_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    state = {"a": w, "b": w, "t": w.t()}  # shared storage, and a non-contiguous view
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "tied.safetensors", state))
    for key in state:
        assert torch.equal(loaded[key], state[key])


def test_rejects_wrong_suffix_and_non_tensors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_checkpoint(tmp_path / "m.pt", {"a": torch.ones(1)})
    with pytest.raises(TypeError, match="not a tensor"):
        save_checkpoint(tmp_path / "m.safetensors", {"a": 1})  # type: ignore[dict-item]
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "f.txt"
    dest.write_text("old")

    def broken(p: Path) -> None:
        p.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(dest, broken)
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_torch_files_are_loaded_weights_only(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    save_training_state(good, {"model": {"w": torch.ones(2)}, "step": 5})
    assert load_torch_file(good)["step"] == 5

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    bad = tmp_path / "bad.pth"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        load_torch_file(bad)


def test_unwrap_state_dict_variants() -> None:
    sd = {"w": torch.ones(1)}
    assert unwrap_state_dict(sd) == sd
    assert unwrap_state_dict({"model": sd, "epoch": torch.tensor(1)}) == sd
    assert unwrap_state_dict({"module.w": sd["w"]}) == sd
    with pytest.raises(ValueError, match="no state dict"):
        unwrap_state_dict({"model": "nope"})


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    # mkstemp creates 0600 files; checkpoints must get the mode open() would give them
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    expected = reference.stat().st_mode & 0o777
    path = save_checkpoint(tmp_path / "m.safetensors", {"w": torch.ones(1)})
    assert path.stat().st_mode & 0o777 == expected
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == expected
