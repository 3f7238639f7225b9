"""Layer helpers of the LIT-family models: per-stage argument checks, stochastic depth, init,
and the Swin-layout stage (:class:`LITStage`) with its builder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ev_core.layers.dtm import DeformableTokenMerging
from ev_core.layers.embed import LITBlock

__all__ = [
    "LITStage",
    "build_stages",
    "drop_path_rates",
    "init_weights",
    "per_stage",
    "set_grad_checkpointing",
    "to_2tuple",
]


def to_2tuple(v: int | Sequence[int]) -> tuple[int, int]:
    """``224 -> (224, 224)``; a pair is returned as a tuple of two ints."""
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return (t[0], t[1])


def per_stage(name: str, value: Sequence[Any], num_stages: int) -> list[Any]:
    """Check that a per-stage list has one entry per stage and return it as a list."""
    values = list(value)
    if len(values) != num_stages:
        raise ValueError(f"{name} must have {num_stages} entries (one per stage), got {values}")
    return values


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Stochastic-depth rate of each of ``n`` blocks, linear from 0 to ``rate`` (no tensors, so
    models can be built on the meta device)."""
    return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def init_weights(m: nn.Module) -> None:
    """Official init: truncated-normal(0.02) Linear weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def set_grad_checkpointing(model: nn.Module, enable: bool) -> None:
    """Turn activation recomputation of every :class:`LITBlock` of ``model`` on or off."""
    for m in model.modules():
        if isinstance(m, LITBlock):
            m.grad_checkpointing = enable


class LITStage(nn.Module):
    """A stage of the Swin-layout models (LIT-S/M/B, LITv2): ``blocks`` then ``downsample``.

    Args:
        blocks: the stage's blocks, each ``forward(x, hw)``.
        downsample: DTM to the next stage, or ``None`` for the last stage.
    """

    def __init__(self, blocks: Sequence[nn.Module], downsample: DeformableTokenMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward_blocks(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Run the blocks. ``x: [B, N, C]`` → ``[B, N, C]``."""
        for blk in self.blocks:
            x = blk(x, hw)
        return x

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """Blocks then downsampling. ``x: [B, N, C]`` → ``([B, N', C'], (H', W'))``."""
        x = self.forward_blocks(x, hw)
        if self.downsample is not None:
            x, hw = self.downsample(x, hw)
        return x, hw


def build_stages(
    dims: Sequence[int],
    depths: Sequence[int],
    drop_path_rate: float,
    make_block: Callable[[int, int, float], nn.Module],
    dtm_path: str,
) -> nn.ModuleList:
    """Swin-layout stages; ``make_block(stage, index_in_stage, drop_path)`` builds each block.

    Stochastic depth grows linearly from 0 to ``drop_path_rate`` over all blocks.
    """
    dpr = drop_path_rates(drop_path_rate, sum(depths))
    stages = []
    k = 0
    for i, depth in enumerate(depths):
        blocks = [make_block(i, j, dpr[k + j]) for j in range(depth)]
        k += depth
        down = (
            DeformableTokenMerging(dims[i], dims[i + 1], path=dtm_path)
            if i < len(depths) - 1
            else None
        )
        stages.append(LITStage(blocks, down))
    return nn.ModuleList(stages)
