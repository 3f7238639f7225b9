"""ev-reid: Person re-identification: datasets, UP-ReID pre-training, fine-tuning, faiss retrieval, CMC/mAP/mINP evaluation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ev-reid")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
