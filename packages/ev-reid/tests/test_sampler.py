"""P×K identity sampler: batch invariants, determinism, and DDP sharding (explicit ranks)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ev_core.distributed import DistributedSamplerWrapper
from ev_reid.data import DistributedRandomIdentitySampler, RandomIdentitySampler
from ev_reid.records import ReidRecord

# identity -> number of images: some below K (sampled with replacement), some with several chunks
SIZES = {0: 1, 3: 2, 4: 4, 7: 5, 8: 9, 11: 12, 12: 3, 20: 8, 21: 6, 30: 16}


def _records() -> list[ReidRecord]:
    recs = [ReidRecord(f"{pid}_{i}.jpg", pid, i % 3) for pid, n in SIZES.items() for i in range(n)]
    return recs[::2] + recs[1::2]  # interleave so that an identity's indices are not contiguous


def _batches(indices: list[int], size: int) -> list[list[int]]:
    assert len(indices) % size == 0
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def _check_pk(batch: list[int], pids: list[int], p: int, k: int) -> None:
    counts = Counter(pids[i] for i in batch)
    assert len(counts) == p and set(counts.values()) == {k}, counts


def test_pk_invariants() -> None:
    recs = _records()
    pids = [r.pid for r in recs]
    sampler = RandomIdentitySampler(recs, batch_size=12, num_instances=4, seed=3)
    indices = list(sampler)
    assert len(indices) == len(sampler) > 0
    per_epoch_uses: Counter[int] = Counter()
    for batch in _batches(indices, 12):
        _check_pk(batch, pids, p=3, k=4)
        per_epoch_uses.update(batch)
    unused_chunks = {}
    for pid, n in SIZES.items():
        used = [per_epoch_uses[i] for i, q in enumerate(pids) if q == pid]
        if n >= 4:  # no replacement: each image at most once per epoch, whole chunks of K
            assert max(used) <= 1 and sum(used) % 4 == 0
            unused_chunks[pid] = n // 4 - sum(used) // 4
        else:  # fewer than K images: one chunk of K drawn with replacement
            assert sum(used) in (0, 4)
            unused_chunks[pid] = 1 - sum(used) // 4
    # the epoch ends only when fewer than P identities have chunks left
    assert min(unused_chunks.values()) >= 0
    assert sum(1 for c in unused_chunks.values() if c > 0) <= 2


def test_pk_determinism_and_epochs() -> None:
    recs = _records()
    a = RandomIdentitySampler(recs, 8, 4, seed=0)
    b = RandomIdentitySampler([r.pid for r in recs], 8, 4, seed=0)  # pids work too
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e0 != e1
    a.set_epoch(0)
    assert list(a) == e0
    assert list(RandomIdentitySampler(recs, 8, 4, seed=1)) != e0


def test_pk_errors() -> None:
    recs = _records()
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler(recs, 10, 4)
    with pytest.raises(ValueError, match="needs 11 identities"):
        RandomIdentitySampler(recs, 44, 4)


def test_pk_with_dataloader() -> None:
    recs = _records()
    pids = torch.tensor([r.pid for r in recs])
    sampler = RandomIdentitySampler(recs, 8, 2, seed=0)
    loader = DataLoader(TensorDataset(pids), batch_size=8, sampler=sampler, drop_last=True)
    n = 0
    for (batch_pids,) in loader:
        counts = Counter(batch_pids.tolist())
        assert len(counts) == 4 and set(counts.values()) == {2}
        n += 1
    assert n == len(sampler) // 8


def test_distributed_sampler_partitions_identities() -> None:
    recs = _records()
    pids = [r.pid for r in recs]
    world, batch, k = 2, 8, 4
    ranks = [
        DistributedRandomIdentitySampler(recs, batch, k, num_replicas=world, rank=r, seed=5)
        for r in range(world)
    ]
    per_rank = [_batches(list(s), batch) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) // batch > 0
    reference = RandomIdentitySampler(recs, batch * world, k, seed=5)  # the global batches
    for step, global_batch in enumerate(_batches(list(reference), batch * world)):
        b0, b1 = per_rank[0][step], per_rank[1][step]
        _check_pk(b0, pids, p=2, k=4)
        _check_pk(b1, pids, p=2, k=4)
        assert not {pids[i] for i in b0} & {pids[i] for i in b1}  # identities split across ranks
        assert b0 + b1 == global_batch
    for s in ranks:
        s.set_epoch(3)
    reference.set_epoch(3)
    assert list(ranks[0]) + list(ranks[1]) != [] and list(ranks[0]) == [
        i for b in _batches(list(reference), 16) for i in b[:8]
    ]
    with pytest.raises(ValueError, match="rank 2 outside"):
        DistributedRandomIdentitySampler(recs, 8, 4, num_replicas=2, rank=2)


def test_generic_wrapper_keeps_batches_balanced() -> None:
    """ev-core's DistributedSamplerWrapper interleaves indices: rank batches of size B from a
    global P×K sampler of batch W·B hold W·P identities with K/W images each."""
    recs = _records()
    pids = [r.pid for r in recs]
    world, batch, k = 2, 8, 4
    base = RandomIdentitySampler(recs, batch * world, k, seed=2)
    wrapped = [DistributedSamplerWrapper(base, num_replicas=world, rank=r) for r in range(world)]
    global_batches = _batches(list(base), batch * world)
    for r, sampler in enumerate(wrapped):
        for step, b in enumerate(_batches(list(sampler), batch)):
            _check_pk(b, pids, p=4, k=2)
            assert b == global_batches[step][r::world]
    for w in wrapped:
        w.set_epoch(4)  # forwarded to the P×K sampler
    assert base.epoch == 4
