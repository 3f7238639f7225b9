"""Searchable gallery indexes (faiss flat / IVF-PQ / HNSW, or exact torch) with records."""

from ev_reid.retrieval.index import (
    IndexBackend,
    IndexConfig,
    IndexFileError,
    ReidIndex,
    SearchHit,
    backend_problems,
    recall_at_k,
    select_index_backend,
)

__all__ = [
    "IndexBackend",
    "IndexConfig",
    "IndexFileError",
    "ReidIndex",
    "SearchHit",
    "backend_problems",
    "recall_at_k",
    "select_index_backend",
]
