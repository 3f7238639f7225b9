"""Model registry on top of timm's, with a dataclass config per model.

Every ev model is a timm model: :func:`register_ev_model` registers the entry-point function
with :func:`timm.models.register_model` and remembers the model's default configuration as a
dataclass, so that users (and checkpoints) can see the exact architecture a name stands for::

    @register_ev_model(LITv2Config(embed_dim=96, depths=(2, 2, 6, 2), ...))
    def litv2_s(pretrained: bool = False, **kwargs: Any) -> LITv2: ...

    cfg = ev_core.get_model_config("litv2_s")  # a fresh copy of the dataclass
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from timm.models import register_model

F = TypeVar("F", bound=Callable[..., Any])

_MODEL_CONFIGS: dict[str, Any] = {}


def register_ev_model(default_config: Any) -> Callable[[F], F]:
    """Register a model entry point with timm and record its default dataclass config.

    Args:
        default_config: a dataclass instance describing the architecture the name builds.

    Returns:
        A decorator for the entry-point function; the function's ``__name__`` is the model name.

    Raises:
        TypeError: if ``default_config`` is not a dataclass instance.
        ValueError: if a model of that name is already registered by ev.
    """
    if not dataclasses.is_dataclass(default_config) or isinstance(default_config, type):
        raise TypeError(
            f"register_ev_model expects a dataclass instance, got {type(default_config).__name__}"
        )

    def decorator(fn: F) -> F:
        name = fn.__name__
        if name in _MODEL_CONFIGS:
            raise ValueError(f"ev model {name!r} is registered twice")
        _MODEL_CONFIGS[name] = default_config
        register_model(fn)  # timm returns the function unchanged
        return fn

    return decorator


def get_model_config(name: str) -> Any:
    """Return a copy of the default dataclass config of the ev model ``name``.

    Raises:
        KeyError: with the list of known ev models if ``name`` is not one of them.
    """
    try:
        return copy.deepcopy(_MODEL_CONFIGS[name])
    except KeyError:
        known = ", ".join(sorted(_MODEL_CONFIGS)) or "(none registered)"
        raise KeyError(f"unknown ev model {name!r}; ev models: {known}") from None


def list_ev_models() -> list[str]:
    """Names of all registered ev models, sorted."""
    return sorted(_MODEL_CONFIGS)
