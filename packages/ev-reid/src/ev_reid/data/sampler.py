"""Identity-balanced (P×K) samplers for metric-learning batches, single-process and DDP."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ev_core.distributed import get_rank, get_world_size
from ev_reid.records import ReidRecord

__all__ = ["DistributedRandomIdentitySampler", "RandomIdentitySampler", "identity_batches"]


def _pids(records: Sequence[ReidRecord] | Sequence[int]) -> list[int]:
    return [r.pid if isinstance(r, ReidRecord) else int(r) for r in records]


def _check(pids: list[int], batch_size: int, num_instances: int) -> int:
    if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
        raise ValueError(
            f"batch_size ({batch_size}) must be a positive multiple of num_instances "
            f"({num_instances})"
        )
    num_ids = batch_size // num_instances
    if len(set(pids)) < num_ids:
        raise ValueError(
            f"a batch needs {num_ids} identities (batch_size {batch_size} / num_instances "
            f"{num_instances}) but the data has only {len(set(pids))}"
        )
    return num_ids


def identity_batches(
    pids: Sequence[int], num_ids: int, num_instances: int, rng: np.random.Generator
) -> list[list[int]]:
    """One epoch of P×K batches (P = ``num_ids``, K = ``num_instances``) as index lists.

    Each identity's indices are shuffled and cut into chunks of K (an identity with fewer
    than K images is sampled with replacement up to K; a last incomplete chunk is dropped).
    While at least P identities have chunks left, P of them are drawn uniformly without
    replacement and contribute their next chunk. Every batch therefore holds exactly P
    distinct identities with K indices each, the same as torchreid's sampler.

    Args:
        pids: the identity of each dataset index.
        num_ids: P, identities per batch.
        num_instances: K, indices per identity per batch.
        rng: the random generator (the only source of randomness).

    Returns:
        The batches, each a list of ``num_ids * num_instances`` dataset indices.
    """
    by_pid: dict[int, list[int]] = {}
    for index, pid in enumerate(pids):
        by_pid.setdefault(pid, []).append(index)
    chunks: dict[int, list[list[int]]] = {}
    for pid in sorted(by_pid):
        idx = np.asarray(by_pid[pid])
        if len(idx) < num_instances:
            idx = rng.choice(idx, num_instances, replace=True)
        idx = rng.permutation(idx)
        usable = len(idx) // num_instances * num_instances
        chunks[pid] = [c.tolist() for c in np.split(idx[:usable], usable // num_instances)]
    available = sorted(chunks)
    batches = []
    while len(available) >= num_ids:
        chosen = rng.choice(len(available), num_ids, replace=False)
        batch: list[int] = []
        for pid in [available[i] for i in chosen]:
            batch += chunks[pid].pop()
        batches.append(batch)
        available = [p for p in available if chunks[p]]
    return batches


class RandomIdentitySampler(Sampler[int]):
    """P×K sampler: each run of ``batch_size`` indices holds P = batch_size / K identities
    with K = ``num_instances`` images each (see :func:`identity_batches`).

    Use with ``DataLoader(batch_size=batch_size, sampler=..., drop_last=True)``. The order is
    a deterministic function of ``seed`` and the epoch given to :meth:`set_epoch`.

    Args:
        records: the training records (or their pids).
        batch_size: indices per batch (a multiple of ``num_instances``).
        num_instances: K, images per identity in a batch.
        seed: base seed; use the same on every rank.

    Raises:
        ValueError: if the batch shape is invalid or the data has fewer than P identities.
    """

    def __init__(
        self,
        records: Sequence[ReidRecord] | Sequence[int],
        batch_size: int,
        num_instances: int,
        *,
        seed: int = 0,
    ) -> None:
        self.pids = _pids(records)
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.num_ids = _check(self.pids, batch_size, num_instances)
        self.seed = seed
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the order deterministically)."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """The current epoch's batches (cached per epoch)."""
        if self._cache is None or self._cache[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._cache = (
                self.epoch,
                identity_batches(self.pids, self.num_ids, self.num_instances, rng),
            )
        return self._cache[1]

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches() for i in batch])

    def __len__(self) -> int:
        return len(self.batches()) * self.batch_size


class DistributedRandomIdentitySampler(RandomIdentitySampler):
    """P×K sampler for DDP: every rank gets full P×K batches of distinct identities.

    Each step draws one global batch of ``num_replicas * P`` identities (K images each, as
    :class:`RandomIdentitySampler` with batch size ``num_replicas * batch_size``) and hands
    rank ``r`` the ``r``-th block of P identities, so identities are partitioned across ranks
    within a step and all ranks run the same number of steps. Wrapping a plain
    :class:`RandomIdentitySampler` in ``ev_core.distributed.DistributedSamplerWrapper``
    instead interleaves indices: each rank then sees ``num_replicas * P`` identities with
    ``K / num_replicas`` images each.

    Args:
        records: the training records (or their pids).
        batch_size: per-rank batch size (a multiple of ``num_instances``).
        num_instances: K, images per identity in a batch.
        num_replicas: world size (default: from the process group).
        rank: this rank (default: from the process group).
        seed: base seed; must be the same on every rank.
    """

    def __init__(
        self,
        records: Sequence[ReidRecord] | Sequence[int],
        batch_size: int,
        num_instances: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} outside [0, {self.num_replicas})")
        super().__init__(records, batch_size * self.num_replicas, num_instances, seed=seed)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return iter([i for batch in self.batches() for i in batch[lo:hi]])
