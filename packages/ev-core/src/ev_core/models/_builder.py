"""Model builder of the ev models: dataclass configs → timm models, pretrained configs, and the
official-checkpoint filter.

Every ev model takes ``(cfg=None, **overrides)``: its dataclass config is the single source of
defaults, keyword arguments override fields (timm passes ``num_classes``, ``in_chans``,
``img_size``, ... this way) and unknown names fail with the list of options. The registered
config of a name is what ``timm.create_model(name)`` builds (:func:`build_ev_model` hands it to
timm's ``build_model_with_cfg`` as ``model_cfg``).

Our state-dict names equal the official ones, so :func:`checkpoint_filter_fn` only unwraps the
checkpoint container, strips ``module.`` prefixes and re-derives the fixed
``relative_position_index`` buffers from the model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TypeVar

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from torch import Tensor, nn

from ev_core.registry import get_model_config

__all__ = ["build_ev_model", "checkpoint_filter_fn", "pretrained_cfg", "resolve_config"]

C = TypeVar("C")


def resolve_config(cls: type[C], cfg: C | None, overrides: dict[str, Any]) -> C:
    """``cfg`` (default ``cls()``) with ``overrides`` applied; lists become tuples.

    Raises:
        TypeError: ``cfg`` is not a ``cls`` or an override names no field of ``cls``.
    """
    if cfg is None:
        cfg = cls()
    elif not isinstance(cfg, cls):
        raise TypeError(f"cfg must be a {cls.__name__}, got {type(cfg).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(
            f"{cls.__name__} has no option(s) {', '.join(unknown)}; options: "
            f"{', '.join(sorted(names))}"
        )
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(cfg, **fixed)  # type: ignore[type-var]


def pretrained_cfg(first_conv: str = "patch_embed.proj", **kwargs: Any) -> dict[str, Any]:
    """timm pretrained config of an ImageNet-1k LIT-family model (no hosted weights: load an
    official checkpoint with ``pretrained_cfg_overlay=dict(file=PATH)``)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """Map an official LIT / LITv2 checkpoint to this implementation's state dict.

    Accepts the state dict itself or a training checkpoint holding it under ``model`` (official
    releases) or ``state_dict``; strips DataParallel ``module.`` prefixes; replaces the fixed
    ``relative_position_index`` buffers with the model's own (they are derived, not learned).
    Names are otherwise identical, so any other mismatch surfaces in the strict load.

    Args:
        state_dict: the loaded checkpoint.
        model: the model the weights are for.

    Returns:
        A state dict for ``model.load_state_dict``.
    """
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        k = re.sub(r"^module\.", "", k)
        if k.endswith("relative_position_index") and k in own:
            v = own[k].clone()
        out[k] = v
    return out


def build_ev_model(cls: type[nn.Module], variant: str, pretrained: bool, **kwargs: Any) -> Any:
    """Build the registered ``variant`` through timm (pretrained loading, ``features_only``).

    Args:
        cls: the model class (``cls(cfg=..., **overrides)``).
        variant: registered model name; its dataclass config gives the defaults.
        pretrained: load ``pretrained_cfg_overlay=dict(file=...)`` weights.
        **kwargs: config overrides and timm's own options.
    """
    return build_model_with_cfg(
        cls,
        variant,
        pretrained,
        model_cfg=get_model_config(variant),
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs,
    )
