"""Checkpoints: weights as safetensors plus a JSON config, written atomically.

``save_checkpoint("run/model.safetensors", model.state_dict(), config=cfg)`` writes
``run/model.safetensors`` and ``run/model.json`` (the config and metadata). Pickled files
(official ``.pth`` checkpoints, training state for resume) are only ever read with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ev_core.io import atomic_write, to_jsonable, write_json

__all__ = [
    "config_path_for",
    "load_checkpoint",
    "load_torch_file",
    "save_checkpoint",
    "save_training_state",
    "unwrap_state_dict",
]


def config_path_for(weights_path: str | os.PathLike[str]) -> Path:
    """The JSON file that accompanies a safetensors checkpoint (same stem, ``.json``)."""
    return Path(weights_path).with_suffix(".json")


def _untie(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make tensors safetensors can store: detached, contiguous, and no shared storage."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        t = value.detach()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if ident in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        else:
            seen.add(ident)
        out[key] = t.cpu() if t.device.type != "cpu" else t
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    config: Any = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save weights as safetensors and the config (+ metadata) as JSON beside them, atomically.

    Args:
        path: destination ``.safetensors`` file.
        state_dict: name → tensor mapping (e.g. ``model.state_dict()``).
        config: the model/run config (dataclass or mapping), stored under ``"config"``.
        metadata: extra JSON-able information (epoch, metrics, ...), stored under ``"metadata"``.

    Returns:
        The weights path.
    """
    weights = Path(path)
    if weights.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {weights}")
    tensors = _untie(state_dict)
    atomic_write(weights, lambda p: save_file(tensors, str(p)))
    write_json(
        config_path_for(weights),
        {"config": to_jsonable(config), "metadata": to_jsonable(dict(metadata or {}))},
    )
    return weights


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Returns:
        ``(state_dict, info)`` where ``info`` has the keys ``"config"`` and ``"metadata"``
        (empty when the JSON file is absent, e.g. for third-party safetensors files).

    Raises:
        FileNotFoundError: if the weights file does not exist.
    """
    weights = Path(path)
    if not weights.is_file():
        raise FileNotFoundError(f"no checkpoint at {weights}")
    state = load_file(str(weights), device=str(map_location))
    cfg_file = config_path_for(weights)
    info: dict[str, Any] = {"config": None, "metadata": {}}
    if cfg_file.is_file():
        info.update(json.loads(cfg_file.read_text(encoding="utf-8")))
    return state, info


def load_torch_file(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """Read a pickled PyTorch file safely (``weights_only=True``: tensors and plain containers).

    Raises:
        FileNotFoundError: if the file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no file at {p}")
    return torch.load(p, map_location=map_location, weights_only=True)


def unwrap_state_dict(
    obj: Any, keys: tuple[str, ...] = ("model", "state_dict", "model_ema")
) -> dict[str, torch.Tensor]:
    """Return the state dict inside a loaded checkpoint object.

    Official checkpoints hold the state dict directly or under one of ``keys``; a
    ``module.`` prefix left by DataParallel/DDP is removed.

    Raises:
        ValueError: if no mapping of tensors can be found.
    """
    if isinstance(obj, Mapping):
        for key in keys:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"no state dict found: expected a mapping of tensors, possibly under one of {keys}"
        )
    out = {str(k): v for k, v in obj.items()}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def save_training_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Atomically ``torch.save`` a resume state (model/optimizer/scaler state dicts, step, RNG).

    Only tensors and plain containers should be stored so that it can be read back with
    :func:`load_torch_file` (``weights_only=True``).
    """
    return atomic_write(path, lambda p: torch.save(dict(state), p))
