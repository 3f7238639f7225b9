"""The engine's state, results, errors and hooks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ev_core.errors import EvError

if TYPE_CHECKING:
    from ev_core.training.engine import Engine

__all__ = ["FitResult", "Hook", "NonFiniteLossError", "StepFn", "TrainState"]

StepFn = Callable[[nn.Module, Any, "Engine"], Mapping[str, Tensor]]
"""``step_fn(model, batch, engine) -> {"loss": total, "<term>": value, ...}`` for one micro-batch."""


class NonFiniteLossError(EvError):
    """A loss term (or the gradient norm) became NaN/Inf; training stopped before the update.

    Attributes:
        step: the optimizer step that was being computed (1-based).
        term: the name of the first non-finite term (``"gradient norm"`` for gradients).
        value: its value.
        checkpoint: the last good checkpoint, kept untouched (``None`` if there is none).
    """

    def __init__(self, step: int, term: str, value: float, checkpoint: Path | None) -> None:
        self.step, self.term, self.value, self.checkpoint = step, term, value, checkpoint
        kept = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
        super().__init__(
            f"non-finite {term} ({value}) at step {step}: training stopped before the update{kept} "
            "(lower the learning rate, enable gradient clipping or check the data)"
        )


@dataclass
class TrainState:
    """Where a run is. Saved in every checkpoint.

    Attributes:
        epoch: the current epoch (0-based; equals ``epochs`` when training is over).
        step: optimizer steps done.
        batch_in_epoch: micro-batches consumed in the current epoch.
        initial_loss: the first micro-batch's loss of the run (for the divergence warning).
        diverged: whether the divergence warning was given.
        epoch_end_pending: the checkpoint was written at an epoch's end, before that epoch's
            ``on_epoch_end`` hooks and evaluation ran (a resume from it runs them first).
    """

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    initial_loss: float | None = None
    diverged: bool = False
    epoch_end_pending: bool = False


@dataclass
class FitResult:
    """What :meth:`Engine.fit` returns.

    Attributes:
        state: the final :class:`TrainState`.
        history: every line written to ``metrics.jsonl`` (training logs and evaluations).
        finished: ``False`` when ``stop_at_step`` ended the call early.
        checkpoint: the newest complete checkpoint folder (``None`` without ``out_dir``).
    """

    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = True
    checkpoint: Path | None = None


class Hook:
    """Extension points of the loop; override what you need (every method gets the engine)."""

    def on_fit_start(self, engine: Engine) -> None:
        """Before the first step (after resuming)."""

    def on_epoch_start(self, engine: Engine, epoch: int) -> None:
        """Before the first micro-batch of ``epoch``."""

    def on_step_end(self, engine: Engine, logs: Mapping[str, float]) -> None:
        """After each optimizer step; ``logs`` holds the step's mean loss terms, lr, grad norm."""

    def on_epoch_end(self, engine: Engine, epoch: int) -> None:
        """After ``epoch`` is complete and its checkpoint written (re-run on resume when the
        process died between that checkpoint and the next one)."""

    def on_eval(self, engine: Engine, epoch: int) -> Mapping[str, float] | None:
        """Every ``eval_every`` epochs, after the checkpoint; returned metrics are logged (re-run on
        resume when the process died between that checkpoint and the next one)."""
        return None

    def on_fit_end(self, engine: Engine) -> None:
        """After the last step (also when ``stop_at_step`` ended the call)."""

    def state_dict(self) -> dict[str, Any]:
        """State saved with each checkpoint (tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
