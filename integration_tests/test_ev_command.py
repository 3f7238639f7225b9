"""The umbrella `ev` command sees every installed package."""

from importlib.metadata import entry_points

from typer.testing import CliRunner

from ev_core.cli import _mount_plugins, app

EXPECTED = {"core", "compress", "reid", "video", "points", "adapt"}


def test_all_packages_registered() -> None:
    assert {ep.name for ep in entry_points(group="ev.cli")} >= EXPECTED


def test_ev_forwards_to_package_cli() -> None:
    _mount_plugins()
    for sub in sorted(EXPECTED):
        result = CliRunner().invoke(app, [sub, "version"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("ev-")
