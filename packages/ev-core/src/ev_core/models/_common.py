"""Pieces shared by the LIT and LITv2 models: stages, the hierarchical model base, timm glue.

Our state-dict names equal the official ones, so :func:`checkpoint_filter_fn` only unwraps the
checkpoint container, strips ``module.`` prefixes and re-derives the fixed
``relative_position_index`` buffers from the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ev_core.layers.dtm import DeformableTokenMerging
from ev_core.layers.embed import PatchEmbed

__all__ = ["HierarchicalLIT", "LITStage", "checkpoint_filter_fn", "pretrained_cfg", "to_2tuple"]


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
        self.grad_checkpointing = False

    def forward_blocks(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Run the blocks. ``x: [B, N, C]`` → ``[B, N, C]``."""
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, hw, use_reentrant=False)
            else:
                x = blk(x, hw)
        return x

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        """Blocks then downsampling. ``x: [B, N, C]`` → ``([B, N', C'], (H', W'))``."""
        x = self.forward_blocks(x, hw)
        if self.downsample is not None:
            x, hw = self.downsample(x, hw)
        return x, hw


class HierarchicalLIT(nn.Module):
    """timm-compatible base of LIT-S/M/B and LITv2: patch embed, 4 stages with DTM, avg head.

    Subclasses build ``patch_embed``, ``layers`` (:class:`LITStage`), ``norm`` and call
    :meth:`_finish_init`. ``forward_features`` returns the normalised last map ``[B, H, W, C]``.
    """

    patch_embed: PatchEmbed
    layers: nn.ModuleList
    norm: nn.Module
    pos_drop: nn.Module

    def _stages(self) -> list[LITStage]:
        return [s for s in self.layers if isinstance(s, LITStage)]

    def _finish_init(
        self, num_classes: int, global_pool: str, dims: Sequence[int], patch_size: int
    ) -> None:
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=patch_size * 2**i, module=f"layers.{i}")
            for i, d in enumerate(dims)
        ]
        self.apply(init_weights)

    # ----------------------------------------------------------------- timm model API
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (saves activation memory)."""
        for stage in self._stages():
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        """Parameters excluded from weight decay (relative-position tables)."""
        return {"relative_position_bias_table"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay (timm convention)."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [(r"^layers\.(\d+).downsample", (0,)), (r"^layers\.(\d+)\.\w+\.(\d+)", None)],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh ``num_classes`` one (0 = no head)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x, hw = self.patch_embed(x)
        return self.pos_drop(x), hw

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` images → normalised last-stage map ``[B, H/32, W/32, C]``."""
        x, hw = self._embed(x)
        for stage in self._stages():
            x, hw = stage(x, hw)
        x = self.norm(x)
        return x.reshape(x.shape[0], hw[0], hw[1], x.shape[-1])

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``[B, H, W, C]`` → logits ``[B, num_classes]`` (pooled features if ``pre_logits``)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` → logits ``[B, num_classes]``."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Multi-scale stage outputs (before each stage's downsampling), timm convention.

        Args:
            x: ``[B, 3, H, W]``.
            indices: last-n stages if int, all if ``None``, else the stage indices.
            norm: apply the final norm to the last stage's output.
            stop_early: stop after the last requested stage.
            output_fmt: ``"NCHW"`` (channels-last memory) or ``"NHWC"``.
            intermediates_only: return only the list of maps.

        Returns:
            The maps ``[B, C_i, H/2^(i+2), W/2^(i+2)]`` (or with the final features first).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        intermediates: list[Tensor] = []
        x, hw = self._embed(x)
        last = len(self.layers) - 1
        stages = self._stages()[: max_index + 1] if stop_early else self._stages()
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x, hw)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                y = y.reshape(y.shape[0], hw[0], hw[1], y.shape[-1])
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
            if stage.downsample is not None and (i < len(stages) - 1 or not stop_early):
                x, hw = stage.downsample(x, hw)
        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x.reshape(x.shape[0], hw[0], hw[1], x.shape[-1]), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages, norm and head not needed for the requested intermediates."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        self.layers = self.layers[: max_index + 1]
        self._stages()[-1].downsample = None
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


def build_stages(
    dims: Sequence[int],
    depths: Sequence[int],
    drop_path_rate: float,
    make_block: Callable[[int, int, float], nn.Module],
    dtm_path: Any,
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
