"""Re-id evaluation: CMC/mAP/mINP (Market and CUHK03 protocols), re-ranking, features.

``evaluate_rank`` takes a distance matrix (torchreid/fast-reid argument order);
``evaluate_features`` never builds one. See :mod:`ev_reid.evaluation.rank`.
"""

from ev_reid.evaluation.distance import (
    ROW_BLOCK,
    Metric,
    iter_distance_chunks,
    pairwise_distance,
    prepare_features,
    topk_smallest,
)
from ev_reid.evaluation.extract import extract_features
from ev_reid.evaluation.rank import RankResult, evaluate_features, evaluate_rank
from ev_reid.evaluation.rerank import (
    KnnBackend,
    RerankConfig,
    RerankConvention,
    average_query_expansion,
    k_reciprocal_rerank,
    k_reciprocal_rerank_topk,
    rerank_chunks,
)

__all__ = [
    "ROW_BLOCK",
    "KnnBackend",
    "Metric",
    "RankResult",
    "RerankConfig",
    "RerankConvention",
    "average_query_expansion",
    "evaluate_features",
    "evaluate_rank",
    "extract_features",
    "iter_distance_chunks",
    "k_reciprocal_rerank",
    "k_reciprocal_rerank_topk",
    "pairwise_distance",
    "prepare_features",
    "rerank_chunks",
    "topk_smallest",
]
