"""ev-video: Video: decord loaders, STPT temporal action detection, THUMOS14 evaluation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ev-video")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
