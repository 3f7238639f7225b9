"""The ev-points CLI end to end on tiny generated data: preprocess → train → eval, the
one-line errors, and the backends report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data import make_s3dis
from typer.testing import CliRunner

from ev_core.cli import run_cli
from ev_points.cli import app

runner = CliRunner()


def test_backends_command() -> None:
    result = runner.invoke(app, ["backends"])
    assert result.exit_code == 0, result.output
    assert "native: available" in result.output and "auto (no shape given) -> " in result.output
    assert "native k-NN / ball query on the CPU: kd-tree" in result.output


@pytest.mark.filterwarnings("ignore:classes absent")
def test_preprocess_train_eval(tmp_path: Path) -> None:
    make_s3dis(tmp_path / "raw")
    cache, run = tmp_path / "cache", tmp_path / "run"
    result = runner.invoke(
        app,
        ["preprocess", "--dataset", "s3dis", "--root", str(tmp_path / "raw"), "--out", str(cache)],
    )
    assert result.exit_code == 0, result.output
    assert (
        len(list(cache.glob("*.npz"))) == 6
        and json.loads((cache / "meta.json").read_text())["grid_size"] == 0.04
    )
    args = ["train", "--data", str(cache), "--out", str(run), "--tiny", "--steps", "2", "--batch-size", "2",
            "--num-points", "64", "--label-ratio", "0.1", "--device", "cpu", "--test-area", "5"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out" in result.output and (run / "checkpoints" / "latest").is_file()
    result = runner.invoke(
        app, ["eval", "--run", str(run), "--data", str(cache), "--out", str(tmp_path / "m.json")]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= metrics["oa"] <= 1.0 and len(metrics["iou"]) == 13


def test_malformed_file_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_s3dis(tmp_path / "raw")
    bad = tmp_path / "raw" / "Area_2" / "office_1" / "Annotations" / "wall_1.txt"
    bad.write_text("1 2 3 4 5 6\n1 2 three 4 5 6\n")
    with pytest.raises(SystemExit) as exc:
        run_cli(
            app,
            [
                "preprocess",
                "--dataset",
                "s3dis",
                "--root",
                str(tmp_path / "raw"),
                "--out",
                str(tmp_path / "c"),
            ],
        )
    assert exc.value.code == 2
    # progress bars also write to stderr (outside nox's EV_QUIET=1); the error is one line, last
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err[-1]
    assert "wall_1.txt:2: not numbers" in errors[0]


def test_eval_without_checkpoint_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_s3dis(tmp_path / "raw")
    runner.invoke(
        app,
        [
            "preprocess",
            "--dataset",
            "s3dis",
            "--root",
            str(tmp_path / "raw"),
            "--out",
            str(tmp_path / "c"),
        ],
    )
    with pytest.raises(SystemExit) as exc:
        run_cli(app, ["eval", "--run", str(tmp_path / "nothing"), "--data", str(tmp_path / "c")])
    assert exc.value.code == 2
    assert "no complete checkpoint" in capsys.readouterr().err
