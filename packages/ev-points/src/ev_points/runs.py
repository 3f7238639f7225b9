"""Library functions behind the CLI: dataset choice, training on a cache, evaluating a run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ev_core.checkpoint import load_checkpoint
from ev_core.errors import EvError
from ev_points.data import (
    LABEL_MAP_FILE,
    S3DIS_CLASSES,
    SCANNET20_CLASSES,
    SYNTHETIC_CLASSES,
    PointScene,
    list_s3dis_rooms,
    list_scannet_scenes,
    load_cache,
    preprocess,
    read_label_map,
    read_s3dis_room,
    read_scannet_scene,
)
from ev_points.models import PointUNet, PointUNetConfig

__all__ = ["CLASS_NAMES", "load_run_model", "preprocess_dataset", "split_scenes"]

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "s3dis": S3DIS_CLASSES,
    "scannet": SCANNET20_CLASSES,
    "synthetic": SYNTHETIC_CLASSES,
}
DEFAULT_GRID = {"s3dis": 0.04, "scannet": 0.02}


def preprocess_dataset(
    dataset: str,
    root: Path,
    out: Path,
    *,
    grid_size: float | None = None,
    areas: Sequence[int] = (1, 2, 3, 4, 5, 6),
    split_file: Path | None = None,
    label_map: Path | None = None,
) -> list[Path]:
    """Read a raw S3DIS / ScanNet v2 tree and write the grid-subsampled cache under ``out``."""
    grid = DEFAULT_GRID.get(dataset) if grid_size is None else grid_size
    if dataset == "s3dis":
        return preprocess(
            list_s3dis_rooms(root, tuple(areas)),
            read_s3dis_room,
            out,
            grid_size=grid,
            dataset="s3dis",
        )
    if dataset == "scannet":
        mapping = read_label_map(label_map or root / LABEL_MAP_FILE)
        scenes = list_scannet_scenes(root, split_file)
        return preprocess(
            scenes, lambda p: read_scannet_scene(p, mapping), out, grid_size=grid, dataset="scannet"
        )
    raise EvError(f"unknown dataset {dataset!r} (choose s3dis or scannet)")


def cache_dataset(cache: Path) -> str:
    """The dataset name recorded in a cache's ``meta.json``."""
    meta = cache / "meta.json"
    if not meta.is_file():
        raise EvError(
            "not an ev-points cache (no meta.json); run `ev-points preprocess`", path=cache
        )
    return str(json.loads(meta.read_text())["dataset"])


def split_scenes(
    scenes: list[PointScene], dataset: str, test_area: int | None
) -> tuple[list[PointScene], list[PointScene]]:
    """S3DIS: hold out ``Area_<test_area>``; other datasets: the whole cache is one split."""
    if dataset != "s3dis" or test_area is None:
        return scenes, []
    test = [s for s in scenes if s.name.startswith(f"Area_{test_area}/")]
    train = [s for s in scenes if not s.name.startswith(f"Area_{test_area}/")]
    if not test:
        raise EvError(f"the cache holds no Area_{test_area} rooms")
    return train, test


def load_run_model(run: Path, *, ema: bool = True, device: str = "cpu") -> PointUNet:
    """The model of a training run: its newest complete checkpoint (EMA teacher by default)."""
    ckpts = run / "checkpoints"
    latest = ckpts / "latest"
    if not latest.is_file():
        raise EvError("no complete checkpoint in this run (checkpoints/latest missing)", path=run)
    folder = ckpts / latest.read_text().strip()
    weights = folder / (
        "ema.safetensors" if ema and (folder / "ema.safetensors").is_file() else "model.safetensors"
    )
    state, info = load_checkpoint(weights, map_location=device)
    cfg = info.get("config") or {}
    try:
        model = PointUNet(PointUNetConfig(**{**cfg, "channels": tuple(cfg["channels"])}))
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise EvError(f"checkpoint does not describe a PointUNet ({exc})", path=weights) from None
    return model.to(device).eval()


def metrics_summary(metrics: dict[str, Any]) -> str:
    """One line: mIoU / OA / mAcc in percent."""
    return f"mIoU {100 * metrics['miou']:.1f}  OA {100 * metrics['oa']:.1f}  mAcc {100 * metrics['macc']:.1f}"


def default_device() -> str:
    """``cuda`` when available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ += ["cache_dataset", "default_device", "load_cache", "metrics_summary"]
