"""CLI and model-loading review fixes: user errors are one line (exit 2), MME-list runs start
from pretrained weights as MCL does, and reloading a trained model never fetches them again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ev_adapt.models import AdaptModelConfig, AdaptNet, DigitsCNN
from ev_core.checkpoint import save_checkpoint


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--method", "foo"), "--method"),
        (("--benchmark", "foo"), "--benchmark"),
        (("--steps", "0"), "--steps"),
        (("--shots", "0"), "--shots"),
        (("--amp", "fp8"), "--amp"),
    ],
)
def test_cli_bad_options_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], needle: str
) -> None:
    from ev_adapt.cli import app
    from ev_core.cli import run_cli

    with pytest.raises(SystemExit) as info:
        run_cli(app, ["train", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.strip().count("\n") == 0 and needle in err, err


def test_list_benchmarks_default_to_pretrained_backbones(monkeypatch: pytest.MonkeyPatch) -> None:
    from ev_adapt import cli

    seen: dict[str, object] = {}

    def fake_lists(*args: object, **kw: object) -> object:
        class Lists:
            num_classes = 7

        return Lists()

    monkeypatch.setattr("ev_adapt.data.mme_lists", fake_lists)
    monkeypatch.setattr("ev_adapt.data.ImageListDomainData", lambda *a, **k: None)
    for pretrained in (True, False):
        _, config = cli._scenario(
            "multi", 0, 3, Path("l"), Path("i"), "real", "clipart", "resnet34", pretrained
        )
        seen[str(pretrained)] = config.pretrained
    assert seen == {"True": True, "False": False}


def test_load_model_does_not_fetch_pretrained_weights_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ev_adapt.evaluation as evaluation

    config = AdaptModelConfig(backbone="resnet18", num_classes=3, pretrained=True)
    model = AdaptNet(DigitsCNN(in_chans=3), 3, 512)
    save_checkpoint(tmp_path / "model.safetensors", model.state_dict(), config, {})
    built: list[AdaptModelConfig] = []

    def fake_build(cfg: AdaptModelConfig) -> AdaptNet:
        built.append(cfg)
        return AdaptNet(DigitsCNN(in_chans=3), 3, 512)

    monkeypatch.setattr(evaluation, "build_model", fake_build)
    loaded, loaded_config = evaluation.load_model(tmp_path / "model.safetensors")
    assert [c.pretrained for c in built] == [False]  # the trained weights replace them anyway
    assert loaded_config.pretrained is True  # what the run was trained from is still reported
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
