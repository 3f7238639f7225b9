"""Backbone-agnostic encoder for two-view pre-training: backbone → pooled features → projection.

:class:`ContrastiveEncoder` wraps any backbone. timm models (and every ev model, which are timm
models) are driven through ``forward_features`` (the unpooled feature map, kept in the output
for stripe/patch losses) and ``forward_head(..., pre_logits=True)`` (the pooled features);
any other module is called directly and must return pooled features ``[B, C]``. Extra heads
(e.g. UP-ReID's stripe projection) run inside the encoder's ``forward`` so that their
parameters are trained, checkpointed and synchronised by DDP like the rest of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "ContrastiveEncoder",
    "EncoderOutput",
    "ExtraHead",
    "ProjectionHead",
    "backbone_state_dict",
    "build_encoder",
    "make_momentum_encoder",
    "momentum_update",
]


@dataclass
class EncoderOutput:
    """What the encoder returns for a batch of ``B`` images.

    Attributes:
        features: ``[B, C]`` pooled backbone features (what linear probes and fine-tuning use).
        embedding: ``[B, D]`` projection-head output (what the contrastive loss uses).
        feature_map: the backbone's unpooled output (``[B, C, H, W]`` for CNNs, ``[B, N, C]``
            for transformers) or ``None`` for backbones without ``forward_features``.
        extras: outputs of the encoder's extra heads, by name (first dim ``B``).
    """

    features: Tensor
    embedding: Tensor
    feature_map: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def split(self, sizes: list[int]) -> list[EncoderOutput]:
        """Split every tensor along the batch dimension (inverse of a concatenated forward)."""

        def cut(t: Tensor) -> tuple[Tensor, ...]:
            return torch.split(t, sizes, dim=0)

        feats, embs = cut(self.features), cut(self.embedding)
        fmaps = cut(self.feature_map) if self.feature_map is not None else (None,) * len(sizes)
        extras = {k: cut(v) for k, v in self.extras.items()}
        return [
            EncoderOutput(feats[i], embs[i], fmaps[i], {k: v[i] for k, v in extras.items()})
            for i in range(len(sizes))
        ]


class ExtraHead(Protocol):
    """An extra head: ``head(output) -> Tensor[B, ...]`` computed from the partial output.

    It receives the :class:`EncoderOutput` with ``features``, ``embedding`` and
    ``feature_map`` filled in (and the extras of the heads before it).
    """

    def __call__(self, output: EncoderOutput, /) -> Tensor: ...


class ProjectionHead(nn.Module):
    """SimCLR/MoCo-v2 MLP projection: ``num_layers − 1`` × (Linear, [BN], ReLU), then Linear.

    Args:
        in_dim: input feature dimension ``C``.
        hidden_dim: hidden width.
        out_dim: embedding dimension ``D``.
        num_layers: number of linear layers (≥ 1; 1 = a single linear map).
        batch_norm: BatchNorm1d after each hidden linear layer.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        *,
        num_layers: int = 2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise ValueError(
                f"dimensions must be positive, got in={in_dim} hidden={hidden_dim} out={out_dim}"
            )
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        """``x: [B, in_dim]`` → ``[B, out_dim]``."""
        return self.net(x)


def _is_timm_style(backbone: nn.Module) -> bool:
    return callable(getattr(backbone, "forward_features", None)) and callable(
        getattr(backbone, "forward_head", None)
    )


class ContrastiveEncoder(nn.Module):
    """Backbone + projection head (+ optional extra heads) returning :class:`EncoderOutput`.

    Args:
        backbone: any module. With ``forward_features``/``forward_head`` (timm, ev models;
            create them with ``num_classes=0``) the feature map is exposed; otherwise
            ``backbone(x)`` must return ``[B, C]``.
        projection: the projection head; default :class:`ProjectionHead` built from
            ``feature_dim``, ``proj_hidden_dim``, ``proj_dim``, ``proj_layers``.
        feature_dim: ``C``; default ``backbone.num_features`` (timm convention).
        proj_hidden_dim: hidden width of the default projection head.
        proj_dim: embedding dimension of the default projection head.
        proj_layers: linear layers of the default projection head.
        extra_heads: named heads run after the projection (see :class:`ExtraHead`); their
            outputs land in ``EncoderOutput.extras``. Modules among them are registered as
            submodules (trained, checkpointed, DDP-synchronised).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        projection: nn.Module | None = None,
        feature_dim: int | None = None,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        proj_layers: int = 2,
        extra_heads: Mapping[str, ExtraHead] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.timm_style = _is_timm_style(backbone)
        if projection is None:
            dim = (
                feature_dim if feature_dim is not None else getattr(backbone, "num_features", None)
            )
            if not isinstance(dim, int):
                raise ValueError(
                    "cannot infer the backbone's feature dimension: pass feature_dim= "
                    "(or a backbone with an int `num_features`, as timm models have)"
                )
            projection = ProjectionHead(
                dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, batch_norm=True
            )
        self.projection = projection
        heads = dict(extra_heads or {})
        self.extra_heads = nn.ModuleDict(
            {k: h for k, h in heads.items() if isinstance(h, nn.Module)}
        )
        self._head_order = list(heads)
        self._plain_heads = {k: h for k, h in heads.items() if not isinstance(h, nn.Module)}

    def forward(self, x: Tensor) -> EncoderOutput:
        """``x: [B, ...]`` images → :class:`EncoderOutput`."""
        if self.timm_style:
            backbone: Any = self.backbone  # timm API, untyped
            fmap = backbone.forward_features(x)
            feats = backbone.forward_head(fmap, pre_logits=True)
        else:
            fmap, feats = None, self.backbone(x)
        if not isinstance(feats, Tensor) or feats.ndim != 2:
            shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
            raise ValueError(
                f"the backbone must produce pooled features [B, C], got {shape}; for timm "
                "models create them with num_classes=0"
            )
        out = EncoderOutput(features=feats, embedding=self.projection(feats), feature_map=fmap)
        for name in self._head_order:
            head = self.extra_heads[name] if name in self.extra_heads else self._plain_heads[name]
            out.extras[name] = head(out)
        return out


def build_encoder(
    backbone: str | nn.Module,
    *,
    proj_hidden_dim: int = 2048,
    proj_dim: int = 128,
    proj_layers: int = 2,
    feature_dim: int | None = None,
    extra_heads: Mapping[str, ExtraHead] | None = None,
    **timm_kwargs: Any,
) -> ContrastiveEncoder:
    """A :class:`ContrastiveEncoder` from a timm/ev model name or a module.

    Args:
        backbone: a model name for ``timm.create_model`` (created with ``num_classes=0``,
            ``pretrained=False`` unless given in ``timm_kwargs``) or a module.
        proj_hidden_dim: hidden width of the projection head.
        proj_dim: embedding dimension.
        proj_layers: linear layers of the projection head.
        feature_dim: backbone feature dimension (default ``backbone.num_features``).
        extra_heads: see :class:`ContrastiveEncoder`.
        **timm_kwargs: forwarded to ``timm.create_model``.
    """
    if isinstance(backbone, str):
        import timm

        import ev_core.models  # noqa: F401  (registers the ev models with timm)

        timm_kwargs.setdefault("pretrained", False)
        timm_kwargs.setdefault("num_classes", 0)
        model = timm.create_model(backbone, **timm_kwargs)
    elif timm_kwargs:
        raise TypeError(f"timm keyword arguments {sorted(timm_kwargs)} need a model name")
    else:
        model = backbone
    return ContrastiveEncoder(
        model,
        feature_dim=feature_dim,
        proj_hidden_dim=proj_hidden_dim,
        proj_dim=proj_dim,
        proj_layers=proj_layers,
        extra_heads=extra_heads,
    )


def make_momentum_encoder(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` to be updated by :func:`momentum_update`."""
    target = copy.deepcopy(model)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """MoCo/BYOL update of the parameters: ``θ_t ← m·θ_t + (1 − m)·θ_o``.

    Buffers (BatchNorm running statistics) are not averaged: the momentum encoder runs in
    training mode and keeps its own, as in MoCo.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    online_params = dict(online.named_parameters())
    for name, t in target.named_parameters():
        o = online_params.get(name)
        if o is None or o.shape != t.shape:
            raise ValueError(f"momentum encoder parameter {name!r} has no online counterpart")
        t.lerp_(o.detach().to(t.dtype), 1.0 - momentum)


def backbone_state_dict(
    state: Mapping[str, Tensor], prefix: str = "backbone."
) -> dict[str, Tensor]:
    """The backbone's weights inside an encoder state dict (``prefix`` removed).

    Use it to initialise a downstream model from ``encoder.safetensors`` written by the
    pre-training loop.

    Raises:
        KeyError: if no key starts with ``prefix``.
    """
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no '{prefix}*' keys in the state dict")
    return out
