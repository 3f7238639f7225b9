"""ev-compress: Mesa (8-bit activation memory-saving training), EcoFormer (binary-hash linear attention) and SPViT (single-path MSA→conv pruning) for timm and ev models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ev-compress")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
