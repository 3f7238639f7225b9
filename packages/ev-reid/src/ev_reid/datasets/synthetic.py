"""A synthetic person re-id dataset written in the Market-1501 format.

Each identity has a fixed appearance (upper/lower garment colours, an upper-body pattern,
sleeve and leg style, skin, hair, shoes, optional bag and hat, body build); each camera has
its own background, lighting (colour cast, brightness, gamma), person scale, blur, noise and
occlusion rate. Images vary in pose (front / back / side, mirrored), stance, position and
brightness. Identity is therefore recoverable from appearance across cameras, while
backgrounds and lighting tie images to cameras, as in real re-id data.

Two modes (:attr:`SyntheticMarketConfig.mode`):

- ``"aligned"`` (default): persons are centred with their feet near the bottom and a fixed
  height per camera, so the upper and lower garments always fall in the same horizontal bands
  of the crop — the layout horizontal-stripe models (PCB, UP-ReID's local term) assume;
- ``"unaligned"``: identity cues are *not* stripe-aligned: every image draws its own person
  scale (0.45-0.95 of the height) and vertical offset (head near the top to feet cut off at
  the bottom), a horizontal shift, a width/aspect change and a torso/leg proportion change
  (pose), textured garments (a per-identity noise texture at a random phase), a cluttered
  background (random shapes, some in garment colours) and a random occluder over the person
  in half of the images.

The folder follows Market-1501 (``bounding_box_train``, ``bounding_box_test``, ``query``;
``0002_c1s1_000451_03.jpg`` names), with junk (pid ``-1``) and distractor (pid ``0000``) images
in the gallery, so :class:`~ev_reid.datasets.Market1501` reads it.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from ev_core.io import write_json
from ev_core.progress import progress

__all__ = ["SyntheticMarketConfig", "generate_synthetic_market"]

MARKER = "synthetic_market.json"
GENERATOR_VERSION = 1
"""Bumped whenever the images a config produces change (a cached dataset is then rebuilt)."""

# Part labels of the rendered label map.
_BG, _SKIN, _HAIR, _UPPER, _SLEEVE, _LOWER, _SHOES, _BAG, _HAT, _OCCL = range(10)
_PATTERNS = ("solid", "hstripes", "vstripes", "checker", "logo", "two_tone")
_PATTERN_P = (0.35, 0.2, 0.1, 0.1, 0.13, 0.12)
_SKIN_TONES = np.array(
    [
        [255, 219, 172],
        [241, 194, 125],
        [224, 172, 105],
        [198, 134, 66],
        [141, 85, 36],
        [92, 58, 30],
    ],
    dtype=np.float32,
)
_HAIR_COLOURS = np.array(
    [[20, 15, 10], [60, 40, 25], [110, 75, 40], [200, 170, 100], [150, 150, 150], [90, 20, 15]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class SyntheticMarketConfig:
    """Size and randomness of a synthetic Market-format dataset.

    Attributes:
        num_ids: identities in total (train + test).
        images_per_id: mean images per identity (each gets 75%-125% of it, at least 4).
        num_cameras: cameras (2-6, Market names cameras ``c1``..``c6``).
        image_size: ``(height, width)`` of every image (re-id crops are 2:1).
        train_fraction: share of identities in ``bounding_box_train``; the rest are test ids,
            each giving one query per camera it appears in (with >= 2 images there).
        num_distractors: distractor images (pid ``0000``: background or truncated strangers)
            in the gallery; ``None``: ``num_ids // 2``.
        num_junk: junk images (pid ``-1``: fragments of test identities) in the gallery;
            ``None``: ``num_ids // 5``.
        seed: everything is a deterministic function of the config.
        jpeg_quality: JPEG quality of the written files.
        mode: ``"aligned"`` or ``"unaligned"`` identity cues (see the module docstring).
    """

    num_ids: int = 100
    images_per_id: int = 16
    num_cameras: int = 6
    image_size: tuple[int, int] = (128, 64)
    train_fraction: float = 0.5
    num_distractors: int | None = None
    num_junk: int | None = None
    seed: int = 0
    jpeg_quality: int = 92
    mode: Literal["aligned", "unaligned"] = "aligned"

    def __post_init__(self) -> None:
        if self.mode not in ("aligned", "unaligned"):
            raise ValueError(f"mode must be 'aligned' or 'unaligned', got {self.mode!r}")
        if self.num_ids < 2:
            raise ValueError(f"num_ids must be >= 2, got {self.num_ids}")
        if self.num_ids > 9999:
            raise ValueError(
                f"num_ids must fit Market's 4-digit pids (<= 9999), got {self.num_ids}"
            )
        if self.images_per_id < 4:
            raise ValueError(f"images_per_id must be >= 4, got {self.images_per_id}")
        if not 2 <= self.num_cameras <= 6:
            raise ValueError(f"num_cameras must be in [2, 6], got {self.num_cameras}")
        h, w = self.image_size
        if h < 32 or w < 16:
            raise ValueError(f"image_size must be at least (32, 16), got {self.image_size}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        for name in ("num_distractors", "num_junk"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _garment_colour(rng: np.random.Generator, dark_bias: float) -> np.ndarray:
    """A clothing colour: saturated, or neutral (black/grey/white) with some probability."""
    if rng.random() < 0.25:
        return np.full(3, rng.uniform(25, 235), dtype=np.float32) + rng.uniform(-8, 8, 3)
    value = rng.uniform(0.3, 1.0) * (1.0 - dark_bias * rng.random())
    return _hsv(rng.random(), rng.uniform(0.35, 1.0), max(value, 0.2))


@dataclass
class _Identity:
    upper: np.ndarray
    upper2: np.ndarray
    lower: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    shoes: np.ndarray
    bag_colour: np.ndarray
    hat_colour: np.ndarray
    pattern: str
    stripes: int
    long_sleeves: bool
    lower_style: str
    long_hair: bool
    bag: str
    hat: bool
    build: float
    height: float
    texture: np.ndarray | None = None  # [T, T] float32 multiplicative garment texture

    def with_texture(self, rng: np.random.Generator) -> _Identity:
        """This identity with a garment texture (unaligned mode): smooth noise in [0.6, 1.3]."""
        coarse = rng.uniform(0.0, 1.0, (6, 6)).astype(np.float32)
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
            (24, 24), Image.Resampling.BICUBIC
        )
        fine = rng.uniform(-0.15, 0.15, (24, 24)).astype(np.float32)
        tex = np.asarray(img, dtype=np.float32) / 255.0 * 0.55 + 0.65 + fine
        return dataclasses.replace(self, texture=np.clip(tex, 0.5, 1.4))

    @classmethod
    def sample(cls, rng: np.random.Generator) -> _Identity:
        upper = _garment_colour(rng, 0.2)
        upper2 = _garment_colour(rng, 0.2)
        while np.abs(upper2 - upper).sum() < 120:  # the pattern must be visible
            upper2 = _garment_colour(rng, 0.2)
        return cls(
            upper=upper,
            upper2=upper2,
            lower=_garment_colour(rng, 0.5),
            skin=_SKIN_TONES[rng.integers(len(_SKIN_TONES))],
            hair=_HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))],
            shoes=_garment_colour(rng, 0.8) if rng.random() < 0.7 else np.full(3, 235.0),
            bag_colour=_garment_colour(rng, 0.4),
            hat_colour=_garment_colour(rng, 0.3),
            pattern=str(rng.choice(_PATTERNS, p=_PATTERN_P)),
            stripes=int(rng.integers(3, 7)),
            long_sleeves=bool(rng.random() < 0.6),
            lower_style=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.7, 0.2, 0.1])),
            long_hair=bool(rng.random() < 0.3),
            bag=str(rng.choice(["none", "backpack", "handbag"], p=[0.5, 0.3, 0.2])),
            hat=bool(rng.random() < 0.12),
            build=float(rng.uniform(0.85, 1.15)),
            height=float(rng.uniform(0.95, 1.03)),
        )


@dataclass
class _Camera:
    background: np.ndarray  # [H', W', 3] float32, larger than an image (random crops)
    gain: np.ndarray  # [3]
    scale: float
    occlusion: float
    occluder: np.ndarray  # [3]
    blur: float
    noise: float
    gamma_lut: np.ndarray  # [256] float32: uint8 value -> gamma-corrected value

    @classmethod
    def sample(cls, rng: np.random.Generator, size: tuple[int, int]) -> _Camera:
        h, w = size
        bh, bw = int(h * 1.25), int(w * 2.5)
        top, floor = (
            _hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.3, 0.9)),
            _hsv(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.2, 0.7)),
        )
        horizon = int(bh * rng.uniform(0.5, 0.8))
        ramp = np.linspace(0.8, 1.1, bh, dtype=np.float32)[:, None, None]
        bg = np.empty((bh, bw, 3), dtype=np.float32)
        bg[:horizon] = top
        bg[horizon:] = floor
        bg *= ramp
        img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 10))):  # walls, windows, shop fronts
            x0, y0 = rng.integers(0, bw), rng.integers(0, horizon)
            x1 = x0 + rng.integers(w // 8, w)
            y1 = y0 + rng.integers(h // 10, h // 2)
            colour = tuple(int(c) for c in _hsv(rng.random(), rng.uniform(0, 0.7), rng.random()))
            draw.rectangle([int(x0), int(y0), int(x1), int(y1)], fill=colour)
        for _ in range(int(rng.integers(0, 4))):  # floor markings
            y = int(rng.integers(horizon, bh))
            draw.line([0, y, bw, y + int(rng.integers(-h // 8, h // 8))], fill=(200, 200, 200))
        cast = 1.0 + rng.uniform(-0.12, 0.12, 3)
        gamma = float(rng.uniform(0.85, 1.15))
        return cls(
            background=np.asarray(img, dtype=np.float32),
            gain=(rng.uniform(0.75, 1.2) * cast).astype(np.float32),
            scale=float(rng.uniform(0.78, 0.93)),
            occlusion=float(rng.uniform(0.0, 0.35)),
            occluder=_hsv(rng.random(), rng.uniform(0, 0.6), rng.uniform(0.2, 0.8)),
            blur=float(rng.uniform(0.0, 0.8)),
            noise=float(rng.uniform(2.0, 7.0)),
            gamma_lut=(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.float32),
        )


@dataclass(frozen=True)
class _Placement:
    """Unaligned mode: where and how one image shows the person."""

    top: float  # person top as a fraction of the image height (may be < 0: head cut off)
    width: float  # width multiplier (aspect / pose)
    waist: float  # shift of the torso/leg boundary, fraction of the person height


def _render_labels(
    ident: _Identity,
    rng: np.random.Generator,
    size: tuple[int, int],
    scale: float,
    place: _Placement | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Label map ``[H, W]`` of one pose of ``ident`` and its upper-pattern mask ``[H, W]``.

    The person is centred, ``scale * H`` tall (times the identity's height), feet near the
    bottom (or placed by ``place``), mirrored with probability 0.5.
    """
    h, w = size
    labels = Image.new("L", (w, h), _BG)
    draw = ImageDraw.Draw(labels)
    view = str(rng.choice(["front", "back", "side"], p=[0.4, 0.3, 0.3]))
    ph = h * scale * ident.height * rng.uniform(0.97, 1.03)
    y0 = h - ph - h * rng.uniform(0.0, 0.04)
    cx = w / 2.0
    pw = 0.36 * ph * ident.build * (0.72 if view == "side" else 1.0)
    waist = 0.0
    if place is not None:
        y0, pw, waist = place.top * h, pw * place.width, place.waist
    aw = 0.085 * ph * ident.build
    gap = 0.0 if view == "side" else rng.uniform(0.0, 0.08) * ph
    swing = rng.uniform(-0.03, 0.03) * ph

    def y(f: float) -> float:
        # waist shift moves the torso/leg boundary (0.52-0.6) and stretches around it
        if waist and 0.15 < f < 1.0:
            f = f + waist * (f - 0.15) / 0.4 if f <= 0.55 else f + waist * (1.0 - f) / 0.45
        return y0 + f * ph

    def box(x0: float, f0: float, x1: float, f1: float, label: int) -> None:
        draw.rectangle([x0, y(f0), x1, y(f1)], fill=label)

    # Backpack behind the body (side view) or over the back.
    if ident.bag == "backpack" and view == "side":
        box(cx - pw / 2 - 0.16 * ph, 0.17, cx - pw / 2 + 1, 0.45, _BAG)
    # Legs and lower garment.
    lw = 0.55 * pw if view == "side" else 0.42 * pw
    lower_end = {"trousers": 0.93, "shorts": 0.70, "skirt": 0.72}[ident.lower_style]
    for side in (-1, 1):
        inner = cx + side * gap / 2
        outer = inner + side * lw
        x0, x1 = min(inner, outer), max(inner, outer)
        box(x0, 0.55, x1, 0.93, _SKIN)
        box(x0, 0.55, x1, lower_end, _LOWER)
        box(x0 - 1, 0.93, x1 + 1, 1.0, _SHOES)
    hip = 0.45 * pw + gap / 2
    if ident.lower_style == "skirt":
        draw.polygon(
            [
                (cx - hip, y(0.52)),
                (cx + hip, y(0.52)),
                (cx + hip * 1.3, y(0.72)),
                (cx - hip * 1.3, y(0.72)),
            ],
            fill=_LOWER,
        )
    else:
        box(cx - hip, 0.52, cx + hip, 0.60, _LOWER)
    # Arms (one in the side view, in front of the torso: drawn later).
    arms = [] if view == "side" else [cx - pw / 2 - aw, cx + pw / 2]
    for i, ax in enumerate(arms):
        s = swing if i == 0 else -swing
        box(ax, 0.16, ax + aw, 0.52 + s / ph, _SKIN)
        box(ax, 0.16, ax + aw, (0.50 if ident.long_sleeves else 0.28) + s / ph, _SLEEVE)
    # Torso (upper garment).
    torso = [
        (cx - pw / 2, y(0.15)),
        (cx + pw / 2, y(0.15)),
        (cx + 0.43 * pw, y(0.54)),
        (cx - 0.43 * pw, y(0.54)),
    ]
    draw.polygon(torso, fill=_UPPER)
    if view == "side":
        ax = cx - aw / 2 + swing
        box(ax, 0.17, ax + aw, 0.52, _SKIN)
        box(ax, 0.17, ax + aw, 0.50 if ident.long_sleeves else 0.28, _SLEEVE)
    if ident.bag == "backpack" and view == "back":
        box(cx - 0.38 * pw, 0.18, cx + 0.38 * pw, 0.45, _BAG)
    elif ident.bag == "backpack" and view == "front":
        for side in (-1, 1):
            sx = cx + side * 0.28 * pw
            box(sx - 0.05 * pw, 0.15, sx + 0.05 * pw, 0.40, _BAG)
    elif ident.bag == "handbag":
        side = 1 if view != "back" else -1
        bx = cx + side * (pw / 2 + aw)
        box(min(bx, bx + side * 0.2 * ph), 0.44, max(bx, bx + side * 0.2 * ph), 0.62, _BAG)
    # Head, neck, hair, hat.
    box(cx - 0.04 * ph, 0.12, cx + 0.04 * ph, 0.16, _SKIN)
    hr = 0.065 * ph
    head = [cx - hr * 0.85, y(0.01), cx + hr * 0.85, y(0.01) + 2 * hr]
    draw.ellipse(head, fill=_HAIR if view == "back" else _SKIN)
    draw.chord([head[0], head[1], head[2], head[3] - hr * 0.6], 180, 360, fill=_HAIR)
    if ident.long_hair:
        hx = cx - hr * 0.9 if view != "side" else cx
        if view == "back":
            box(hx, 0.08, cx + hr * 0.9, 0.30, _HAIR)
        else:
            box(hx, 0.08, hx + hr * 0.35, 0.24, _HAIR)
    if ident.hat:
        box(cx - hr, 0.0, cx + hr, 0.045, _HAT)
    out = np.asarray(labels).copy()
    # Upper-garment pattern in torso coordinates (the logo is on the front only).
    v = ((np.arange(h, dtype=np.float32) - y(0.15)) / (0.39 * ph))[:, None]  # [H, 1]
    u = ((np.arange(w, dtype=np.float32) - (cx - pw / 2)) / pw)[None, :]  # [1, W]
    n, kind = ident.stripes, ident.pattern
    if kind == "hstripes":
        pattern = np.broadcast_to(np.floor(v * n) % 2 == 1, (h, w))
    elif kind == "vstripes":
        pattern = np.broadcast_to(np.floor(u * n) % 2 == 1, (h, w))
    elif kind == "checker":
        pattern = (np.floor(u * n) + np.floor(v * n)) % 2 == 1
    elif kind == "logo":
        front = view == "front"
        pattern = (np.abs(u - 0.5) < 0.22) & (v > 0.2) & (v < 0.5) & front
    elif kind == "two_tone":
        pattern = np.broadcast_to(v > 0.5, (h, w))
    else:
        pattern = np.zeros((h, w), dtype=bool)
    mask = pattern & (out == _UPPER)
    if rng.random() < 0.5:
        out, mask = out[:, ::-1], mask[:, ::-1]
    return out, mask


def _shift(a: np.ndarray, dx: int) -> np.ndarray:
    """Shift the columns of ``a`` by ``dx`` (zero fill)."""
    out = np.zeros_like(a)
    if dx >= 0:
        out[:, dx:] = a[:, : a.shape[1] - dx]
    else:
        out[:, :dx] = a[:, -dx:]
    return out


def _compose(
    ident: _Identity | None,
    cam: _Camera,
    rng: np.random.Generator,
    size: tuple[int, int],
    zoom: float = 1.0,
    *,
    unaligned: bool = False,
) -> Image.Image:
    """One image of ``ident`` (``None``: background only) seen by ``cam``.

    ``unaligned``: the unaligned mode's placement, clutter and occluders (module docstring).
    """
    h, w = size
    bh, bw = cam.background.shape[:2]
    oy, ox = int(rng.integers(0, bh - h + 1)), int(rng.integers(0, bw - w + 1))
    img = cam.background[oy : oy + h, ox : ox + w].copy()
    if unaligned:
        _clutter(img, rng)
    if ident is not None:
        scale = float(np.clip(cam.scale + rng.normal(0, 0.03), 0.6, 1.0))
        place = None
        if unaligned:  # per-image scale, vertical offset, aspect and proportions
            scale = float(rng.uniform(0.45, 0.95))
            place = _Placement(
                top=float(rng.uniform(-0.12 * scale, 1.0 - 0.85 * scale)),
                width=float(rng.uniform(0.75, 1.3)),
                waist=float(rng.uniform(-0.08, 0.08)),
            )
        ch, cw = round(h * zoom), round(w * zoom)
        labels, mask = _render_labels(ident, rng, (ch, cw), scale, place)
        if zoom != 1.0:  # a random window of a closer view (fragments: junk, distractors)
            ty, tx = int(rng.integers(0, ch - h + 1)), int(rng.integers(0, cw - w + 1))
            labels, mask = labels[ty : ty + h, tx : tx + w], mask[ty : ty + h, tx : tx + w]
        dx = int(rng.normal(0, 0.12 if unaligned else 0.04) * w)
        labels, mask = _shift(labels, dx), _shift(mask, dx)
        colours = np.zeros((10, 3), np.float32)
        colours[_SKIN], colours[_HAIR], colours[_UPPER] = ident.skin, ident.hair, ident.upper
        colours[_SLEEVE], colours[_LOWER], colours[_SHOES] = ident.upper, ident.lower, ident.shoes
        colours[_BAG], colours[_HAT] = ident.bag_colour, ident.hat_colour
        person = colours[labels]
        person[mask] = ident.upper2
        if ident.texture is not None:  # textured garments, random phase per image
            t = ident.texture.shape[0]
            ty0, tx0 = int(rng.integers(t)), int(rng.integers(t))
            tex = ident.texture[np.ix_((np.arange(h) + ty0) % t, (np.arange(w) + tx0) % t)]
            cloth = np.isin(labels, (_UPPER, _SLEEVE, _LOWER))
            person[cloth] *= tex[cloth][:, None]
        cols = np.nonzero((labels > 0).any(0))[0]
        if cols.size:  # cylindrical shading across the body
            c, half = (cols[0] + cols[-1]) / 2.0, max((cols[-1] - cols[0]) / 2.0, 1.0)
            shade = 1.0 - 0.22 * np.clip((np.arange(w) - c) / half, -1, 1) ** 2
            person *= shade[None, :, None].astype(np.float32)
        fg = labels > 0
        img[fg] = person[fg]
    if unaligned and rng.random() < 0.5:  # an occluder anywhere over the person
        oh, ow = int(h * rng.uniform(0.15, 0.4)), int(w * rng.uniform(0.3, 0.8))
        y1, x1 = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
        img[y1 : y1 + oh, x1 : x1 + ow] = _hsv(rng.random(), rng.uniform(0, 0.8), rng.random())
    if rng.random() < cam.occlusion:  # something between camera and person
        if rng.random() < 0.6:
            y0 = int(h * rng.uniform(0.6, 0.8))
            img[y0:] = cam.occluder
        else:
            x0 = int(w * rng.uniform(0.0, 0.7))
            img[:, x0 : x0 + int(w * rng.uniform(0.2, 0.35))] = cam.occluder * 0.8
    img *= cam.gain * np.float32(rng.uniform(0.92, 1.08))
    img = cam.gamma_lut[np.clip(img, 0, 255).astype(np.uint8)]
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(cam.noise)
    if cam.blur > 0.05:
        img = _blur3(_blur3(img, cam.blur, 0), cam.blur, 1)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """Draw 3-8 random rectangles and ellipses (some in garment-like colours) into ``img``."""
    h, w = img.shape[:2]
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 10, h // 3))
        colour = tuple(int(c) for c in _garment_colour(rng, 0.3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
    img[:] = np.asarray(canvas, dtype=np.float32)


def _blur3(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """3-tap Gaussian blur of ``a [H, W, C]`` along ``axis`` (edges replicated)."""
    side = np.float32(np.exp(-1.0 / (2.0 * sigma * sigma)))
    p = np.concatenate([a.take([0], axis), a, a.take([-1], axis)], axis)
    n = a.shape[axis]
    lo, mid, hi = (p.take(np.arange(i, i + n), axis) for i in range(3))
    return (mid + side * (lo + hi)) / (1 + 2 * side)


def _config_dict(cfg: SyntheticMarketConfig) -> dict[str, Any]:
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    out["generator_version"] = GENERATOR_VERSION
    return out


def generate_synthetic_market(
    root: str | os.PathLike[str],
    config: SyntheticMarketConfig | None = None,
    *,
    overwrite: bool = False,
    **kwargs: Any,
) -> Path:
    """Write a synthetic Market-1501-format dataset to ``root`` (see the module docstring).

    ``generate_synthetic_market(root, num_ids=100, images_per_id=16, seed=0)`` takes a few
    seconds on one CPU core. ``root`` then holds ``bounding_box_train/``,
    ``bounding_box_test/``, ``query/`` and ``synthetic_market.json`` (the config and counts).
    If ``root`` already holds a dataset generated from the same config it is reused.

    Args:
        root: output folder (created; must be absent or empty unless it holds an earlier
            synthetic dataset).
        config: the configuration; keyword arguments override its fields.
        overwrite: replace an earlier synthetic dataset with a different config.
        **kwargs: :class:`SyntheticMarketConfig` fields (``num_ids``, ``images_per_id``, ...).

    Returns:
        ``root`` as a :class:`~pathlib.Path` (pass it to :class:`~ev_reid.datasets.Market1501`).

    Raises:
        FileExistsError: ``root`` holds other files, or an earlier synthetic dataset with a
            different config and ``overwrite`` is false.
    """
    cfg = dataclasses.replace(config or SyntheticMarketConfig(), **kwargs)
    root = Path(root).expanduser()
    marker = root / MARKER
    if root.exists() and any(root.iterdir()):
        if not marker.is_file():
            raise FileExistsError(f"{root} is not empty and holds no {MARKER}; refusing to write")
        try:
            info = json.loads(marker.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            info = None  # unreadable marker: treated as another config
        previous = info.get("config") if isinstance(info, dict) else None
        if previous == _config_dict(cfg):
            return root
        if not overwrite:
            raise FileExistsError(
                f"{root} holds a synthetic dataset with another config; pass overwrite=True"
            )
        shutil.rmtree(root)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = _generate(tmp, cfg)
        write_json(tmp / MARKER, {"config": _config_dict(cfg), "counts": counts})
        if root.exists():
            root.rmdir()
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _generate(out: Path, cfg: SyntheticMarketConfig) -> dict[str, int]:
    size = cfg.image_size
    dirs = {k: out / k for k in ("bounding_box_train", "bounding_box_test", "query")}
    for d in dirs.values():
        d.mkdir(parents=True)
    cams = [
        _Camera.sample(np.random.default_rng([cfg.seed, 1, c]), size)
        for c in range(cfg.num_cameras)
    ]
    rng = np.random.default_rng([cfg.seed, 0])
    pids = np.sort(rng.choice(np.arange(1, max(1502, 2 * cfg.num_ids)), cfg.num_ids, replace=False))
    train_mask = np.zeros(cfg.num_ids, bool)
    n_train = min(max(1, round(cfg.num_ids * cfg.train_fraction)), cfg.num_ids - 1)
    train_mask[rng.permutation(cfg.num_ids)[:n_train]] = True
    frame = [0] * cfg.num_cameras
    counts = dict.fromkeys(("train", "query", "gallery", "distractors", "junk"), 0)

    def save(img: Image.Image, folder: str, pid: int, cam: int, r: np.random.Generator) -> None:
        frame[cam] += int(r.integers(1, 50))
        name = f"{pid:04d}" if pid >= 0 else str(pid)
        name += f"_c{cam + 1}s{int(r.integers(1, 7))}_{frame[cam]:06d}_{int(r.integers(1, 9)):02d}"
        img.save(dirs[folder] / f"{name}.jpg", quality=cfg.jpeg_quality)

    unaligned = cfg.mode == "unaligned"
    n_distract = cfg.num_ids // 2 if cfg.num_distractors is None else cfg.num_distractors
    n_junk = cfg.num_ids // 5 if cfg.num_junk is None else cfg.num_junk
    test_idents = []
    for pid, is_train in progress(
        list(zip(pids.tolist(), train_mask.tolist(), strict=True)), desc="synthetic identities"
    ):
        r = np.random.default_rng([cfg.seed, 2, pid])
        ident = _Identity.sample(r)
        if unaligned:
            ident = ident.with_texture(np.random.default_rng([cfg.seed, 4, pid]))
        n = int(
            r.integers(max(4, round(cfg.images_per_id * 0.75)), round(cfg.images_per_id * 1.25) + 1)
        )
        k = int(r.integers(2, min(cfg.num_cameras, n // 2) + 1))
        id_cams = r.choice(cfg.num_cameras, k, replace=False)
        per_cam = np.concatenate([np.repeat(id_cams, 2), r.choice(id_cams, n - 2 * k)])
        if not is_train:
            test_idents.append(ident)
        queried: set[int] = set()
        for cam in per_cam.tolist():
            img = _compose(ident, cams[cam], r, size, unaligned=unaligned)
            if is_train:
                save(img, "bounding_box_train", pid, cam, r)
                counts["train"] += 1
            elif cam not in queried:  # one query per camera; >= 1 more image stays in gallery
                queried.add(cam)
                save(img, "query", pid, cam, r)
                counts["query"] += 1
            else:
                save(img, "bounding_box_test", pid, cam, r)
                counts["gallery"] += 1
    r = np.random.default_rng([cfg.seed, 3])
    for _ in range(n_distract):  # background crops or truncated strangers
        cam = int(r.integers(cfg.num_cameras))
        stranger = _Identity.sample(r) if r.random() < 0.5 else None
        if stranger is not None and unaligned:
            stranger = stranger.with_texture(r)
        img = _compose(
            stranger, cams[cam], r, size, zoom=float(r.uniform(1.3, 2.0)), unaligned=unaligned
        )
        save(img, "bounding_box_test", 0, cam, r)
        counts["distractors"] += 1
    for _ in range(n_junk):  # fragments of test identities
        cam = int(r.integers(cfg.num_cameras))
        ident = test_idents[int(r.integers(len(test_idents)))]
        img = _compose(
            ident, cams[cam], r, size, zoom=float(r.uniform(2.5, 4.0)), unaligned=unaligned
        )
        save(img, "bounding_box_test", -1, cam, r)
        counts["junk"] += 1
    return counts
