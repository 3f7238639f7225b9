"""Record type shared by datasets, evaluation and retrieval: one image with its identity."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReidRecord"]


@dataclass(frozen=True)
class ReidRecord:
    """One re-id image.

    Attributes:
        path: Image path (as given by the dataset, usually absolute).
        pid: Person id (relabelled 0..N-1 for training sets; raw id for query/gallery;
            ``0`` is the Market-1501 distractor id in galleries).
        camid: 0-based camera id.
        dsetid: Dataset id when several datasets are combined (default 0).
    """

    path: str
    pid: int
    camid: int
    dsetid: int = 0
