"""Device, AMP and RNG helpers shared by every ev training loop."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ev_core.errors import EvError

__all__ = [
    "autocast",
    "capture_rng",
    "check_writable",
    "epoch_seed",
    "move_to_device",
    "resolve_amp_dtype",
    "resolve_device",
    "restore_rng",
    "seed_rngs",
]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the local CUDA device when available (``LOCAL_RANK`` under torchrun), else CPU.

    Raises:
        EvError: for CUDA when no CUDA device is usable, or a malformed device string.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise EvError(f"--device {device!r} is not a device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvError(f"--device {device!r}: CUDA is not available on this machine")
    return dev


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (``"auto" | "off" | "bf16" | "fp16"``) on ``device``.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or ``None`` (full precision).

    Raises:
        EvError: for fp16 on the CPU or an unknown value.
    """
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise EvError(f"--amp fp16 needs a CUDA device (got {device}); use bf16 or off")
        return torch.float16
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise EvError(f"--amp must be auto, off, bf16 or fp16, got {amp!r}")


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device`` with ``dtype``, or a no-op when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Move every tensor inside ``batch`` (nested tuples/lists/dicts/dataclasses) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking and device.type == "cuda")
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        moved = {
            f.name: move_to_device(getattr(batch, f.name), device, non_blocking)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **moved)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device, non_blocking) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(move_to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (a folder) if needed and prove it writable with a probe file.

    Call it for every output folder before any expensive work.

    Raises:
        EvError: naming the folder when it cannot be created or written.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".ev-write-probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EvError(
            f"output folder is not writable: {exc.strerror or exc}", path=folder
        ) from None
    return folder


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of epoch ``epoch`` on ``rank``: distinct per (seed, epoch, rank), < 2**32."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**32)


def seed_rngs(seed: int, generator: torch.Generator | None = None) -> None:
    """Seed Python, NumPy, torch (every device) and ``generator`` (if given) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if generator is not None:
        generator.manual_seed(seed)


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG state as plain containers and tensors (loadable with ``weights_only=True``)."""
    np_state = cast(tuple[Any, ...], np.random.get_state())
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`capture_rng` captured."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
