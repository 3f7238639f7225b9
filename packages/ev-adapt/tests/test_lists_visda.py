"""VisDA-2017 in MCL's layout: its own list names, source images under train/, target under validation/."""

from __future__ import annotations

from pathlib import Path

import pytest

from ev_adapt.data import ImageListError, mme_lists


def _write(root: Path, lists: Path, name: str, folder: str, n: int) -> None:
    lines = []
    for c in range(12):
        for i in range(n):
            rel = f"class_{c}/{name[:8]}_{i}.jpg"
            (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / folder / rel).write_bytes(b"")
            lines.append(f"{rel} {c}")
    (lists / name).write_text("\n".join(lines) + "\n")


def test_visda_layout(tmp_path: Path) -> None:
    lists = tmp_path / "txt" / "visda"
    lists.mkdir(parents=True)
    _write(tmp_path, lists, "image_list.txt", "train", 2)
    _write(tmp_path, lists, "set1_labeled_target_images_sketch_3.txt", "validation", 3)
    _write(tmp_path, lists, "set1_unlabeled_target_images_sketch_3.txt", "validation", 4)
    _write(tmp_path, lists, "validation.txt", "validation", 1)
    scenario = mme_lists(lists, tmp_path, "visda", "train", "validation", 3)
    assert scenario.num_classes == 12
    assert len(scenario.labeled_source) == 24 and len(scenario.unlabeled_target) == 48
    assert scenario.labeled_source[0].path.is_relative_to(tmp_path / "train")
    assert scenario.validation[0].path.is_relative_to(tmp_path / "validation")
    with pytest.raises(ImageListError, match=r"set1_labeled_target_images_sketch_1\.txt"):
        mme_lists(lists, tmp_path, "visda", "train", "validation", 1)


def test_unknown_domain_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageListError, match="--target"):
        mme_lists(tmp_path, tmp_path, "multi", "real", "quickdraw", 3)
