"""Synthetic indoor scenes: a floor, walls and furniture-like boxes with colours and noise.

Used by the demo, the tests and the benchmarks in place of S3DIS / ScanNet (which need a
licence and gigabytes). Each scene is a random rectangular room with tables, chairs,
bookcases, sofas and clutter; points are sampled on the surfaces at a uniform density,
jittered, and coloured with a per-class hue, a per-object tint and per-point noise, so neither
colour nor height alone separates the classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ev_points.data.scene import PointScene

__all__ = [
    "SYNTHETIC_CLASSES",
    "SyntheticSceneConfig",
    "make_synthetic_scene",
    "make_synthetic_scenes",
]

SYNTHETIC_CLASSES = ("floor", "wall", "table", "chair", "bookcase", "sofa", "clutter")
_BASE_COLOUR = np.array(
    [
        [150, 130, 110],
        [200, 200, 190],
        [140, 95, 60],
        [120, 85, 55],
        [110, 80, 50],
        [90, 100, 140],
        [160, 140, 120],
    ],
    dtype=np.float64,
)


@dataclass
class SyntheticSceneConfig:
    """Settings of :func:`make_synthetic_scene`.

    Attributes:
        num_points: points per scene (sampled from the surfaces).
        room_size: min / max side of the room (metres).
        wall_height: metres.
        furniture: min / max number of each furniture kind.
        jitter: Gaussian noise on coordinates (metres).
        colour_noise: per-point Gaussian colour noise (0..255 scale).
        tint: per-object colour tint spread.
    """

    num_points: int = 8192
    room_size: tuple[float, float] = (4.0, 7.0)
    wall_height: float = 2.6
    furniture: tuple[int, int] = (1, 3)
    jitter: float = 0.01
    colour_noise: float = 18.0
    tint: float = 30.0


def _box_surface(
    rng: np.random.Generator, center: tuple, size: tuple, yaw: float, n: int
) -> np.ndarray:
    """``n`` points uniform on the surface of a box (area-weighted faces), rotated about z."""
    sx, sy, sz = size
    areas = np.array([sy * sz, sy * sz, sx * sz, sx * sz, sx * sy, sx * sy])
    face = rng.choice(6, size=n, p=areas / areas.sum())
    u = rng.uniform(-0.5, 0.5, size=(n, 3)) * np.array(size)
    axis, sign = face // 2, np.where(face % 2 == 0, -0.5, 0.5)
    # faces 0,1 -> x fixed; 2,3 -> y; 4,5 -> z
    fixed = np.array([0, 0, 1, 1, 2, 2])[face]
    u[np.arange(n), fixed] = sign * np.array(size)[fixed]
    del axis
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return u @ rot.T + np.asarray(center)


def _parts(
    rng: np.random.Generator, kind: str, x: float, y: float, yaw: float
) -> list[tuple[tuple, tuple]]:
    """(center, size) boxes of one furniture object standing at (x, y)."""
    if kind == "table":
        w, d, h = rng.uniform(0.8, 1.6), rng.uniform(0.6, 0.9), rng.uniform(0.7, 0.78)
        legs = [
            ((x + a * (w / 2 - 0.05), y + b * (d / 2 - 0.05), h / 2), (0.05, 0.05, h))
            for a in (-1, 1)
            for b in (-1, 1)
        ]
        return [((x, y, h), (w, d, 0.04)), *legs]
    if kind == "chair":
        w, h = rng.uniform(0.4, 0.5), rng.uniform(0.42, 0.48)
        legs = [
            ((x + a * (w / 2 - 0.03), y + b * (w / 2 - 0.03), h / 2), (0.03, 0.03, h))
            for a in (-1, 1)
            for b in (-1, 1)
        ]
        return [((x, y, h), (w, w, 0.05)), ((x, y + w / 2, h + 0.25), (w, 0.05, 0.5)), *legs]
    if kind == "bookcase":
        w, d, h = rng.uniform(0.8, 1.2), rng.uniform(0.3, 0.4), rng.uniform(1.6, 2.1)
        shelves = [((x, y, z), (w, d, 0.03)) for z in np.linspace(0.3, h - 0.1, 4)]
        return [((x, y, h / 2), (w, d, h)), *shelves]
    if kind == "sofa":
        w, d = rng.uniform(1.6, 2.2), rng.uniform(0.8, 0.95)
        return [((x, y, 0.22), (w, d, 0.44)), ((x, y + d / 2 - 0.1, 0.6), (w, 0.2, 0.4)),
                ((x - w / 2 + 0.1, y, 0.5), (0.2, d, 0.25)), ((x + w / 2 - 0.1, y, 0.5), (0.2, d, 0.25))]  # fmt: skip
    s = rng.uniform(0.1, 0.35, size=3)
    return [((x, y, s[2] / 2), tuple(s))]


def make_synthetic_scene(
    seed: int, config: SyntheticSceneConfig | None = None, name: str | None = None
) -> PointScene:
    """One random room (deterministic in ``seed``); labels index :data:`SYNTHETIC_CLASSES`."""
    cfg = config or SyntheticSceneConfig()
    rng = np.random.default_rng(seed)
    lx, ly = rng.uniform(*cfg.room_size, size=2)
    hz = cfg.wall_height
    boxes: list[tuple[int, int, tuple, tuple, float]] = []  # class, instance, center, size, yaw
    boxes.append((0, 0, (lx / 2, ly / 2, -0.02), (lx, ly, 0.04), 0.0))
    for i, (c, s) in enumerate([((lx / 2, 0, hz / 2), (lx, 0.1, hz)), ((lx / 2, ly, hz / 2), (lx, 0.1, hz)),
                                ((0, ly / 2, hz / 2), (0.1, ly, hz)), ((lx, ly / 2, hz / 2), (0.1, ly, hz))]):  # fmt: skip
        boxes.append((1, 1 + i, c, s, 0.0))
    instance = 5
    for cls, kind in enumerate(SYNTHETIC_CLASSES[2:], start=2):
        lo, hi = cfg.furniture
        for _ in range(int(rng.integers(lo, hi + 1)) * (2 if kind in ("chair", "clutter") else 1)):
            margin = 0.6
            x, y = rng.uniform(margin, lx - margin), rng.uniform(margin, ly - margin)
            yaw = float(rng.uniform(0, 2 * np.pi)) if kind != "bookcase" else 0.0
            if kind == "bookcase":  # against a wall
                y = ly - 0.25
            for center, size in _parts(rng, kind, x, y, yaw):
                boxes.append((cls, instance, center, size, yaw if kind != "bookcase" else 0.0))
            instance += 1
    # floor and walls are sampled sparser than furniture so that objects get enough points
    density = np.array([0.35, 0.15, 1, 1, 1, 1, 1.5])
    areas = np.array(
        [density[c] * 2 * (s[0] * s[1] + s[1] * s[2] + s[0] * s[2]) for c, _, _, s, _ in boxes]
    )
    counts = rng.multinomial(cfg.num_points, areas / areas.sum())
    tints = rng.normal(0.0, cfg.tint, size=(instance + 1, 3))
    coords, colours, segs, insts = [], [], [], []
    for (cls, inst, center, size, yaw), n in zip(boxes, counts, strict=True):
        if n == 0:
            continue
        pts = _box_surface(rng, center, size, yaw, int(n))
        coords.append(pts)
        colours.append(
            _BASE_COLOUR[cls] + tints[inst] + rng.normal(0.0, cfg.colour_noise, size=(int(n), 3))
        )
        segs.append(np.full(int(n), cls))
        insts.append(np.full(int(n), inst))
    coord = np.concatenate(coords) + rng.normal(0.0, cfg.jitter, size=(cfg.num_points, 3))
    return PointScene(
        name=name or f"synthetic_{seed:05d}",
        coord=coord.astype(np.float32),
        color=np.clip(np.concatenate(colours), 0, 255).astype(np.uint8),
        segment=np.concatenate(segs).astype(np.int16),
        instance=np.concatenate(insts).astype(np.int16),
    )


def make_synthetic_scenes(
    count: int, seed: int = 0, config: SyntheticSceneConfig | None = None
) -> list[PointScene]:
    """``count`` scenes with seeds ``seed, seed + 1, ...``."""
    return [make_synthetic_scene(seed + i, config) for i in range(count)]
