"""The ``ev-adapt`` command (also ``ev adapt ...``)."""

from __future__ import annotations

from ev_core.cli import make_package_app

app = make_package_app(
    "ev-adapt", "Semi-supervised domain adaptation: MCL (multi-level consistency learning)."
)


def main() -> None:
    """Console script ``ev-adapt``."""
    app()
