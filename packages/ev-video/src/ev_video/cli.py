"""The ``ev-video`` command (also ``ev video ...``)."""

from __future__ import annotations

from ev_core.cli import make_package_app

app = make_package_app(
    "ev-video", "Video: decord loaders, STPT temporal action detection, THUMOS14 evaluation."
)


def main() -> None:
    """Console script ``ev-video``."""
    app()
