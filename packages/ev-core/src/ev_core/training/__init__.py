"""``ev_core.training``: the one training layer every ev loop runs on.

:class:`Engine` runs a loop around a user step function (AMP, accumulation, clipping, EMA,
DDP, epoch seeding, non-finite-loss stop, progress, ``metrics.jsonl``, atomic resumable
checkpoints); :class:`EngineConfig` holds its settings. See ev-core's README for an example.
"""

from ev_core.training.checkpoints import CheckpointManager
from ev_core.training.config import EngineConfig
from ev_core.training.ema import ModelEma
from ev_core.training.engine import Engine
from ev_core.training.runtime import (
    autocast,
    capture_rng,
    check_writable,
    epoch_seed,
    move_to_device,
    resolve_amp_dtype,
    resolve_device,
    restore_rng,
    seed_rngs,
)
from ev_core.training.state import FitResult, Hook, NonFiniteLossError, StepFn, TrainState

__all__ = [
    "CheckpointManager",
    "Engine",
    "EngineConfig",
    "FitResult",
    "Hook",
    "ModelEma",
    "NonFiniteLossError",
    "StepFn",
    "TrainState",
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
