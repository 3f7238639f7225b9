"""ev_core.training: resume after kills, non-finite stop, divergence, EMA, AMP, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from ev_core.errors import EvError
from ev_core.training import (
    CheckpointManager,
    Engine,
    EngineConfig,
    Hook,
    ModelEma,
    NonFiniteLossError,
    resolve_amp_dtype,
)
from ev_testing import run_distributed

SCRIPT = Path(__file__).with_name("_engine_script.py")


def _run_script(out: Path, kill: str = "") -> int:
    env = {**os.environ, "EV_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), str(out)] + ([kill] if kill else [])
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("full")
    assert _run_script(out) == 0
    return load_file(str(out / "final.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "kill",
    [
        "step:5",  # between checkpoints, mid-epoch
        "save:4:model.safetensors",  # weights written, JSON/state not
        "save:4:state.pt",  # everything but the COMPLETE marker
        "save:6:ema.safetensors",  # at an epoch end (6 steps per epoch)
    ],
)
def test_sigkill_then_resume_equals_uninterrupted(
    tmp_path: Path, kill: str, uninterrupted: dict[str, torch.Tensor]
) -> None:
    assert _run_script(tmp_path, kill) == -9
    ckpts = tmp_path / "checkpoints"
    leftovers = [p.name for p in ckpts.iterdir() if p.name.startswith(".")]
    if kill.startswith("save"):
        assert any(name.endswith(".partial") for name in leftovers)
    assert _run_script(tmp_path) == 0
    _assert_same(load_file(str(tmp_path / "final.safetensors")), uninterrupted)
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["latest", "step-00000016", "step-00000018"]  # leftovers cleaned, 2 kept
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 19))  # no step logged twice after the resume


def _data(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x.sum(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator())


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _ce(model: torch.nn.Module, batch: object, engine: Engine) -> dict[str, torch.Tensor]:
    x, y = engine.to_device(batch)
    return {"loss": F.cross_entropy(model(x), y)}


def test_non_finite_loss_stops_with_step_and_term_and_keeps_checkpoint(tmp_path: Path) -> None:
    model = _model()
    calls = {"n": 0}

    def step_fn(model: torch.nn.Module, batch: object, engine: Engine) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        x, y = engine.to_device(batch)
        ce = F.cross_entropy(model(x), y)
        reg = model[0].weight.square().sum() * (float("nan") if calls["n"] >= 7 else 1.0)
        return {"loss": ce + reg, "ce": ce, "reg": reg}

    cfg = EngineConfig(epochs=3, checkpoint_every=2, log_every=1)
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, out_dir=tmp_path)
    with pytest.raises(NonFiniteLossError) as info:
        engine.fit(_data(), step_fn)
    err = info.value
    assert (err.step, err.term) == (7, "reg")
    assert err.checkpoint is not None and err.checkpoint.name == "step-00000006"
    assert "step 7" in str(err) and "reg" in str(err)
    weights = load_file(str(err.checkpoint / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert isinstance(err, EvError)


def test_non_finite_gradient_is_caught() -> None:
    model = _model()

    def step_fn(model: torch.nn.Module, batch: object, engine: Engine) -> dict[str, torch.Tensor]:
        x, _ = engine.to_device(batch)
        out = model(x).sum()
        return {"loss": out * 0 + torch.sqrt(torch.zeros(()) - 0.0 * out)}  # finite loss, NaN grad

    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), EngineConfig())
    with pytest.raises(NonFiniteLossError, match="gradient norm"):
        engine.fit(_data(), step_fn)


def test_divergence_warns(tmp_path: Path) -> None:
    model = _model()

    def growing(model: torch.nn.Module, batch: object, engine: Engine) -> dict[str, torch.Tensor]:
        ce = _ce(model, batch, engine)["loss"]
        return {"loss": ce + 1e3 * engine.state.step}  # finite, but 1000x the start by step 1

    engine = Engine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        EngineConfig(epochs=2, log_every=1, divergence_factor=100.0),
        out_dir=tmp_path,
    )
    with pytest.warns(RuntimeWarning, match="diverges"):
        engine.fit(_data(), growing)
    assert engine.state.diverged


def test_unwritable_output_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = _model()
    with pytest.raises(EvError, match="not writable") as info:
        Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), out_dir=blocker / "run")
    assert str(blocker) in str(info.value)


def test_gradient_accumulation_equals_large_batch() -> None:
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    y = (x[:, 0] > 0).long()
    results = []
    for batch, accum in ((16, 1), (4, 4)):
        model = _model()
        loader = DataLoader(TensorDataset(x, y), batch_size=batch)
        engine = Engine(
            model, torch.optim.SGD(model.parameters(), lr=0.5), EngineConfig(grad_accum_steps=accum)
        )
        engine.fit(loader, _ce)
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-6, atol=1e-6)


def test_ema_matches_explicit_average() -> None:
    model = _model()
    ema = ModelEma(model, decay=0.8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for key, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, 0.8 * before[key] + 0.2 * model.state_dict()[key])
    warm = ModelEma(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(1 / 10)


def test_clip_and_hooks_and_eval_logged(tmp_path: Path) -> None:
    seen: dict[str, list[float]] = {"grad_norm": [], "eval": []}

    class Recorder(Hook):
        def on_step_end(self, engine: Engine, logs: object) -> None:
            seen["grad_norm"].append(logs["grad_norm"])  # type: ignore[index]

        def on_eval(self, engine: Engine, epoch: int) -> dict[str, float]:
            seen["eval"].append(epoch)
            return {"acc": 0.5}

    model = _model()
    engine = Engine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        EngineConfig(epochs=2, clip_grad_norm=1e-3, log_every=2),
        out_dir=tmp_path,
        hooks=[Recorder()],
    )
    result = engine.fit(_data(), _ce)
    assert seen["eval"] == [0, 1] and len(seen["grad_norm"]) == 8
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["eval"] for line in lines if "eval" in line] == [{"acc": 0.5}] * 2
    assert result.history == lines
    assert (
        json.loads((tmp_path / "config.json").read_text())["config"]["engine"]["clip_grad_norm"]
        == 1e-3
    )


def test_amp_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_amp_dtype("auto", cpu) is None
    assert resolve_amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(EvError, match="fp16"):
        resolve_amp_dtype("fp16", cpu)


def test_bf16_autocast_runs_on_cpu() -> None:
    model = _model()
    dtypes = []

    def step_fn(model: torch.nn.Module, batch: object, engine: Engine) -> dict[str, torch.Tensor]:
        x, y = engine.to_device(batch)
        logits = model(x)
        dtypes.append(logits.dtype)
        return {"loss": F.cross_entropy(logits, y)}

    Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), EngineConfig(amp="bf16")).fit(
        _data(), step_fn
    )
    assert set(dtypes) == {torch.bfloat16}
    assert model[0].weight.dtype == torch.float32


def test_checkpoint_manager_ignores_incomplete(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        manager.save(step, lambda folder: (folder / "x").write_text("1"))
    assert [p.name for p in manager.complete()] == ["step-00000002", "step-00000003"]
    manager.begin(4)  # killed before commit
    (tmp_path / "step-00000005").mkdir()  # a folder without COMPLETE
    (tmp_path / "latest").write_text("step-00000009\n")  # pointer to nothing
    assert manager.latest() == tmp_path / "step-00000003"
    removed = {p.name for p in manager.cleanup()}
    assert removed == {".step-00000004.partial", "step-00000005"}


def _ddp_worker(rank: int, world_size: int, out: str) -> None:
    from torch.utils.data.distributed import DistributedSampler

    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    y = (x.sum(1) > 0).long()
    dataset = TensorDataset(x, y)
    model = _model()
    loader = DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, shuffle=False))
    engine = Engine(
        model, torch.optim.SGD(model.parameters(), lr=0.5), EngineConfig(epochs=2, device="cpu")
    )
    assert engine.world_size == world_size
    engine.fit(loader, _ce)
    if rank == 0:
        torch.save(engine.raw_model.state_dict(), out)


def test_ddp_two_processes_equal_single_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    run_distributed(_ddp_worker, str(out), world_size=2)
    ddp_state = torch.load(out, weights_only=True)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    y = (x.sum(1) > 0).long()
    # DistributedSampler(shuffle=False) gives rank r the samples r, r+2, ...: the union of a step's
    # two rank batches is 8 consecutive samples, so one process with batch 8 sees the same sets
    model = _model()
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.5), EngineConfig(epochs=2))
    engine.fit(DataLoader(TensorDataset(x, y), batch_size=8), _ce)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- review fixes
def _fit_steps(tmp: Path | None, steps: int, **kw: object) -> Engine:
    model = _model()
    engine = Engine(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        EngineConfig(epochs=10, max_steps=steps, log_every=1),
        out_dir=tmp,
    )
    engine.fit(_data(), _ce, **kw)  # type: ignore[arg-type]
    return engine


def test_fresh_start_in_a_used_folder_discards_the_old_run(tmp_path: Path) -> None:
    # an old run reached step 12; a fresh run (resume=False) must not be pruned in its favour,
    # and a later resume must continue the new run, not the old one
    _fit_steps(tmp_path, 12)
    engine = _fit_steps(tmp_path, 2, resume=False)
    latest = engine.latest_checkpoint()
    assert latest is not None and latest.name == "step-00000002"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-00000002"]


def test_resume_from_an_older_checkpoint_drops_the_newer_ones(tmp_path: Path) -> None:
    first = _fit_steps(tmp_path, 4)  # epoch 1 ends at step 4: checkpoint step-00000004
    old = first.latest_checkpoint()
    _fit_steps(tmp_path, 8)  # continues to step 8
    engine = _fit_steps(tmp_path, 6, resume=old)
    latest = engine.latest_checkpoint()
    assert latest is not None and latest.name == "step-00000006"


class _EvalRecorder(Hook):
    """A hook whose state changes in on_eval/on_epoch_end (e.g. best-accuracy tracking)."""

    def __init__(self, fail_at_epoch: int | None = None) -> None:
        self.evals: list[int] = []
        self.ends: list[int] = []
        self.fail_at_epoch = fail_at_epoch

    def on_epoch_end(self, engine: Engine, epoch: int) -> None:
        self.ends.append(epoch)

    def on_eval(self, engine: Engine, epoch: int) -> dict[str, float]:
        if epoch == self.fail_at_epoch:
            raise KeyboardInterrupt  # the process dies during the evaluation
        self.evals.append(epoch)
        return {"acc": float(epoch)}

    def state_dict(self) -> dict[str, object]:
        return {"evals": list(self.evals), "ends": list(self.ends)}

    def load_state_dict(self, state: object) -> None:
        self.evals = list(state["evals"])  # type: ignore[index]
        self.ends = list(state["ends"])  # type: ignore[index]


@pytest.mark.parametrize("fail_at_epoch", [None, 1])
def test_epoch_end_hooks_and_eval_survive_a_kill_after_the_epoch_checkpoint(
    tmp_path: Path, fail_at_epoch: int | None
) -> None:
    def run(hook: _EvalRecorder, stop: int | None = None) -> Engine:
        model = _model()
        engine = Engine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            EngineConfig(epochs=3, log_every=1),
            out_dir=tmp_path,
            hooks=[hook],
        )
        engine.fit(_data(), _ce, stop_at_step=stop)
        return engine

    if fail_at_epoch is None:  # killed after epoch 1's evaluation, before the next checkpoint
        run(_EvalRecorder(), stop=4)
        run(_EvalRecorder(), stop=8)  # a later checkpoint at step 8 (epoch 2's end) ...
        latest = tmp_path / "checkpoints" / "step-00000008"
        assert latest.is_dir()
    else:
        with pytest.raises(KeyboardInterrupt):
            run(_EvalRecorder(fail_at_epoch=fail_at_epoch))
    hook = _EvalRecorder()
    run(hook)
    assert hook.ends == [0, 1, 2] and hook.evals == [0, 1, 2]
    evals = [
        json.loads(line)["epoch"]
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if "eval" in json.loads(line)
    ]
    assert evals == [0, 1, 2]


def test_resume_mid_log_window_logs_the_same_means(tmp_path: Path) -> None:
    def run(out: Path, stop: int | None) -> list[dict[str, object]]:
        model = _model()
        engine = Engine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            EngineConfig(epochs=1, log_every=4, checkpoint_every=2),
            out_dir=out,
        )
        engine.fit(_data(64), _ce, stop_at_step=stop)
        metrics = out / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        return [json.loads(s) for s in lines]

    full = run(tmp_path / "full", None)
    assert run(tmp_path / "split", 2) == []  # the window of steps 1-2 is saved, not logged
    split = run(tmp_path / "split", None)
    assert [r["step"] for r in split] == [r["step"] for r in full] == [4, 8]
    for a, b in zip(full, split):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)


def test_fit_again_in_process_without_out_dir_continues_the_epoch() -> None:
    whole = _fit_steps(None, 6)
    split = _fit_steps(None, 6, stop_at_step=2)
    split.fit(_data(), _ce)
    _assert_same(whole.raw_model.state_dict(), split.raw_model.state_dict())


def test_interrupted_resave_of_the_same_step_keeps_a_complete_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep=1)
    manager.save(5, lambda folder: (folder / "x").write_text("old"))
    # the same step saved again, killed between moving the old folder aside and the new in
    manager.begin(5)
    (manager.partial_dir(5) / "x").write_text("new")
    (manager.partial_dir(5) / "COMPLETE").write_text("5\n")
    (tmp_path / "step-00000005").rename(tmp_path / ".step-00000005.trash")
    manager.cleanup()
    latest = manager.latest()
    assert latest is not None and latest.name == "step-00000005"
    assert (latest / "x").read_text() == "new"


@pytest.mark.gpu
def test_resume_on_cuda_restores_rng(tmp_path: Path) -> None:
    def run(stop: int | None) -> Engine:
        model = _model()
        engine = Engine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            EngineConfig(epochs=2, checkpoint_every=1, device="cuda", amp="off"),
            out_dir=tmp_path,
        )
        engine.fit(_data(), _ce, stop_at_step=stop)
        return engine

    run(2)
    assert run(None).state.step == 8  # state.pt's RNG tensors must be restored on the CPU


class _NoisyData(torch.utils.data.Dataset):
    """Random augmentation inside the workers (their RNG is not in any checkpoint)."""

    def __init__(self) -> None:
        self.x = torch.randn(48, 4, generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i] + 0.1 * torch.randn(4)
        return x, (x.sum() > 0).long()


def test_mid_epoch_resume_is_exact_with_loader_workers(tmp_path: Path) -> None:
    def run(out: Path, stop: int | None) -> dict[str, torch.Tensor]:
        model = _model()
        loader = DataLoader(
            _NoisyData(), batch_size=8, shuffle=True, num_workers=2, generator=torch.Generator()
        )
        engine = Engine(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            EngineConfig(epochs=2, checkpoint_every=2),
            out_dir=out,
        )
        engine.fit(loader, _ce, stop_at_step=stop)
        return model.state_dict()

    full = run(tmp_path / "full", None)
    run(tmp_path / "split", 3)  # mid-epoch 1 (6 batches per epoch)
    _assert_same(full, run(tmp_path / "split", None))


def test_persistent_workers_warn_that_resume_is_not_exact() -> None:
    class Loader(list):  # what the engine reads of a DataLoader with persistent workers
        persistent_workers = True
        num_workers = 2

    x = torch.randn(8, 4)
    model = _model()
    engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1), EngineConfig())
    with pytest.warns(RuntimeWarning, match="persistent_workers"):
        engine.fit(Loader([(x, (x.sum(1) > 0).long())]), _ce)
