"""Point-cloud networks built on :mod:`ev_points.ops`."""

from ev_points.models.unet import PointPyramid, PointUNet, PointUNetConfig, build_pyramid

__all__ = ["PointPyramid", "PointUNet", "PointUNetConfig", "build_pyramid"]
