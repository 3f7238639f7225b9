"""Re-id image transforms (torchvision v2): BoT training/test pipelines and UP-ReID views.

Training (BoT): resize to 256×128, horizontal flip, pad 10 + random crop back to 256×128,
normalise, random erasing (p 0.5; the erased box is filled with the normalisation mean, i.e.
0 after normalisation). Test: resize and normalise.

UP-ReID pre-training views use only flips and **aspect-preserving** crops (plus photometric
jitter), so horizontal stripe ``k`` of any view covers the same body part as stripe ``k`` of the
original: :class:`PretrainViewConfig` rejects crop scales for which the centre row of a stripe
could leave that stripe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PretrainViewConfig",
    "PretrainViews",
    "ReidTransformConfig",
    "build_pretrain_views",
    "build_test_transform",
    "build_train_transform",
    "min_aligned_crop_scale",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ReidTransformConfig:
    """Standard re-id augmentation (the BoT recipe by default).

    Attributes:
        height: output height.
        width: output width.
        hflip_p: horizontal flip probability.
        padding: pixels padded on each side before the random crop back to (height, width);
            0 disables the padding crop.
        padding_mode: ``"constant"`` (zeros, as BoT), ``"edge"``, ``"reflect"`` or
            ``"symmetric"``.
        erasing_p: random-erasing probability (0 disables it).
        erasing_scale: erased area as a fraction of the image (min, max).
        erasing_ratio: aspect ratio range of the erased box.
        erasing_value: ``"mean"`` (the normalisation mean colour, i.e. 0 after normalising),
            ``"random"`` (per-pixel N(0, 1) noise) or a constant in normalised units.
        color_jitter: brightness/contrast/saturation strength (0 disables; BoT uses none).
        mean: normalisation mean (RGB, [0, 1] scale).
        std: normalisation std.
        interpolation: resize interpolation, ``"bilinear"`` or ``"bicubic"``.
    """

    height: int = 256
    width: int = 128
    hflip_p: float = 0.5
    padding: int = 10
    padding_mode: str = "constant"
    erasing_p: float = 0.5
    erasing_scale: tuple[float, float] = (0.02, 0.4)
    erasing_ratio: tuple[float, float] = (0.3, 3.33)
    erasing_value: str | float = "mean"
    color_jitter: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"size must be positive, got {(self.height, self.width)}")
        for name in ("hflip_p", "erasing_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        if isinstance(self.erasing_value, str) and self.erasing_value not in ("mean", "random"):
            raise ValueError(
                f"erasing_value must be 'mean', 'random' or a number, got {self.erasing_value!r}"
            )
        _interpolation(self.interpolation)


def _interpolation(name: str) -> v2.InterpolationMode:
    modes = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}
    if name not in modes:
        raise ValueError(f"interpolation must be one of {sorted(modes)}, got {name!r}")
    return modes[name]


def _to_float(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_train_transform(cfg: ReidTransformConfig | None = None) -> v2.Compose:
    """The training transform: PIL image (or uint8 tensor) -> float32 ``[3, H, W]``."""
    cfg = cfg or ReidTransformConfig()
    size = (cfg.height, cfg.width)
    ops: list[v2.Transform] = [
        v2.ToImage(),
        v2.Resize(size, interpolation=_interpolation(cfg.interpolation), antialias=True),
    ]
    if cfg.hflip_p > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip_p))
    if cfg.padding > 0:
        ops += [
            v2.Pad(cfg.padding, padding_mode=cfg.padding_mode),
            v2.RandomCrop(size),
        ]
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        ops.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    ops += _to_float(cfg.mean, cfg.std)
    if cfg.erasing_p > 0:
        value: Any = 0.0 if cfg.erasing_value == "mean" else cfg.erasing_value
        ops.append(
            v2.RandomErasing(cfg.erasing_p, cfg.erasing_scale, cfg.erasing_ratio, value=value)
        )
    return v2.Compose(ops)


def build_test_transform(cfg: ReidTransformConfig | None = None) -> v2.Compose:
    """The evaluation transform: resize + normalise -> float32 ``[3, H, W]``."""
    cfg = cfg or ReidTransformConfig()
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(
                (cfg.height, cfg.width),
                interpolation=_interpolation(cfg.interpolation),
                antialias=True,
            ),
            *_to_float(cfg.mean, cfg.std),
        ]
    )


def min_aligned_crop_scale(num_stripes: int) -> float:
    """Smallest crop **area** fraction keeping stripes aligned for ``num_stripes`` stripes.

    An aspect-preserving crop of side fraction ``s`` at vertical offset ``t`` in ``[0, 1 - s]``
    maps the centre of output stripe ``k`` to source height ``t + s (k + 1/2) / n``; this stays
    inside source stripe ``k`` for every offset iff ``s >= (2n - 2) / (2n - 1)``.
    """
    if num_stripes < 1:
        raise ValueError(f"num_stripes must be >= 1, got {num_stripes}")
    side = (2 * num_stripes - 2) / (2 * num_stripes - 1)
    return side * side


@dataclass
class PretrainViewConfig:
    """Views for UP-ReID contrastive pre-training (MoCo-v2 photometric jitter, stripe-safe
    geometry).

    Attributes:
        height: output height.
        width: output width.
        crop_scale: area fraction range of the aspect-preserving random crop.
        num_stripes: horizontal stripes of the local term; ``crop_scale[0]`` must be at least
            :func:`min_aligned_crop_scale` of it.
        hflip_p: flip probability (views and original).
        color_jitter: MoCo-v2 (brightness, contrast, saturation, hue) strengths.
        color_jitter_p: probability of colour jitter.
        grayscale_p: probability of converting to grey.
        blur_p: probability of Gaussian blur (sigma 0.1-2, kernel ~10% of the height).
        mean: normalisation mean.
        std: normalisation std.
    """

    height: int = 256
    width: int = 128
    crop_scale: tuple[float, float] = (0.64, 1.0)
    num_stripes: int = 3
    hflip_p: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        need = min_aligned_crop_scale(self.num_stripes)
        if lo < need - 1e-9:
            raise ValueError(
                f"crop_scale min {lo} breaks the alignment of {self.num_stripes} stripes; "
                f"use >= {need:.4f}"
            )


class PretrainViews:
    """Callable ``PIL image -> (view1, view2, original)``, each float32 ``[3, H, W]``.

    ``view1``/``view2``: resize, flip, aspect-preserving random crop, colour jitter, greyscale,
    blur, normalise (independent draws). ``original``: resize, flip, normalise (the target of
    UP-ReID's global-consistency term).
    """

    def __init__(self, cfg: PretrainViewConfig) -> None:
        self.cfg = cfg
        size = (cfg.height, cfg.width)
        ratio = cfg.width / cfg.height
        kernel = 2 * max(1, round(0.05 * cfg.height)) + 1
        self.resize = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True)])
        self.view = v2.Compose(
            [
                v2.RandomHorizontalFlip(cfg.hflip_p),
                v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=(ratio, ratio)),
                v2.RandomApply([v2.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p),
                v2.RandomGrayscale(cfg.grayscale_p),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=cfg.blur_p),
                *_to_float(cfg.mean, cfg.std),
            ]
        )
        self.original = v2.Compose(
            [v2.RandomHorizontalFlip(cfg.hflip_p), *_to_float(cfg.mean, cfg.std)]
        )

    def __call__(self, img: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        base = self.resize(img)
        return self.view(base), self.view(base), self.original(base)

    def __repr__(self) -> str:
        return f"PretrainViews(view={self.view}, original={self.original})"


def build_pretrain_views(cfg: PretrainViewConfig | None = None) -> PretrainViews:
    """The UP-ReID view generator (see :class:`PretrainViews`)."""
    return PretrainViews(cfg or PretrainViewConfig())
