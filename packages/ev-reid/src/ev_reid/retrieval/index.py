"""A searchable index of gallery features with their records (image path, person id, camera).

Backends (:class:`IndexBackend`):

- ``TORCH``: exact search, one matrix product and one ``topk`` per chunk of queries, on CPU or
  CUDA; needs nothing beyond torch. Equal distances are returned in ascending gallery order
  (also across the ``k``-th place). Saved as safetensors (:mod:`ev_core.checkpoint`).
- ``FAISS_FLAT``: exact faiss ``IndexFlatIP`` (cosine, on L2-normalised features) or
  ``IndexFlatL2`` (squared Euclidean). Tie order (faiss 1.15, checked by
  ``tests/test_retrieval.py``): within the ``k`` results, equal distances are re-sorted here
  by ascending gallery index, as with ``TORCH``. *Which* of several entries tied at the
  ``k``-th place are returned is faiss's choice: ``IndexFlatL2`` keeps the lowest indices
  (as ``TORCH``), ``IndexFlatIP`` (cosine) keeps a heap-dependent subset that is not the
  lowest indices. Scores are float32 sums in faiss's own order, so vectors at equal distance
  in exact arithmetic can also differ in the last bit and then come in either order.
- ``FAISS_IVFPQ``: approximate inverted lists with product quantisation (trained on the first
  :meth:`ReidIndex.add`).
- ``FAISS_HNSW``: approximate HNSW graph (CPU only in faiss).
- ``AUTO``: ``FAISS_FLAT`` when faiss is installed, otherwise ``TORCH``.

faiss is imported lazily (``pip install ev-reid[faiss]``); faiss-gpu is used for the flat and
IVF-PQ backends when it is installed, CUDA is available and ``device`` is ``"cuda"``.
Distances follow :class:`~ev_reid.evaluation.distance.Metric`: ``1 - cos`` or squared L2.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ev_core.checkpoint import load_checkpoint, save_checkpoint
from ev_core.errors import EvError
from ev_core.io import write_json
from ev_reid.evaluation.distance import Metric, prepare_features, topk_smallest
from ev_reid.records import ReidRecord

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

_FAISS_HINT = "faiss not installed: pip install ev-reid[faiss]"
_FORMAT_VERSION = 1


class IndexBackend(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11)
    """Search backend of a :class:`ReidIndex` (see the module docstring)."""

    AUTO = "auto"
    TORCH = "torch"
    FAISS_FLAT = "faiss-flat"
    FAISS_IVFPQ = "faiss-ivfpq"
    FAISS_HNSW = "faiss-hnsw"

    @property
    def exact(self) -> bool:
        """Whether the backend returns the exact nearest neighbours."""
        return self in (IndexBackend.TORCH, IndexBackend.FAISS_FLAT)


@dataclass(frozen=True)
class IndexConfig:
    """How a :class:`ReidIndex` is built and searched.

    Attributes:
        backend: search backend.
        metric: ``"cosine"`` (inner product on L2-normalised features) or ``"euclidean"``.
        device: ``"cpu"`` or ``"cuda"`` (torch backend; faiss-gpu for flat/IVF-PQ).
        nlist: IVF lists (default ``4·sqrt(N)`` at training, at most ``N / 39``).
        pq_m: PQ sub-quantisers (must divide the feature dimension).
        pq_bits: bits per PQ code.
        nprobe: IVF lists visited per query.
        hnsw_m: HNSW neighbours per node.
        ef_construction: HNSW build beam.
        ef_search: HNSW search beam.
        query_chunk: queries per chunk of the torch backend.
    """

    backend: IndexBackend = IndexBackend.AUTO
    metric: Metric = Metric.COSINE
    device: str = "cpu"
    nlist: int | None = None
    pq_m: int = 64
    pq_bits: int = 8
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    query_chunk: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", IndexBackend(self.backend))
        object.__setattr__(self, "metric", Metric(self.metric))
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string, got {self.device!r}")
        names = ("pq_m", "pq_bits", "nprobe", "hnsw_m", "ef_construction", "ef_search")
        for name in (*names, "query_chunk", "nlist"):
            value = getattr(self, name)
            if name == "nlist" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class IndexFileError(EvError, ValueError):
    """A saved index (``index.json`` and its data file) is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class SearchHit:
    """One ranked result: the gallery row, its record and its distance to the query."""

    rank: int
    index: int
    distance: float
    record: ReidRecord


def _import_faiss() -> Any | None:
    try:
        return importlib.import_module("faiss")
    except ImportError:
        return None


def _faiss_gpu_ok(faiss: Any) -> bool:
    return (
        hasattr(faiss, "StandardGpuResources")
        and torch.cuda.is_available()
        and int(getattr(faiss, "get_num_gpus", lambda: 0)()) > 0
    )


def backend_problems(config: IndexConfig) -> dict[IndexBackend, str]:
    """Why each concrete backend cannot run with ``config`` (absent keys can run)."""
    problems: dict[IndexBackend, str] = {}
    cuda = config.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        problems[IndexBackend.TORCH] = "device 'cuda' requested but torch sees no CUDA device"
    faiss = _import_faiss()
    for b in (IndexBackend.FAISS_FLAT, IndexBackend.FAISS_IVFPQ, IndexBackend.FAISS_HNSW):
        if faiss is None:
            problems[b] = _FAISS_HINT
        elif cuda and b is IndexBackend.FAISS_HNSW:
            problems[b] = "faiss has no GPU HNSW index: use device 'cpu'"
        elif cuda and not _faiss_gpu_ok(faiss):
            problems[b] = "device 'cuda' needs faiss-gpu and a CUDA device (CPU faiss installed)"
    return problems


def select_index_backend(config: IndexConfig) -> IndexBackend:
    """The concrete index backend ``config`` selects (``AUTO``: faiss flat, else torch).

    Raises:
        RuntimeError: naming, for every backend, why it cannot run.
    """
    problems = backend_problems(config)
    if config.backend is IndexBackend.AUTO:
        for b in (IndexBackend.FAISS_FLAT, IndexBackend.TORCH):
            if b not in problems:
                return b
    elif config.backend not in problems:
        return config.backend
    lines = "; ".join(f"{b.value}: {why}" for b, why in problems.items())
    usable = [b.value for b in IndexBackend if b is not IndexBackend.AUTO and b not in problems]
    raise RuntimeError(
        f"index backend {config.backend.value!r} cannot run ({lines}); usable: {usable or 'none'}"
    )


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Fraction of the exact top-k neighbours that the approximate search returned.

    Args:
        approx: ``[Q, k]`` indices from an approximate index (``-1`` = missing).
        exact: ``[Q, k]`` indices from an exact index.

    Returns:
        ``|approx ∩ exact| / (Q·k)`` averaged over queries.
    """
    if approx.shape != exact.shape or approx.ndim != 2:
        raise ValueError(f"shapes differ: {tuple(approx.shape)} vs {tuple(exact.shape)}")
    if approx.numel() == 0:
        raise ValueError("empty neighbour lists")
    hit = (approx[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    return float(hit.any(1).sum()) / exact.numel()


def _sort_ties_by_index(dist: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``(dist, idx)`` ordered by (distance, index): ``[Q, k]`` sorts, no full pass."""
    by_idx = torch.sort(idx, dim=1).indices
    dist, idx = dist.gather(1, by_idx), idx.gather(1, by_idx)
    by_dist = torch.sort(dist, dim=1, stable=True).indices
    return dist.gather(1, by_dist), idx.gather(1, by_dist)


class ReidIndex:
    """Gallery features plus their :class:`~ev_reid.records.ReidRecord` rows, searchable.

    Example::

        index = ReidIndex.build(gallery_feats, gallery_records, IndexConfig(backend="faiss-hnsw"))
        hits = index.search(query_feats, k=10)  # hits[q][0].record.path is the best match
        index.save("runs/index")
        index = ReidIndex.load("runs/index")

    Args:
        dim: feature dimension.
        config: backend and parameters.
    """

    def __init__(self, dim: int, config: IndexConfig | None = None) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.config = config or IndexConfig()
        self.backend = select_index_backend(self.config)
        self.records: list[ReidRecord] = []
        self._feats: torch.Tensor | None = None  # torch backend
        self._faiss_index: Any = None
        self._on_gpu = False
        if self.backend in (IndexBackend.FAISS_IVFPQ,) and dim % self.config.pq_m:
            raise ValueError(f"pq_m={self.config.pq_m} must divide the feature dim {dim}")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        features: torch.Tensor,
        records: Sequence[ReidRecord],
        config: IndexConfig | None = None,
    ) -> ReidIndex:
        """A new index holding ``features: [N, D]`` and their ``records``."""
        index = cls(features.shape[1], config)
        index.add(features, records)
        return index

    def __len__(self) -> int:
        return len(self.records)

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {tuple(features.shape)}")
        return prepare_features(features.detach(), self.config.metric)

    def _new_faiss_index(self, train: np.ndarray) -> Any:
        faiss = _import_faiss()
        assert faiss is not None
        cfg, d = self.config, self.dim
        ip = cfg.metric is Metric.COSINE
        faiss_metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
        if self.backend is IndexBackend.FAISS_FLAT:
            index = faiss.IndexFlatIP(d) if ip else faiss.IndexFlatL2(d)
        elif self.backend is IndexBackend.FAISS_HNSW:
            index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss_metric)
            index.hnsw.efConstruction = cfg.ef_construction
            index.hnsw.efSearch = cfg.ef_search
        else:
            n = train.shape[0]
            nlist = cfg.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
            if n < max(nlist, 2**cfg.pq_bits):
                raise ValueError(
                    f"IVF-PQ needs at least max(nlist={nlist}, 2**pq_bits={2**cfg.pq_bits}) "
                    f"training vectors in the first add(), got {n}"
                )
            quantizer = faiss.IndexFlatIP(d) if ip else faiss.IndexFlatL2(d)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, cfg.pq_m, cfg.pq_bits, faiss_metric)
            index.train(train)
            index.nprobe = cfg.nprobe
        return self._maybe_to_gpu(index)

    def _maybe_to_gpu(self, index: Any) -> Any:
        if not self.config.device.startswith("cuda"):
            return index
        faiss = _import_faiss()
        assert faiss is not None
        self._gpu_res = faiss.StandardGpuResources()
        self._on_gpu = True
        dev = torch.device(self.config.device).index or 0
        return faiss.index_cpu_to_gpu(self._gpu_res, dev, index)

    def add(self, features: torch.Tensor, records: Sequence[ReidRecord]) -> None:
        """Append ``features: [N, D]`` with one record each.

        Raises:
            ValueError: on a length mismatch, a wrong dimension, or NaN/inf features.
        """
        if len(records) != features.shape[0]:
            raise ValueError(f"{features.shape[0]} features but {len(records)} records")
        if not all(isinstance(r, ReidRecord) for r in records):
            raise TypeError("records must be ReidRecord instances")
        x = self._prepare(features)
        if self.backend is IndexBackend.TORCH:
            x = x.to(self.config.device)
            self._feats = x if self._feats is None else torch.cat([self._feats, x])
        else:
            arr = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
            if self._faiss_index is None:
                self._faiss_index = self._new_faiss_index(arr)
            self._faiss_index.add(arr)
        self.records.extend(records)

    # -- search ---------------------------------------------------------------------------
    def _search_torch(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact search: per chunk of queries one ``q @ g.T`` and one ``topk`` of ``k + 1``.

        Ties are resolved by gallery index without extra passes over the scores in the
        common case: the ``k`` results are sorted by (distance, index), and only rows whose
        ``k``-th and ``(k+1)``-th scores are equal (the boundary is ambiguous) are redone
        with the tie-stable :func:`~ev_reid.evaluation.distance.topk_smallest`.
        """
        assert self._feats is not None
        g = self._feats
        n = g.shape[0]
        cosine = self.config.metric is Metric.COSINE
        g_sq = None if cosine else (g * g).sum(1)
        out_d = torch.empty((q.shape[0], k), dtype=g.dtype, device=g.device)
        out_i = torch.empty((q.shape[0], k), dtype=torch.int64, device=g.device)
        kk = min(k + 1, n)
        for s in range(0, q.shape[0], self.config.query_chunk):
            qc = q[s : s + self.config.query_chunk]
            # score to maximise: q·g (cosine) or 2 q·g - |g|² (= |q|² - squared L2)
            score = qc @ g.T
            if g_sq is not None:
                score.mul_(2.0).sub_(g_sq)
            val, idx = torch.topk(score, kk, dim=1, largest=True, sorted=True)
            if kk > k:  # rows whose k-th place ties with the next candidate
                amb = (val[:, k - 1] == val[:, k]).nonzero()[:, 0]
                val, idx = val[:, :k], idx[:, :k]
                if amb.numel():
                    v2, i2 = topk_smallest(score[amb].neg_(), k)
                    val[amb], idx[amb] = -v2, i2
            if cosine:
                dist = val.neg_().add_(1.0)
            else:
                dist = val.neg_().add_((qc * qc).sum(1, keepdim=True))
            # equal scores: ascending gallery index inside the k results
            dist, idx = _sort_ties_by_index(dist, idx)
            out_d[s : s + qc.shape[0]] = dist.clamp_(min=0.0)
            out_i[s : s + qc.shape[0]] = idx
        return out_d.cpu(), out_i.cpu()

    def search_arrays(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest gallery rows of each query.

        Args:
            features: ``[Q, D]`` query features.
            k: neighbours per query (at most ``len(self)``).

        Returns:
            ``(distances [Q, k] float32, indices [Q, k] int64)``, ascending distance
            (approximate backends may return ``-1`` indices when fewer than ``k`` are found).
        """
        if len(self) == 0:
            raise ValueError("the index is empty")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}], got {k}")
        q = self._prepare(features)
        if q.shape[0] == 0:  # like faiss: empty results, not an error
            return torch.empty((0, k), dtype=torch.float32), torch.empty((0, k), dtype=torch.int64)
        if self.backend is IndexBackend.TORCH:
            d, i = self._search_torch(q.to(self.config.device).to(self._feats_dtype()), k)
            return d.float(), i
        arr = np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32)
        scores, idx_np = self._faiss_index.search(arr, k)
        dist = torch.from_numpy(scores)
        idx = torch.from_numpy(idx_np).to(torch.int64)
        if self.config.metric is Metric.COSINE:
            dist = (1.0 - dist).clamp_(min=0.0)
        if self.backend is IndexBackend.FAISS_FLAT:  # equal distances by ascending index
            dist, idx = _sort_ties_by_index(dist, idx)
        return dist, idx

    def _feats_dtype(self) -> torch.dtype:
        assert self._feats is not None
        return self._feats.dtype

    def search(self, features: torch.Tensor, k: int = 10) -> list[list[SearchHit]]:
        """Ranked records for each query: ``result[q][r]`` is the ``r``-th best match."""
        dist, idx = self.search_arrays(features, k)
        out: list[list[SearchHit]] = []
        for drow, irow in zip(dist.tolist(), idx.tolist()):
            hits = [
                SearchHit(rank=r, index=i, distance=d, record=self.records[i])
                for r, (d, i) in enumerate(zip(drow, irow))
                if i >= 0
            ]
            out.append(hits)
        return out

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``index.json`` (config + records) and the index data into ``directory``.

        The torch backend stores ``features.safetensors``; faiss backends ``index.faiss``
        (GPU indexes are copied to the CPU first).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": _FORMAT_VERSION,
            "dim": self.dim,
            "backend": self.backend.value,
            "config": asdict(self.config),
            "records": [asdict(r) for r in self.records],
        }
        if self.backend is IndexBackend.TORCH:
            feats = self._feats if self._feats is not None else torch.zeros(0, self.dim)
            save_checkpoint(
                out / "features.safetensors",
                {"features": feats.cpu()},
                metadata={"dim": self.dim, "metric": self.config.metric.value},
            )
        else:
            faiss = _import_faiss()
            assert faiss is not None
            index = self._faiss_index
            if index is not None and self._on_gpu:
                index = faiss.index_gpu_to_cpu(index)
            if index is not None:
                faiss.write_index(index, str(out / "index.faiss"))
        write_json(out / "index.json", meta)
        return out

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> ReidIndex:
        """Read an index written by :meth:`save` (optionally onto another ``device``).

        Raises:
            IndexFileError: naming the file when ``index.json`` or the data file is missing,
                unreadable or inconsistent (vectors vs records, dimension, backend).
            RuntimeError: if the saved backend cannot run here (e.g. faiss missing).
        """
        src = Path(directory)
        meta_file = src / "index.json"
        dim, cfg_dict, records = _read_index_json(meta_file)
        if device is not None:
            cfg_dict["device"] = device
        try:
            config = IndexConfig(**cfg_dict)
        except (TypeError, ValueError) as exc:
            raise IndexFileError(f"invalid index config: {exc}", path=meta_file) from exc
        index = cls(dim, config)
        index.records = records
        if index.backend is IndexBackend.TORCH:
            data = src / "features.safetensors"
            try:
                state, _ = load_checkpoint(data)
                feats = state["features"]
            except Exception as exc:  # missing, truncated or not our safetensors file
                raise IndexFileError(f"cannot read the index features ({exc})", path=data) from exc
            if feats.ndim != 2 or (feats.shape[0] and feats.shape[1] != dim):
                raise IndexFileError(
                    f"features have shape {tuple(feats.shape)}, expected [N, {dim}]", path=data
                )
            feats = feats.to(index.config.device)
            index._feats = feats if feats.shape[0] else None
            n = feats.shape[0]
        else:
            faiss = _import_faiss()
            assert faiss is not None
            data = src / "index.faiss"
            n = 0
            if index.records:
                if not data.is_file():
                    raise IndexFileError("index data missing", path=data)
                try:
                    raw = faiss.read_index(str(data))
                except Exception as exc:  # faiss raises RuntimeError on a corrupt file
                    raise IndexFileError(f"cannot read the faiss index ({exc})", path=data) from exc
                if int(raw.d) != dim:
                    raise IndexFileError(f"faiss index has dim {raw.d}, expected {dim}", path=data)
                index._faiss_index = index._maybe_to_gpu(raw)
                if index.backend is IndexBackend.FAISS_IVFPQ:
                    faiss.extract_index_ivf(index._faiss_index).nprobe = index.config.nprobe
                n = int(index._faiss_index.ntotal)
        if n != len(index.records):
            raise IndexFileError(
                f"index holds {n} vectors but {len(index.records)} records", path=meta_file
            )
        return index


def _read_index_json(meta_file: Path) -> tuple[int, dict[str, Any], list[ReidRecord]]:
    """``(dim, config fields with the saved backend, records)`` of an ``index.json``."""
    if not meta_file.is_file():
        raise IndexFileError(
            f"no index at {meta_file.parent} (expected index.json)", path=meta_file
        )
    try:
        meta = json.loads(meta_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFileError(f"not valid JSON ({exc})", path=meta_file) from exc
    if not isinstance(meta, dict):
        raise IndexFileError("must hold a JSON object", path=meta_file)
    if meta.get("format_version") != _FORMAT_VERSION:
        raise IndexFileError(
            f"unsupported index format {meta.get('format_version')!r} (expected {_FORMAT_VERSION})",
            path=meta_file,
        )
    dim, cfg, recs = meta.get("dim"), meta.get("config"), meta.get("records")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise IndexFileError(f"'dim' must be a positive integer, got {dim!r}", path=meta_file)
    if not isinstance(cfg, dict) or not isinstance(recs, list):
        raise IndexFileError("needs a 'config' object and a 'records' list", path=meta_file)
    records = []
    for i, r in enumerate(recs):
        try:
            if not isinstance(r, dict):
                raise TypeError(f"not an object: {r!r:.40}")
            rec = ReidRecord(**r)
            ids = (rec.pid, rec.camid, rec.dsetid)
            if not isinstance(rec.path, str) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in ids
            ):
                raise TypeError("path must be a string, pid, camid and dsetid integers")
        except TypeError as exc:
            raise IndexFileError(f"record {i} is invalid: {exc}", path=meta_file) from None
        records.append(rec)
    fields = {k: v for k, v in cfg.items() if k in IndexConfig.__dataclass_fields__}
    fields["backend"] = meta.get("backend")
    if fields["backend"] not in [b.value for b in IndexBackend if b is not IndexBackend.AUTO]:
        raise IndexFileError(f"unknown backend {meta.get('backend')!r}", path=meta_file)
    return dim, fields, records
