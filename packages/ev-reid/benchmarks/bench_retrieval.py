"""Retrieval index benchmark: build time, query time and recall@10 against exact search.

Synthetic gallery: ``N × 768`` features around 10,000 cluster centres (a re-id-like mixture;
uniformly random vectors would make every approximate index look bad). The exact faiss flat
index is the baseline row; recall@k of IVF-PQ and HNSW is measured against it. On a machine
with CUDA the torch backend also runs on the GPU (and faiss-gpu when installed).

    python packages/ev-reid/benchmarks/bench_retrieval.py --quick
    python packages/ev-reid/benchmarks/bench_retrieval.py --n 1000000 --out retrieval.json
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
from typing import Any

import torch

from ev_core.benchmark import BenchmarkSuite, measure_peak_memory
from ev_reid.records import ReidRecord
from ev_reid.retrieval import (
    IndexBackend,
    IndexConfig,
    ReidIndex,
    backend_problems,
    recall_at_k,
)


def clustered_features(n: int, dim: int, n_clusters: int, seed: int) -> torch.Tensor:
    """``[n, dim]`` float32: a random centre per row plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g)
    out = torch.empty(n, dim)
    for s in range(0, n, 1 << 16):  # build in blocks to keep temporaries small
        e = min(s + (1 << 16), n)
        out[s:e] = centres[torch.randint(0, n_clusters, (e - s,), generator=g)]
        out[s:e] += 0.7 * torch.randn(e - s, dim, generator=g)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (smoke test)")
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery size")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["torch", "ivfpq", "hnsw"],
        help="index types not to build (recorded as skipped rows), e.g. hnsw at 1M on 2 cores",
    )
    args = parser.parse_args()
    if args.quick:
        args.n, args.dim, args.queries = 20_000, 64, 100
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("EV_QUIET", "1")
    faiss: Any = importlib.import_module("faiss")  # the benchmark needs ev-reid[faiss]
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)

    n_clusters = max(10, min(10_000, args.n // 100))
    gallery = clustered_features(args.n, args.dim, n_clusters, seed=0)
    queries = clustered_features(args.queries, args.dim, n_clusters, seed=0)[: args.queries]
    queries += 0.1 * torch.randn(queries.shape, generator=torch.Generator().manual_seed(1))
    records = [
        ReidRecord(path=f"img_{i:07d}.jpg", pid=i % 4101, camid=i % 15) for i in range(args.n)
    ]

    suite = BenchmarkSuite("reid_retrieval", min_run_time=0.5 if args.quick else 2.0, warmup=1)
    suite.notes.update(n=args.n, dim=args.dim, queries=args.queries, k=args.k, clusters=n_clusters)
    group = f"search {args.queries} queries, N={args.n:,} x {args.dim}, k={args.k}"
    pq_m = 64 if args.dim % 64 == 0 else 8
    optional = {
        "torch": ("torch exact (cpu)", IndexConfig(backend=IndexBackend.TORCH), False),
        "ivfpq": (
            "faiss IVF-PQ",
            IndexConfig(backend=IndexBackend.FAISS_IVFPQ, pq_m=pq_m, nprobe=32),
            False,
        ),
        "hnsw": ("faiss HNSW", IndexConfig(backend=IndexBackend.FAISS_HNSW), False),
    }
    configs = [("faiss flat IP (exact)", IndexConfig(backend=IndexBackend.FAISS_FLAT), True)]
    for key, config in optional.items():
        if key in args.skip:
            suite.add_failure(config[0], group, "skipped with --skip")
        else:
            configs.append(config)
    if torch.cuda.is_available():
        configs.append(
            ("torch exact (cuda)", IndexConfig(backend=IndexBackend.TORCH, device="cuda"), False)
        )
        gpu_cfg = IndexConfig(backend=IndexBackend.FAISS_FLAT, device="cuda")
        if IndexBackend.FAISS_FLAT not in backend_problems(gpu_cfg):
            configs.append(("faiss-gpu flat IP (exact)", gpu_cfg, False))

    exact_idx: torch.Tensor | None = None
    for name, cfg, is_base in configs:
        built: dict[str, ReidIndex] = {}

        def build(cfg: IndexConfig = cfg, built: dict[str, ReidIndex] = built) -> None:
            built["index"] = ReidIndex.build(gallery, records, cfg)

        t0 = time.perf_counter()
        build_mib = measure_peak_memory(build)
        build_s = time.perf_counter() - t0
        index = built["index"]
        _, idx = index.search_arrays(queries, args.k)
        if is_base:
            exact_idx = idx
        assert exact_idx is not None

        def search(index: ReidIndex = index) -> None:
            index.search_arrays(queries, args.k)

        row = suite.add(
            name,
            search,
            group=group,
            baseline=is_base,
            items_per_call=args.queries,
            build_seconds=round(build_s, 3),
            build_peak_mib=round(build_mib, 1),
            recall_at_k=recall_at_k(idx, exact_idx),
        )
        print(f"{name}: build {build_s:.1f}s, recall@{args.k} {row.extra['recall_at_k']:.4f}")
        del built, index
    # the floor for an exact torch search: one product and one topk, no tie handling
    qn = torch.nn.functional.normalize(queries, dim=1)
    gn = torch.nn.functional.normalize(gallery, dim=1)

    def plain_topk() -> None:
        for s in range(0, qn.shape[0], 256):
            torch.topk(qn[s : s + 256] @ gn.T, args.k, dim=1)

    suite.add(
        "plain torch q @ g.T + topk (reference floor)",
        plain_topk,
        group=group,
        items_per_call=args.queries,
    )
    suite.print_table()
    if args.out:
        suite.write_json(args.out)


if __name__ == "__main__":
    main()
