"""Checks every ev package runs: it imports, reports its version and exposes its CLI."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points, version

import typer
from typer.testing import CliRunner


def check_package_basics(distribution: str, module: str, ev_subcommand: str) -> None:
    """Assert that ``module`` reports the installed version of ``distribution``, that its
    ``version`` CLI command prints it, and that ``ev <ev_subcommand>`` is registered."""
    mod = importlib.import_module(module)
    installed = version(distribution)
    assert mod.__version__ == installed, (mod.__version__, installed)
    cli = importlib.import_module(f"{module}.cli")
    app = cli.app
    assert isinstance(app, typer.Typer)
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{distribution} {installed}"
    registered = {ep.name: ep.value for ep in entry_points(group="ev.cli")}
    assert registered.get(ev_subcommand) == f"{module}.cli:app", registered
