"""What a new user hits, through the ``ev-reid`` console script (``main`` = ``run_cli(app)``).

Every known error is one ``error: ...`` line on stderr and exit status 2, found before the
expensive work (training, feature extraction); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ev_core.checkpoint import save_checkpoint
from ev_core.cli import run_cli
from ev_reid.cli import app
from ev_reid.datasets import DatasetLayoutError, Market1501, generate_synthetic_market
from ev_reid.models import ReidModel, ReidModelConfig

TINY_KW = '{"channels": [8, 16, 16, 32], "stem_width": 8}'
TINY = {"channels": [8, 16, 16, 32], "stem_width": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_market(
        tmp_path_factory.mktemp("syn") / "market",
        num_ids=10,
        images_per_id=6,
        num_cameras=2,
        image_size=(64, 32),
        seed=0,
    )


def _train_args(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        "--quiet",
        "train",
        "--out",
        str(out),
        "--data-root",
        str(data),
        "--backbone",
        "resnet18",
        "--backbone-kwargs",
        TINY_KW,
        "--height",
        "64",
        "--width",
        "32",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "-P",
        "4",
        "-K",
        "2",
        "--epochs",
        "2",
        "--max-steps-per-epoch",
        "2",
        "--warmup-epochs",
        "0",
        "--eval-every",
        "0",
        *extra,
    ]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the console script's ``run_cli(app)``: (exit status, stderr)."""
    try:
        run_cli(app, argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_help_shows_flags_without_bool_placeholder_and_machine_workers() -> None:
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    flag_lines = [line for line in out.splitlines() if "--no-" in line]
    assert any("--allow-partial" in line for line in flag_lines)
    assert flag_lines and not any("<bool>" in line for line in flag_lines), flag_lines
    assert "the CPUs available, at most 4" in out
    from ev_reid.train import TrainConfig, default_num_workers

    assert default_num_workers() == min(4, len(os.sched_getaffinity(0)))
    assert TrainConfig().num_workers == default_num_workers()


def test_dataset_layout_error_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    code, err = _cli(_train_args(tmp_path / "run", tmp_path / "empty"), capsys)
    line = _one_error_line(err)
    assert code == 2 and str(tmp_path / "empty") in line
    # --debug shows the traceback (the exception propagates)
    with pytest.raises(DatasetLayoutError):
        run_cli(app, [*_train_args(tmp_path / "run", tmp_path / "empty"), "--debug"])


def test_unknown_backbone_is_one_line(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _train_args(tmp_path / "run", data)
    args[args.index("resnet18")] = "resnet_nosuch"
    code, err = _cli(args, capsys)  # a usage error, before any data is read
    assert code == 2 and "unknown model 'resnet_nosuch'" in err and "Traceback" not in err
    # the library raises an EvError (one line from any ev console script)
    from ev_core.errors import EvError
    from ev_reid.train import TrainConfig, train

    cfg = TrainConfig(
        out_dir=str(tmp_path / "lib"),
        data_root=str(data),
        model=ReidModelConfig(backbone="resnet_nosuch"),
        num_identities=4,
        num_instances=2,
        num_workers=0,
    )
    with pytest.raises(EvError, match="unknown backbone 'resnet_nosuch'"):
        train(cfg)


def test_truncated_images_are_all_reported_before_training(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "market"
    shutil.copytree(data, root)
    ds = Market1501(root)
    bad = [ds.query[0].path, ds.train[3].path]
    for path in bad:
        raw = Path(path).read_bytes()
        Path(path).write_bytes(raw[: len(raw) - 40])  # header intact, end-of-image gone
    code, err = _cli(_train_args(tmp_path / "run", root), capsys)
    line = _one_error_line(err)
    assert code == 2 and line.startswith("error: 2 of ")
    assert all(p in line for p in bad) and "truncated JPEG" in line
    ckpts = tmp_path / "run" / "checkpoints"
    assert not any(ckpts.iterdir()) and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_partial_init_fails_unless_allowed(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a ResNet-18 backbone file given to a ResNet-34: the 18's tensors fit, the rest is missing
    small = ReidModel(ReidModelConfig(backbone="resnet18", backbone_kwargs=dict(TINY)))
    init = save_checkpoint(tmp_path / "r18.safetensors", small.state_dict())
    args = _train_args(tmp_path / "run", data, "--init", str(init))
    args[args.index("resnet18")] = "resnet34"
    code, err = _cli(args, capsys)
    line = _one_error_line(err)
    assert code == 2 and str(init) in line and "--allow-partial" in line
    assert "missing, e.g. ['layer1.2." in line and "backbone tensors can be loaded" in line
    code, err = _cli([*args[:-2], "--epochs", "1", "--allow-partial"], capsys)
    assert code == 0, err

    # a damaged file inside a complete checkpoint: --resume names it and what is wrong
    step_dir = tmp_path / "run" / "checkpoints" / "step-00000002"
    state = step_dir / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    resume = [*args[:-2], "--epochs", "2", "--allow-partial", "--resume"]
    code, err = _cli(resume, capsys)
    line = _one_error_line(err)
    assert code == 2 and str(state) in line and "cannot read the training state" in line
    weights = step_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = _cli(resume, capsys)
    line = _one_error_line(err)
    assert code == 2 and str(weights) in line and "cannot read the checkpoint weights" in line


def test_checkpoint_errors_name_the_file(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ReidModel(ReidModelConfig(backbone="resnet18", backbone_kwargs=dict(TINY)))
    good = save_checkpoint(
        tmp_path / "good" / "model.safetensors", model.state_dict(), model.config
    )
    cut = tmp_path / "cut" / "model.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(good.read_bytes()[:1000])
    shutil.copy(good.with_suffix(".json"), cut.with_suffix(".json"))
    eval_args = ["--quiet", "eval", "--data-root", str(data), "--device", "cpu"]
    code, err = _cli([*eval_args[:2], str(cut), *eval_args[2:]], capsys)
    line = _one_error_line(err)
    assert code == 2 and str(cut) in line and "truncated" in line
    good.with_suffix(".json").unlink()
    code, err = _cli([*eval_args[:2], str(good), *eval_args[2:]], capsys)
    line = _one_error_line(err)
    assert code == 2 and "model.json" in line and "missing" in line


def test_missing_faiss_is_found_before_feature_extraction(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ev_reid.inference

    model = ReidModel(ReidModelConfig(backbone="resnet18", backbone_kwargs=dict(TINY)))
    ckpt = save_checkpoint(tmp_path / "model.safetensors", model.state_dict(), model.config)

    def no_extraction(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("features were extracted before the backend was checked")

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    monkeypatch.setattr(ev_reid.inference, "extract_record_features", no_extraction)
    argv = ["--quiet", "index", str(ckpt), "--data-root", str(data), "--out", str(tmp_path / "ix")]
    code, err = _cli([*argv, "--backend", "faiss-flat", "--device", "cpu"], capsys)
    line = _one_error_line(err)
    assert code == 2 and "needs faiss" in line and "ev-reid[faiss]" in line


def test_unwritable_checkpoints_fail_before_training(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the folder should be")
    code, err = _cli(_train_args(out, data), capsys)
    line = _one_error_line(err)
    assert code == 2 and "not writable" in line and str(out / "checkpoints") in line
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoints_fail_before_training(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints").chmod(0o555)
    try:
        code, err = _cli(_train_args(out, data), capsys)
    finally:
        (out / "checkpoints").chmod(0o755)
    assert code == 2 and "not writable" in _one_error_line(err)
    assert not (out / "metrics.jsonl").exists()


def test_huge_lr_stops_at_the_first_non_finite_loss(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code, err = _cli(_train_args(out, data, "--lr", "1e30", "--epochs", "3"), capsys)
    line = _one_error_line(err)
    assert code == 2 and "non-finite" in line and "at step 2" in line
    assert line.split("non-finite ")[1].split(" ")[0] in {"id", "triplet", "loss", "accuracy"}
    # nothing trained on NaN was saved
    assert not list((out / "checkpoints").glob("step-*"))
    assert not (out / "model.safetensors").exists()


def test_large_lr_warns_on_divergence(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.warns(RuntimeWarning, match="the loss diverges"):
        code, err = _cli(_train_args(tmp_path / "run", data, "--lr", "1e6"), capsys)
    assert code == 0, err
