"""Point-cloud datasets: S3DIS and ScanNet v2 readers, grid subsampling, the preprocessed
cache and synthetic indoor scenes."""

from ev_points.data.cache import load_cache, load_cached_scene, preprocess, save_scene
from ev_points.data.grid import GridSample, grid_subsample
from ev_points.data.ply import read_ply_vertices, write_ply_vertices
from ev_points.data.s3dis import (
    S3DIS_CLASSES,
    list_s3dis_rooms,
    read_s3dis_room,
    s3dis_area_split,
    s3dis_six_fold,
)
from ev_points.data.scannet import (
    LABEL_MAP_FILE,
    SCANNET20_CLASSES,
    SCANNET20_NYU40_IDS,
    list_scannet_scenes,
    nyu40_to_scannet20,
    read_label_map,
    read_scannet_scene,
)
from ev_points.data.scene import IGNORE_INDEX, PointDataError, PointScene
from ev_points.data.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticSceneConfig,
    make_synthetic_scene,
    make_synthetic_scenes,
)

__all__ = [
    "IGNORE_INDEX",
    "LABEL_MAP_FILE",
    "S3DIS_CLASSES",
    "SCANNET20_CLASSES",
    "SCANNET20_NYU40_IDS",
    "SYNTHETIC_CLASSES",
    "GridSample",
    "PointDataError",
    "PointScene",
    "SyntheticSceneConfig",
    "grid_subsample",
    "list_s3dis_rooms",
    "list_scannet_scenes",
    "load_cache",
    "load_cached_scene",
    "make_synthetic_scene",
    "make_synthetic_scenes",
    "nyu40_to_scannet20",
    "preprocess",
    "read_label_map",
    "read_ply_vertices",
    "read_s3dis_room",
    "read_scannet_scene",
    "s3dis_area_split",
    "s3dis_six_fold",
    "save_scene",
    "write_ply_vertices",
]
