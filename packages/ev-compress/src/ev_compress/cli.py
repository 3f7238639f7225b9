"""The ``ev-compress`` command (also ``ev compress ...``)."""

from __future__ import annotations

from ev_core.cli import make_package_app

app = make_package_app(
    "ev-compress",
    "Mesa (8-bit activation memory-saving training), EcoFormer (binary-hash linear attention) and SPViT (single-path MSA→conv pruning) for timm and ev models.",
)


def main() -> None:
    """Console script ``ev-compress``."""
    app()
