"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEma"]


class ModelEma(nn.Module):
    """An averaged copy of a model, ``ema = decay·ema + (1−decay)·model`` after each step.

    Floating-point parameters and buffers are averaged; other buffers (counters, masks) are
    copied. The copy is kept in eval mode with gradients off.

    Args:
        model: the model to average (unwrapped, not DDP).
        decay: the decay in ``[0, 1)``.
        warmup: use ``min(decay, (1 + t) / (10 + t))`` at update ``t`` (timm's warm-up).
    """

    num_updates: torch.Tensor

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        t = int(self.num_updates)
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (same architecture) into the average."""
        decay = self.current_decay()
        ema_state = self.module.state_dict()
        model_state = model.state_dict()
        for name in model_state.keys() - ema_state.keys():
            self._adopt_buffer(name, model_state[name])
        for name, value in model_state.items():
            if name not in ema_state:
                continue  # adopted above as a copy
            target = ema_state[name]
            if target.is_floating_point():
                target.lerp_(value.detach().to(target.dtype), 1.0 - decay)
            else:
                target.copy_(value)
        self.num_updates += 1

    def _adopt_buffer(self, name: str, value: torch.Tensor) -> None:
        """Copy a buffer the model created after the EMA copy was made (e.g. lazily on its first
        forward, as Mesa's running estimates) into the matching submodule of the copy."""
        path, _, leaf = name.rpartition(".")
        owner = self.module.get_submodule(path) if path else self.module
        if hasattr(owner, leaf):
            raise RuntimeError(f"EMA copy: {name!r} exists but is not in the state dict")
        owner.register_buffer(leaf, value.detach().clone())

    def forward(self, *args: object, **kwargs: object) -> object:
        """Run the averaged model."""
        return self.module(*args, **kwargs)
