"""Loading a trained adaptation model back from its weights and JSON."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors import SafetensorError

from ev_adapt.models import AdaptModelConfig, AdaptNet, build_model
from ev_core.checkpoint import load_checkpoint
from ev_core.errors import EvError

__all__ = ["load_model"]


def load_model(weights: str | Path) -> tuple[AdaptNet, AdaptModelConfig]:
    """Rebuild the model saved by :func:`~ev_adapt.trainer.train_adaptation` (eval mode).

    Raises:
        EvError: naming the file when it is missing, damaged or has no model config.
    """
    path = Path(weights)
    try:
        state, info = load_checkpoint(path)
    except FileNotFoundError:
        raise EvError("no weights file", path=path) from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise EvError(f"cannot read the weights: {exc}", path=path) from None
    config = info.get("config")
    if not isinstance(config, dict):
        raise EvError(
            f"{path.with_suffix('.json')} beside the weights has no model config", path=path
        )
    try:
        model_config = AdaptModelConfig(**config)
    except TypeError as exc:
        raise EvError(
            f"the model config beside the weights is not an AdaptModelConfig: {exc}", path=path
        ) from None
    # the trained weights replace the backbone's: never fetch pretrained ones again
    model = build_model(dataclasses.replace(model_config, pretrained=False))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise EvError(
            f"the weights do not fit the model their config describes: {exc}", path=path
        ) from None
    return model.eval(), model_config
