"""Point-cloud ops with pytorch3d's semantics: k-NN, ball query, farthest-point sampling,
three-NN interpolation and grouping.

Signatures, return types, padding values and gradients follow ``pytorch3d.ops`` 0.7.x (see
each function). The work is done by the backend :func:`resolve_backend` picks (see
:mod:`ev_points.ops.backends`): ``native`` -- ev-points' own implementation, a kd-tree for
k-NN / ball query on the CPU and chunked brute force in torch elsewhere -- or ``pytorch3d``
when it is installed and measured faster for the call (``backend="native"`` or
``EV_POINTS_BACKEND=native`` forces one).
"""

from ev_points.ops._common import KNN, PointOpsError, knn_gather, masked_gather
from ev_points.ops.backends import BACKENDS, backend_status, kdtree_status, resolve_backend
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
    "kdtree_status",
    "knn_gather",
    "knn_points",
    "masked_gather",
    "resolve_backend",
    "sample_farthest_points",
    "three_interpolate",
    "three_nn",
]
