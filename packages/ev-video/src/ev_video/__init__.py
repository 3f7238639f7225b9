"""ev-video: temporal action detection for PyTorch.

Subpackages: :mod:`ev_video.io` (decord / PyAV ``VideoReader``, clip samplers),
:mod:`ev_video.datasets` (THUMOS14 / ActivityNet annotations, synthetic videos, windows),
:mod:`ev_video.models` (STPT), :mod:`ev_video.evaluation` (detection mAP, AR@AN),
:mod:`ev_video.train` and :mod:`ev_video.inference`. Video backends are imported lazily.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ev-video")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
