"""The ``ev-points`` command (also ``ev points ...``)."""

from __future__ import annotations

from ev_core.cli import make_package_app

app = make_package_app(
    "ev-points",
    "Point clouds: pytorch3d-compatible ops in pure torch (pytorch3d optional) and PointMatch weakly-supervised segmentation.",
)


def main() -> None:
    """Console script ``ev-points``."""
    app()
