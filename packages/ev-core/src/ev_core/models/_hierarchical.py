"""timm-compatible base of the Swin-layout LIT models (LIT-S/M/B, LITv2)."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ev_core.layers.embed import PatchEmbed
from ev_core.models._layers import LITStage, init_weights, set_grad_checkpointing

__all__ = ["HierarchicalLIT"]


class HierarchicalLIT(nn.Module):
    """timm-compatible base of LIT-S/M/B and LITv2: patch embed, 4 stages with DTM, avg head.

    Subclasses build ``patch_embed``, ``pos_drop``, ``layers`` (:class:`LITStage`), ``norm``
    and call :meth:`_finish_init`. ``forward_features`` returns the normalised last map
    ``[B, H, W, C]`` (channels last, declared as ``output_fmt = "NHWC"`` like timm's Swin).
    """

    output_fmt = "NHWC"

    if TYPE_CHECKING:  # for type checkers only: TorchScript reads class annotations
        patch_embed: PatchEmbed
        pos_drop: nn.Module
        layers: nn.ModuleList
        norm: nn.Module
        head: nn.Module

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
        set_grad_checkpointing(self, enable)

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
        for stage in self.layers:
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
