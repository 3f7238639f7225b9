"""ev-core: the shared core of the ev efficient-vision toolkit.

Importing :mod:`ev_core` registers every ev model with timm, so that
``timm.create_model("litv2_s")`` works afterwards.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ev-core")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

from ev_core import models
from ev_core.registry import get_model_config, list_ev_models

__all__ = ["__version__", "get_model_config", "list_ev_models", "models"]
