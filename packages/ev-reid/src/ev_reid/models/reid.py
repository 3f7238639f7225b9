"""Re-id model: a timm / ev-core backbone with a BNNeck head and optional stripe part features.

The backbone is any timm model that supports ``features_only=True`` (ResNets, ConvNeXts, ViTs,
and the ev-core models such as ``litv2_s``, registered with timm by ``import ev_core``); only
its last feature map ``[B, C, H, W]`` is used. The head follows the BoT recipe:

* global pooling (average or GeM) gives the feature ``f [B, C]`` used by the triplet loss;
* the BNNeck, a ``BatchNorm1d`` with a frozen zero bias, gives ``f_bn``, which feeds a bias-free
  linear identity classifier and is the retrieval feature at evaluation;
* optionally the map is also cut into ``P`` horizontal stripes, each pooled, batch-normalised
  and classified the same way (PCB-style part features).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ev_core.errors import EvError
from ev_reid.models.pooling import GeneralizedMeanPooling, stripe_pool

__all__ = [
    "BackboneLoadReport",
    "BackboneWeightsError",
    "ReidModel",
    "ReidModelConfig",
    "ReidOutput",
    "create_backbone",
    "load_backbone_weights",
    "load_reid_model",
    "set_last_stride_1",
]

PoolingMode = Literal["avg", "gem"]
NeckMode = Literal["bnneck", "none"]
EvalFeature = Literal["after_bn", "before_bn"]


@dataclass
class ReidModelConfig:
    """Configuration of :class:`ReidModel`.

    Attributes:
        backbone: timm model name (``"resnet50"``, ``"resnet18"``, ``"litv2_s"``, any name
            ``timm.list_models()`` knows once ``ev_core`` is imported).
        pretrained: load timm's pretrained weights (needs internet or a local timm cache).
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (e.g.
            ``{"channels": [16, 32, 64, 128], "stem_width": 16}`` for a narrow ResNet-18).
        last_stride_1: set the stride of the last ResNet stage to 1 (BoT's "last stride").
        pooling: ``"avg"`` (BoT) or ``"gem"`` (generalised mean).
        gem_p: initial GeM exponent.
        gem_learnable: learn the GeM exponent.
        neck: ``"bnneck"`` (BatchNorm1d before the classifier) or ``"none"``.
        num_classes: training identities; ``0`` builds no classifier (feature extractor only).
        num_stripes: horizontal part stripes P (``0`` = global feature only).
        eval_feature: feature returned at evaluation: after (``"after_bn"``, BoT) or before the
            BNNeck.
    """

    backbone: str = "resnet50"
    pretrained: bool = False
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    last_stride_1: bool = False
    pooling: PoolingMode = "avg"
    gem_p: float = 3.0
    gem_learnable: bool = True
    neck: NeckMode = "bnneck"
    num_classes: int = 0
    num_stripes: int = 0
    eval_feature: EvalFeature = "after_bn"

    def __post_init__(self) -> None:
        if self.pooling not in ("avg", "gem"):
            raise ValueError(f"pooling must be 'avg' or 'gem', got {self.pooling!r}")
        if self.neck not in ("bnneck", "none"):
            raise ValueError(f"neck must be 'bnneck' or 'none', got {self.neck!r}")
        if self.eval_feature not in ("after_bn", "before_bn"):
            raise ValueError(
                f"eval_feature must be 'after_bn' or 'before_bn', got {self.eval_feature!r}"
            )
        if self.num_classes < 0 or self.num_stripes < 0:
            raise ValueError("num_classes and num_stripes must be ≥ 0")
        if self.eval_feature == "after_bn" and self.neck == "none":
            self.eval_feature = "before_bn"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReidModelConfig:
        """Build from a (JSON-loaded) mapping, rejecting unknown keys and wrong value types.

        Raises:
            ValueError: naming the offending key.
        """
        if not isinstance(data, dict):
            raise ValueError(f"ReidModelConfig must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ReidModelConfig keys: {unknown}")
        for key, value in data.items():
            kind = _JSON_TYPES[key]
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if kind is dict and ok:
                ok = all(isinstance(k, str) for k in value)
            if not ok:
                name = kind.__name__ if isinstance(kind, type) else "a number"
                raise ValueError(f"ReidModelConfig.{key} must be {name}, got {value!r:.60}")
        return cls(**data)


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "backbone": str,
    "pretrained": bool,
    "backbone_kwargs": dict,
    "last_stride_1": bool,
    "pooling": str,
    "gem_p": (int, float),
    "gem_learnable": bool,
    "neck": str,
    "num_classes": int,
    "num_stripes": int,
    "eval_feature": str,
}
"""JSON value type of each :class:`ReidModelConfig` field (checked by ``from_dict``)."""


class ReidOutput(NamedTuple):
    """What :class:`ReidModel` returns in training mode.

    Attributes:
        features: pooled global feature before the BNNeck, ``[B, C]`` (triplet loss input).
        logits: identity logits ``[B, num_classes]`` (``None`` without a classifier).
        part_features: stripe features before their BN, ``[B, P, C]`` (``None`` if P = 0).
        part_logits: per-stripe identity logits ``[B, P, num_classes]`` (``None`` without
            stripes or classifier).
    """

    features: torch.Tensor
    logits: torch.Tensor | None
    part_features: torch.Tensor | None
    part_logits: torch.Tensor | None


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    last_stride_1: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, int]:
    """Create a timm (or ev-core) backbone that returns its last feature map.

    Returns:
        ``(backbone, channels)``: ``backbone(x)`` is a one-element list ``[[B, C, H, W]]``.

    Raises:
        ValueError: for a model name timm does not know, or ``last_stride_1`` on a backbone
            without a ResNet-style ``layer4``.
    """
    import timm

    import ev_core  # noqa: F401  (registers the ev models with timm)

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:10]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown backbone {name!r} (not a timm or ev-core model){hint}")
    try:
        backbone = timm.create_model(
            name, pretrained=pretrained, features_only=True, out_indices=(-1,), **kwargs
        )
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"cannot build backbone {name!r} with features_only=True: {exc}") from exc
    if last_stride_1:
        set_last_stride_1(backbone)
    feature_info: Any = backbone.feature_info
    return backbone, int(feature_info.channels()[-1])


def set_last_stride_1(backbone: nn.Module) -> None:
    """Make the last stage of a ResNet-style backbone keep its input resolution (in place).

    Every stride-2 convolution (and stride-2 average-pool shortcut of ``-d`` variants) in the
    first block of ``layer4`` is set to stride 1, without dilation (as in BoT).

    Raises:
        ValueError: if the backbone has no ``layer4`` or nothing in it has stride 2.
    """
    layer4 = getattr(backbone, "layer4", None)
    if not isinstance(layer4, nn.Sequential) or len(layer4) == 0:
        raise ValueError("last_stride_1 needs a ResNet-style backbone with a 'layer4' stage")
    changed = False
    for module in layer4[0].modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
            changed = True
        elif isinstance(module, nn.AvgPool2d) and module.stride in (2, (2, 2)):
            module.kernel_size, module.stride = 1, 1
            changed = True
    if not changed:
        raise ValueError("last_stride_1: the first block of layer4 has no stride-2 layer")


class ReidModel(nn.Module):
    """Backbone + re-id head (pooling, BNNeck, classifier, optional stripes).

    In training mode ``forward`` returns a :class:`ReidOutput`; in eval mode it returns the
    retrieval feature ``[B, D]`` with ``D = (1 + P) · C`` (global and stripe features
    concatenated, after or before their BN as configured).

    Args:
        config: the model configuration.
    """

    def __init__(self, config: ReidModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone, self.channels = create_backbone(
            config.backbone,
            pretrained=config.pretrained,
            last_stride_1=config.last_stride_1,
            **config.backbone_kwargs,
        )
        c, p = self.channels, config.num_stripes
        self.pool: nn.Module
        if config.pooling == "gem":
            self.pool = GeneralizedMeanPooling(config.gem_p, learnable=config.gem_learnable)
        else:
            self.pool = nn.AdaptiveAvgPool2d(1)
        self.bottleneck = self._make_neck(c)
        self.part_bottleneck = self._make_neck(c * p) if p else None
        self.classifier = self._make_classifier(c)
        self.part_classifiers = (
            nn.ModuleList([self._linear(c) for _ in range(p)]) if p and config.num_classes else None
        )

    def _make_neck(self, dim: int) -> nn.Module:
        if self.config.neck == "none":
            return nn.Identity()
        bn = nn.BatchNorm1d(dim)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        bn.bias.requires_grad_(False)  # BNNeck: no shift, so the classifier sees centred features
        return bn

    def _make_classifier(self, dim: int) -> nn.Linear | None:
        if not self.config.num_classes:
            return None
        return self._linear(dim)

    def _linear(self, dim: int) -> nn.Linear:
        fc = nn.Linear(dim, self.config.num_classes, bias=False)
        nn.init.normal_(fc.weight, std=1e-3)
        return fc

    @property
    def feature_dim(self) -> int:
        """Dimension of the evaluation feature."""
        return self.channels * (1 + self.config.num_stripes)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone's last feature map: ``x [B, 3, H, W]`` → ``[B, C, h, w]``."""
        out: torch.Tensor = self.backbone(x)[-1]
        return out

    def pool_global(self, fmap: torch.Tensor) -> torch.Tensor:
        """``fmap [B, C, h, w]`` → pooled global feature ``[B, C]``."""
        pooled: torch.Tensor = self.pool(fmap)
        return pooled.flatten(1)

    def pool_stripes(self, fmap: torch.Tensor) -> torch.Tensor:
        """``fmap [B, C, h, w]`` → stripe features ``[B, P, C]`` (P = ``num_stripes``)."""
        p = self.pool.p if isinstance(self.pool, GeneralizedMeanPooling) else 1.0
        return stripe_pool(fmap, self.config.num_stripes, mode=self.config.pooling, p=p)

    def forward(self, x: torch.Tensor) -> ReidOutput | torch.Tensor:
        """``x: [B, 3, H, W]`` → :class:`ReidOutput` (training) or features ``[B, D]`` (eval)."""
        fmap = self.forward_feature_map(x)
        feat = self.pool_global(fmap)
        feat_bn = self.bottleneck(feat)
        parts = parts_bn = None
        if self.part_bottleneck is not None:
            parts = self.pool_stripes(fmap)
            b, p, c = parts.shape
            parts_bn = self.part_bottleneck(parts.reshape(b, p * c)).reshape(b, p, c)
        if not self.training:
            if self.config.eval_feature == "after_bn":
                glob, local = feat_bn, parts_bn
            else:
                glob, local = feat, parts
            return glob if local is None else torch.cat([glob, local.flatten(1)], dim=1)
        logits = self.classifier(feat_bn) if self.classifier is not None else None
        part_logits = None
        if self.part_classifiers is not None and parts_bn is not None:
            part_logits = torch.stack(
                [fc(parts_bn[:, i]) for i, fc in enumerate(self.part_classifiers)], dim=1
            )
        return ReidOutput(feat, logits, parts, part_logits)


@dataclass
class BackboneLoadReport:
    """What :func:`load_backbone_weights` did.

    Attributes:
        loaded: backbone keys filled from the file.
        missing: backbone keys the file did not provide (left as initialised).
        unexpected: file keys with no backbone counterpart (e.g. an ImageNet ``fc``).
        mismatched: keys present in both with different shapes (skipped).
    """

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]


class BackboneWeightsError(EvError, ValueError):
    """A weights file does not fit the backbone (or cannot be read); the message names it."""


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from ev_core.checkpoint import load_checkpoint, load_torch_file, unwrap_state_dict

    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        if path.suffix == ".safetensors":
            state, _ = load_checkpoint(path)
            return dict(state)
        return unwrap_state_dict(load_torch_file(path))
    except Exception as exc:  # SafetensorError, PytorchStreamReader/unpickling errors
        raise BackboneWeightsError(
            f"cannot read weights ({path.stat().st_size} bytes; truncated or not a "
            f"{'safetensors' if path.suffix == '.safetensors' else 'PyTorch'} file): {exc}",
            path=path,
        ) from exc


def load_backbone_weights(
    model: ReidModel, path: str | Path, *, prefix: str | None = None, strict: bool = True
) -> BackboneLoadReport:
    """Initialise ``model.backbone`` from a checkpoint file.

    Accepts safetensors (ev checkpoints: UP-ReID pre-training, ev-reid models) and pickled
    PyTorch files (ImageNet/timm checkpoints, read with ``weights_only=True``; state dicts
    nested under ``model``/``state_dict`` and DDP ``module.`` prefixes are handled). Keys are
    taken under ``prefix`` when given, else under ``"backbone."`` when the file has such keys,
    else as they are (a plain timm model state dict).

    Args:
        model: the model whose backbone is initialised.
        path: the weights file.
        prefix: take the keys under this prefix (default: see above).
        strict: fail unless every backbone tensor is filled (keys the backbone does not
            have, e.g. an ImageNet classifier, are always allowed); ``False`` loads what fits
            and reports the rest.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        BackboneWeightsError: (a ``ValueError``) if the file cannot be read, no tensor in it
            matches the backbone, or, with ``strict``, some backbone tensors are missing or
            have other shapes (counts and the first names in the message).
    """
    file = Path(path)
    state = _read_state_dict(file)
    if prefix is None and any(k.startswith("backbone.") for k in state):
        prefix = "backbone."
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    target = model.backbone.state_dict()
    loadable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    mismatched = sorted(k for k in state if k in target and state[k].shape != target[k].shape)
    if not loadable:
        raise BackboneWeightsError(
            f"{file}: no tensor matches the {model.config.backbone!r} backbone "
            f"(file keys e.g. {sorted(state)[:5]}, backbone keys e.g. {sorted(target)[:5]})"
        )
    missing = sorted(set(target) - set(state))
    if strict and (missing or mismatched):
        raise BackboneWeightsError(
            f"{file}: only {len(loadable)} of {len(target)} {model.config.backbone!r} backbone "
            f"tensors can be loaded ({len(missing)} missing, e.g. {missing[:5]}; "
            f"{len(mismatched)} with other shapes, e.g. {mismatched[:5]}): is it a checkpoint "
            "of another architecture? Pass --allow-partial (strict=False) to load it anyway"
        )
    model.backbone.load_state_dict(loadable, strict=False)
    return BackboneLoadReport(
        loaded=sorted(loadable),
        missing=sorted(set(target) - set(loadable)),
        unexpected=sorted(set(state) - set(target)),
        mismatched=mismatched,
    )


def load_reid_model(path: str | Path, map_location: str | torch.device = "cpu") -> ReidModel:
    """Rebuild a :class:`ReidModel` saved by ev-reid training (safetensors + JSON config).

    The JSON beside the weights must hold the :class:`ReidModelConfig` under
    ``config["model"]`` (training runs) or as ``config`` itself.

    Raises:
        FileNotFoundError: if the checkpoint does not exist.
        ValueError: if the JSON has no model config.
    """
    from ev_core.checkpoint import load_checkpoint

    state, info = load_checkpoint(path, map_location=map_location)
    cfg = info.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]
    if not isinstance(cfg, dict) or "backbone" not in cfg:
        raise ValueError(f"{path}: the JSON beside the weights has no ReidModelConfig")
    model = ReidModel(ReidModelConfig.from_dict(cfg))
    model.load_state_dict(state)
    return model.to(map_location)
