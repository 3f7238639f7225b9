"""ev-adapt: Semi-supervised domain adaptation: MCL (multi-level consistency learning)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ev-adapt")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
