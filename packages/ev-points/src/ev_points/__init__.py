"""ev-points: Point clouds: pytorch3d-compatible ops in pure torch (pytorch3d optional) and PointMatch weakly-supervised segmentation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ev-points")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
