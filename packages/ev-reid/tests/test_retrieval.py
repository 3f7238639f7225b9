"""ReidIndex: exactness against brute force, save/load, approximate recall, backend errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ev_reid.retrieval.index as index_mod
from ev_reid.records import ReidRecord
from ev_reid.retrieval import (
    IndexBackend,
    IndexConfig,
    ReidIndex,
    SearchHit,
    recall_at_k,
    select_index_backend,
)


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """faiss' OpenMP pool fights torch's on the 2-core CI machines: use one thread in tests."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _records(n):
    return [ReidRecord(path=f"g/{i:05d}.jpg", pid=i % 37, camid=i % 6) for i in range(n)]


def _brute_force(q, g, metric, k):
    """Explicit float64 distances and a stable sort (ties by gallery index)."""
    q, g = q.double(), g.double()
    if metric == "cosine":
        qn = q / q.norm(dim=1, keepdim=True)
        gn = g / g.norm(dim=1, keepdim=True)
        d = 1 - qn @ gn.T
    else:
        d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d.numpy(), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d.numpy(), order, 1), order


def _clustered(n, dim, seed, n_clusters=50):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=g)
    return centers[torch.randint(0, n_clusters, (n,), generator=g)] + 0.3 * torch.randn(
        n, dim, generator=g
    )


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("backend", ["torch", "faiss-flat"])
def test_exact_backends_match_brute_force(backend, metric):
    g = torch.randn(700, 24, generator=torch.Generator().manual_seed(0))
    q = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    cfg = IndexConfig(backend=backend, metric=metric, query_chunk=16)  # several query chunks
    index = ReidIndex.build(g, _records(700), cfg)
    dist, idx = index.search_arrays(q, 10)
    ref_d, ref_i = _brute_force(q, g, metric, 10)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "faiss-flat"])
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_exact_backends_order_ties_by_gallery_index(backend, metric):
    # two groups of identical vectors (exactly representable scores): ties inside the k
    # results and across the k-th place; the documented order is ascending gallery index
    g = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6)
    g = g[torch.tensor([3, 7, 0, 9, 1, 11, 2, 5, 10, 4, 8, 6])]  # groups interleaved
    index = ReidIndex.build(g, _records(12), IndexConfig(backend=backend, metric=metric))
    dist, idx = index.search_arrays(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 8)
    group_b = [i for i in range(12) if g[i, 1] == 1]
    group_a = [i for i in range(12) if g[i, 0] == 1]
    assert idx[0, :6].tolist() == group_b and idx[1, :6].tolist() == group_a
    if backend == "faiss-flat" and metric == "cosine":
        # IndexFlatIP picks its own subset of the entries tied at the k-th place (documented)
        assert set(idx[0, 6:].tolist()) <= set(group_a) and idx[0, 6] < idx[0, 7]
        assert set(idx[1, 6:].tolist()) <= set(group_b) and idx[1, 6] < idx[1, 7]
    else:  # torch and IndexFlatL2: the lowest indices, in ascending order
        assert idx[0, 6:].tolist() == group_a[:2] and idx[1, 6:].tolist() == group_b[:2]
    far = 1.0 if metric == "cosine" else 2.0
    assert dist[0, :6].eq(0).all() and dist[0, 6:].eq(far).all()


@pytest.mark.parametrize("backend", ["torch", "faiss-flat", "faiss-hnsw"])
def test_empty_query_batch_gives_empty_results(backend):
    index = ReidIndex.build(_clustered(50, 8, seed=8), _records(50), IndexConfig(backend=backend))
    dist, idx = index.search_arrays(torch.empty(0, 8), 5)
    assert dist.shape == (0, 5) and idx.shape == (0, 5)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    assert index.search(torch.empty(0, 8), k=5) == []


@pytest.mark.parametrize("backend", ["torch", "faiss-flat", "faiss-ivfpq", "faiss-hnsw"])
def test_save_load_round_trip(backend, tmp_path):
    g = _clustered(600, 16, seed=2)
    q = _clustered(20, 16, seed=3)
    cfg = IndexConfig(backend=backend, nlist=8, pq_m=4, pq_bits=4, nprobe=4)
    index = ReidIndex(16, cfg)
    index.add(g[:300], _records(600)[:300])  # incremental adds
    index.add(g[300:], _records(600)[300:])
    hits = index.search(q, k=5)
    index.save(tmp_path / "idx")
    loaded = ReidIndex.load(tmp_path / "idx")
    assert loaded.backend is IndexBackend(backend) and len(loaded) == 600
    assert loaded.records == index.records
    assert loaded.search(q, k=5) == hits
    assert isinstance(hits[0][0], SearchHit) and hits[0][0].rank == 0
    assert hits[0][0].record == index.records[hits[0][0].index]
    assert [h.distance for h in hits[0]] == sorted(h.distance for h in hits[0])


def test_approximate_recall_is_reported():
    g = _clustered(2000, 32, seed=4)
    q = _clustered(100, 32, seed=5)
    exact = ReidIndex.build(g, _records(2000), IndexConfig(backend="faiss-flat"))
    _, ref = exact.search_arrays(q, 10)
    hnsw = ReidIndex.build(g, _records(2000), IndexConfig(backend="faiss-hnsw", ef_construction=64))
    ivfpq = ReidIndex.build(
        g,
        _records(2000),
        IndexConfig(backend="faiss-ivfpq", nlist=16, pq_m=8, pq_bits=6, nprobe=16),
    )
    r_hnsw = recall_at_k(hnsw.search_arrays(q, 10)[1], ref)
    r_pq = recall_at_k(ivfpq.search_arrays(q, 10)[1], ref)
    assert r_hnsw >= 0.95
    assert 0.3 <= r_pq < 1.0  # PQ codes are lossy; all lists are probed, so recall is high-ish
    assert recall_at_k(ref, ref) == 1.0


def test_recall_at_k_hand_case():
    approx = torch.tensor([[1, 2], [3, 4]])
    exact = torch.tensor([[2, 1], [3, 5]])
    assert recall_at_k(approx, exact) == 0.75  # {1,2} both found, {3,5} only 3
    assert recall_at_k(torch.tensor([[-1, -1]]), torch.tensor([[0, 1]])) == 0.0


def test_backend_errors(monkeypatch):
    monkeypatch.setattr(index_mod, "_import_faiss", lambda: None)
    with pytest.raises(RuntimeError, match=r"pip install ev-reid\[faiss\]"):
        select_index_backend(IndexConfig(backend="faiss-hnsw"))
    assert select_index_backend(IndexConfig()) is IndexBackend.TORCH  # auto falls back to torch
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            ReidIndex(8, IndexConfig(backend="torch", device="cuda"))


def test_input_validation():
    index = ReidIndex(8, IndexConfig(backend="torch"))
    with pytest.raises(ValueError, match="empty"):
        index.search_arrays(torch.randn(1, 8), 1)
    with pytest.raises(ValueError, match="2 features but 1 records"):
        index.add(torch.randn(2, 8), _records(1))
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        index.add(torch.randn(2, 9), _records(2))
    with pytest.raises(ValueError, match="pq_m=5 must divide"):
        ReidIndex(8, IndexConfig(backend="faiss-ivfpq", pq_m=5))


@pytest.mark.gpu
def test_torch_cuda_backend_matches_cpu():
    g = torch.randn(500, 16, generator=torch.Generator().manual_seed(6))
    q = torch.randn(30, 16, generator=torch.Generator().manual_seed(7))
    cpu = ReidIndex.build(g, _records(500), IndexConfig(backend="torch"))
    gpu = ReidIndex.build(g, _records(500), IndexConfig(backend="torch", device="cuda"))
    assert torch.equal(cpu.search_arrays(q, 10)[1], gpu.search_arrays(q, 10)[1])
