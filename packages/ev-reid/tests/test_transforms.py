"""Re-id transforms: output shapes/dtypes, exact normalisation, padding crop, erasing, and the
stripe alignment of UP-ReID pre-training views."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ev_reid.data import (
    PretrainViewConfig,
    ReidTransformConfig,
    build_pretrain_views,
    build_test_transform,
    build_train_transform,
    min_aligned_crop_scale,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _normalise(u8: torch.Tensor) -> torch.Tensor:
    return (u8.float() / 255.0 - MEAN) / STD


def _pattern(h: int, w: int) -> Image.Image:
    """A deterministic image where every pixel differs from its neighbours."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(7 * y + 3 * x) % 256, (11 * x + 5 * y) % 256, (x * y) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8))


def test_default_shapes_and_dtypes(restore_rng: None) -> None:
    img = Image.new("RGB", (64, 128), (200, 30, 90))
    train = build_train_transform()(img)
    test = build_test_transform()(img)
    assert train.shape == test.shape == (3, 256, 128)
    assert train.dtype == test.dtype == torch.float32
    # a constant image resizes to itself: the test transform is exactly the normalisation
    expected = _normalise(torch.tensor([200, 30, 90], dtype=torch.uint8).view(3, 1, 1))
    torch.testing.assert_close(test, expected.expand(3, 256, 128), rtol=0, atol=1e-6)


def test_flip_and_padding_crop_are_translations(restore_rng: None) -> None:
    torch.manual_seed(0)
    h, w, pad = 16, 8, 3
    img = _pattern(h, w)  # already at the output size: resize is the identity
    src = _normalise(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    black = _normalise(torch.zeros(3, 1, 1, dtype=torch.uint8))  # zero padding, normalised
    flip = ReidTransformConfig(height=h, width=w, hflip_p=1.0, padding=0, erasing_p=0.0)
    torch.testing.assert_close(build_train_transform(flip)(img), src.flip(-1), rtol=0, atol=1e-6)
    cfg = ReidTransformConfig(height=h, width=w, hflip_p=0.0, padding=pad, erasing_p=0.0)
    transform = build_train_transform(cfg)
    canvas = black.expand(3, h + 2 * pad, w + 2 * pad).clone()
    canvas[:, pad : pad + h, pad : pad + w] = src
    seen = set()
    for _ in range(40):
        out = transform(img)
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.allclose(out, canvas[:, dy : dy + h, dx : dx + w], atol=1e-6)
        ]
        assert len(matches) == 1  # exactly one translation within ±pad explains the output
        seen.add(matches[0])
    assert len(seen) > 5  # the crop position is random


@pytest.mark.parametrize("value", ["mean", 1.5])
def test_random_erasing_fill_and_area(restore_rng: None, value: str | float) -> None:
    torch.manual_seed(1)
    h, w = 64, 32
    img = Image.new("RGB", (w, h), (255, 255, 255))
    cfg = ReidTransformConfig(height=h, width=w, hflip_p=0.0, padding=0, erasing_p=1.0,
                              erasing_value=value)  # fmt: skip
    white = _normalise(torch.full((3, 1, 1), 255, dtype=torch.uint8))
    fill = 0.0 if value == "mean" else value  # "mean": the mean colour is 0 once normalised
    for _ in range(20):
        out = build_train_transform(cfg)(img)
        erased = ~torch.isclose(out, white.expand_as(out), atol=1e-6).all(0)
        area = erased.float().mean().item()
        assert 0.02 - 1e-3 <= area <= 0.4 + 1e-3
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        box = erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()  # one axis-aligned rectangle
        assert torch.allclose(out[:, erased], torch.tensor(fill), atol=1e-6)
    none = ReidTransformConfig(height=h, width=w, erasing_p=0.0, padding=0, hflip_p=0.0)
    assert torch.allclose(build_train_transform(none)(img), white.expand(3, h, w))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="erasing_value"):
        ReidTransformConfig(erasing_value="zeros")
    with pytest.raises(ValueError, match="hflip_p"):
        ReidTransformConfig(hflip_p=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        ReidTransformConfig(interpolation="nearest-ish")


def test_min_aligned_crop_scale_matches_brute_force() -> None:
    """Reference: scan side fractions and offsets and find the smallest side for which the
    centre of every output stripe stays inside the same source stripe."""
    for n in (1, 2, 3, 4, 6):
        s = np.linspace(0.5, 1.0, 2001)[:, None, None]
        offsets = np.linspace(0.0, 1.0, 101)[None, :, None] * (1.0 - s)
        k = np.arange(n)[None, None, :]
        centres = offsets + s * (k + 0.5) / n
        inside = (centres >= k / n - 1e-12) & (centres <= (k + 1) / n + 1e-12)
        ok = inside.all(axis=(1, 2))
        smallest = s[np.argmax(ok), 0, 0] if n > 1 else 0.0
        assert min_aligned_crop_scale(n) == pytest.approx(smallest**2, abs=5e-4)
    assert min_aligned_crop_scale(3) == pytest.approx(0.64)
    with pytest.raises(ValueError, match="breaks the alignment"):
        PretrainViewConfig(crop_scale=(0.5, 1.0), num_stripes=3)


def test_pretrain_views_shapes_original_and_stripe_alignment(restore_rng: None) -> None:
    torch.manual_seed(0)
    h, w, n = 96, 48, 3
    rows = np.repeat(np.arange(h, dtype=np.uint8)[:, None], w, 1)  # red channel = source row
    img = Image.fromarray(np.stack([rows, np.full_like(rows, 80), np.full_like(rows, 160)], -1))
    geometric = PretrainViewConfig(height=h, width=w, num_stripes=n, color_jitter_p=0.0,
                                   grayscale_p=0.0, blur_p=0.0)  # fmt: skip
    views = build_pretrain_views(geometric)
    src = _normalise(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    crops_seen = set()
    for _ in range(20):
        v1, v2, orig = views(img)
        assert v1.shape == v2.shape == orig.shape == (3, h, w)
        assert v1.dtype == v2.dtype == orig.dtype == torch.float32
        assert torch.allclose(orig, src, atol=1e-6) or torch.allclose(orig, src.flip(-1), atol=1e-6)
        for v in (v1, v2):
            source_row = (v[0] * STD[0] + MEAN[0]) * 255.0  # [H, W]
            for k in range(n):
                centre = int((k + 0.5) * h / n)
                row = source_row[centre].mean().item()
                assert k * h / n - 1 <= row <= (k + 1) * h / n + 1, (k, row)
            crops_seen.add(round(source_row[0].mean().item()))
    assert len(crops_seen) > 5  # the crops really vary
    # defaults: photometric jitter changes colours but not the shapes
    v1, v2, orig = build_pretrain_views()(Image.new("RGB", (50, 100), (20, 200, 40)))
    assert v1.shape == v2.shape == orig.shape == (3, 256, 128)
