"""Progress, seeding, run-config dumps, registry, JSON conversion."""

import enum
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import ev_core
from ev_core.io import to_jsonable
from ev_core.progress import is_quiet, progress, set_quiet
from ev_core.registry import get_model_config, list_ev_models, register_ev_model
from ev_core.repro import dump_run_config, seed_everything


@pytest.fixture(autouse=True)
def _reset_quiet():  # type: ignore[no-untyped-def]
    set_quiet(None)  # another test's CLI call with --quiet may have forced it
    yield
    set_quiet(None)


def test_quiet_from_env_flag_and_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EV_QUIET", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not is_quiet()
    monkeypatch.setenv("EV_QUIET", "1")
    assert is_quiet()
    assert progress(range(3)).disable
    monkeypatch.setenv("EV_QUIET", "0")
    assert not is_quiet()
    monkeypatch.setenv("RANK", "1")
    assert is_quiet()
    set_quiet(False)
    assert not is_quiet()
    set_quiet(True)
    monkeypatch.delenv("RANK")
    assert is_quiet()
    assert list(progress(range(4), desc="x")) == [0, 1, 2, 3]


def test_seed_everything_reproduces_all_rngs(restore_rng: None) -> None:
    def draw() -> tuple[float, float, torch.Tensor]:
        return random.random(), float(np.random.rand()), torch.rand(3)

    seed_everything(123)
    a = draw()
    seed_everything(123)
    b = draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    with pytest.raises(ValueError):
        seed_everything(-1)


class Mode(enum.Enum):
    FAST = "fast"


@dataclass
class RunCfg:
    lr: float = 0.1
    mode: Mode = Mode.FAST
    out: Path = Path("o")
    sizes: tuple[int, int] = (2, 3)


def test_dump_run_config(tmp_path: Path) -> None:
    path = dump_run_config(RunCfg(), tmp_path / "run")
    data = json.loads(path.read_text())
    assert data["config"] == {"lr": 0.1, "mode": "fast", "out": "o", "sizes": [2, 3]}
    env = data["environment"]
    assert env["torch"] == torch.__version__
    assert env["ev_packages"]["ev-core"] == ev_core.__version__


def test_to_jsonable_scalars_and_errors() -> None:
    assert to_jsonable({"a": torch.tensor(2.5), "b": np.int64(3), "c": {1, 2}}) == {
        "a": 2.5,
        "b": 3,
        "c": [1, 2],
    }
    with pytest.raises(TypeError):
        to_jsonable(object())


def test_registry_registers_with_timm() -> None:
    import timm

    @dataclass
    class Cfg:
        width: int = 3

    @register_ev_model(Cfg(width=5))
    def _ev_test_model(pretrained: bool = False, **kwargs):  # type: ignore[no-untyped-def]
        return torch.nn.Linear(kwargs.get("width", 5), 1)

    assert "_ev_test_model" in list_ev_models()
    assert get_model_config("_ev_test_model") == Cfg(width=5)
    assert get_model_config("_ev_test_model") is not get_model_config("_ev_test_model")
    assert isinstance(timm.create_model("_ev_test_model"), torch.nn.Linear)
    with pytest.raises(ValueError, match="twice"):
        register_ev_model(Cfg())(_ev_test_model)
    with pytest.raises(TypeError):
        register_ev_model(Cfg)  # a class, not an instance
    with pytest.raises(KeyError, match="unknown ev model"):
        get_model_config("nope")
