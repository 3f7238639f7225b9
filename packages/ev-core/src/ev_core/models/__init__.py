"""ev models, registered with timm on import.

* LIT: ``lit_ti`` (PVT-based), ``lit_s``, ``lit_m``, ``lit_b`` (Swin-based).
* LITv2: ``litv2_s``, ``litv2_m``, ``litv2_b``.
* :func:`compile_model`: the ``torch.compile`` recipe (dynamic batch without recompiles,
  freezing for inference).
"""

from ev_core.models._builder import checkpoint_filter_fn
from ev_core.models.compile import CompiledModel, compile_model
from ev_core.models.lit import LIT, LITConfig, LITTi, LITTiConfig
from ev_core.models.litv2 import LITv2, LITv2Config

__all__ = [
    "LIT",
    "CompiledModel",
    "LITConfig",
    "LITTi",
    "LITTiConfig",
    "LITv2",
    "LITv2Config",
    "checkpoint_filter_fn",
    "compile_model",
]
