"""Point-cloud ops with pytorch3d's semantics: k-NN, ball query, farthest-point sampling,
three-NN interpolation and grouping.

Signatures, return types, padding values and gradients follow ``pytorch3d.ops`` 0.7.x (see
each function). The work is done by the backend :func:`resolve_backend` picks: pytorch3d when
it is importable and supports the input, else the vectorised ``native`` PyTorch backend
(``backend="native"`` or ``EV_POINTS_BACKEND=native`` forces it).
"""

from ev_points.ops._common import KNN, PointOpsError, knn_gather, masked_gather
from ev_points.ops.backends import BACKENDS, backend_status, resolve_backend
from ev_points.ops.functional import ball_query, knn_points, sample_farthest_points
from ev_points.ops.grouping import (
    group_points,
    interpolate_features,
    three_interpolate,
    three_nn,
)

__all__ = [
    "BACKENDS",
    "KNN",
    "PointOpsError",
    "backend_status",
    "ball_query",
    "group_points",
    "interpolate_features",
    "knn_gather",
    "knn_points",
    "masked_gather",
    "resolve_backend",
    "sample_farthest_points",
    "three_interpolate",
    "three_nn",
]
