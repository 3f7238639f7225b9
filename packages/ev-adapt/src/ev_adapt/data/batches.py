"""Training batches of semi-supervised adaptation, drawn lazily and replayably."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ev_adapt.data.domains import DomainData

__all__ = ["SSDABatch", "SSDABatches"]


@dataclass(frozen=True)
class SSDABatch:
    """The indices and augmentation seed of one step's batch; :meth:`load` makes the tensors."""

    source: Tensor
    labeled_target: Tensor
    unlabeled: Tensor
    seed: int

    def load(self, data: DomainData) -> dict[str, Tensor]:
        """``{"x_source", "y_source", "x_target", "y_target", "x_weak", "x_strong"}``."""
        gen = torch.Generator().manual_seed(self.seed)
        xs, ys = data.labeled("source", self.source, gen)
        xt, yt = data.labeled("labeled_target", self.labeled_target, gen)
        xw, xst = data.unlabeled(self.unlabeled, gen)
        return {
            "x_source": xs,
            "y_source": ys,
            "x_target": xt,
            "y_target": yt,
            "x_weak": xw,
            "x_strong": xst,
        }


class SSDABatches:
    """``steps`` batches per pass: labelled source, labelled target and unlabelled target indices.

    Each pool is drawn without replacement from reshuffled passes (a new permutation when the
    rest of the current one cannot fill a batch, as MCL's ``drop_last`` loaders that restart),
    driven by :attr:`generator` (which :class:`~ev_core.training.Engine` seeds every epoch),
    so skipping batches costs nothing.
    Under ``torch.distributed`` each rank draws its own batches (the rank is mixed into the
    stream), so a 2-process run sees twice the images per step.

    Args:
        data: the scenario.
        steps: batches per pass (an engine "epoch": the evaluation interval).
        source_batch: labelled source images per batch (24 in MCL).
        target_batch: labelled target images per batch (``min(24, n_labelled)`` in MCL).
        unlabeled_batch: unlabelled target images per batch (48 in MCL).
    """

    def __init__(
        self,
        data: DomainData,
        steps: int,
        source_batch: int = 24,
        target_batch: int = 24,
        unlabeled_batch: int = 48,
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.data = data
        self.steps = steps
        self.source_batch = source_batch
        self.target_batch = min(target_batch, data.sizes["labeled_target"])
        self.unlabeled_batch = unlabeled_batch
        self.generator = torch.Generator()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[SSDABatch]:
        sizes = self.data.sizes
        gen = self.generator
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank:
            base = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            gen = torch.Generator().manual_seed(base + rank)
        pools = {
            "source": _Reshuffled(sizes["source"], self.source_batch, gen),
            "labeled_target": _Reshuffled(sizes["labeled_target"], self.target_batch, gen),
            "unlabeled": _Reshuffled(sizes["unlabeled_target"], self.unlabeled_batch, gen),
        }
        for _ in range(self.steps):
            yield SSDABatch(
                source=pools["source"].next(),
                labeled_target=pools["labeled_target"].next(),
                unlabeled=pools["unlabeled"].next(),
                seed=int(torch.randint(0, 2**62, (1,), generator=gen)),
            )


class _Reshuffled:
    """Batches of indices from successive random permutations of ``range(n)`` (no partial batch)."""

    def __init__(self, n: int, batch: int, generator: torch.Generator) -> None:
        if n < 1:
            raise ValueError("an empty pool of images cannot be sampled")
        self.n, self.batch, self.generator = n, batch, generator
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> Tensor:
        if self.batch > self.n:  # a pool smaller than one batch: repeat it, reshuffled
            reps = -(-self.batch // self.n)
            perm = torch.cat(
                [torch.randperm(self.n, generator=self.generator) for _ in range(reps)]
            )
            return perm[: self.batch]
        if len(self.order) < self.batch:
            self.order = torch.randperm(self.n, generator=self.generator)
        out, self.order = self.order[: self.batch], self.order[self.batch :]
        return out
