"""The ``ev-reid`` command (also ``ev reid ...``)."""

from __future__ import annotations

from ev_core.cli import make_package_app

app = make_package_app(
    "ev-reid",
    "Person re-identification: datasets, UP-ReID pre-training, fine-tuning, faiss retrieval, CMC/mAP/mINP evaluation.",
)


def main() -> None:
    """Console script ``ev-reid``."""
    app()
