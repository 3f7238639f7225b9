"""MME list parsing: the official layout, malformed lines, missing files, fuzzing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ev_adapt.data import ImageListError, mme_lists, read_image_list


def _write_scenario(root: Path, classes: int = 3) -> Path:
    lists = root / "txt" / "multi"
    lists.mkdir(parents=True)
    names = {
        "labeled_source_images_real.txt": ("real", 4),
        "labeled_target_images_sketch_3.txt": ("sketch", 3),
        "unlabeled_target_images_sketch_3.txt": ("sketch", 5),
        "validation_target_images_sketch_3.txt": ("sketch", 3),
    }
    for name, (domain, per_class) in names.items():
        lines = []
        for c in range(classes):
            for i in range(per_class):
                rel = f"{domain}/class_{c}/{name[:5]}_{i}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(b"")
                lines.append(f"{rel} {c}")
        (lists / name).write_text("\n".join(lines) + "\n")
    return lists


def test_official_layout(tmp_path: Path) -> None:
    lists = _write_scenario(tmp_path)
    scenario = mme_lists(lists, tmp_path, "multi", "real", "sketch", 3)
    assert scenario.num_classes == 3
    assert len(scenario.labeled_source) == 12 and len(scenario.labeled_target) == 9
    assert scenario.unlabeled_target[0].path == tmp_path / "sketch/class_0/unlab_0.jpg"


def test_missing_list_names_the_file(tmp_path: Path) -> None:
    lists = _write_scenario(tmp_path)
    (lists / "validation_target_images_sketch_3.txt").unlink()
    with pytest.raises(ImageListError, match=r"validation_target_images_sketch_3\.txt"):
        mme_lists(lists, tmp_path, "multi", "real", "sketch", 3)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("just_a_path.jpg", "expected '<path> <label>'"),
        ("a.jpg seven", "not an integer"),
        ("a.jpg -1", "negative"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "list.txt"
    f.write_text(f"ok.jpg 0\n\n{line}\n")
    (tmp_path / "ok.jpg").write_bytes(b"")
    with pytest.raises(ImageListError, match=message) as info:
        read_image_list(f)
    assert f"{f}:3" in str(info.value)


def test_missing_images_reported_together(tmp_path: Path) -> None:
    f = tmp_path / "list.txt"
    f.write_text("a.jpg 0\nb.jpg 1\nc.jpg 1\n")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(ImageListError, match="2 of 3 images"):
        read_image_list(f)
    assert len(read_image_list(f, check_files=False)) == 3


def test_unknown_benchmark_and_shots(tmp_path: Path) -> None:
    with pytest.raises(ImageListError, match="benchmark"):
        mme_lists(tmp_path, tmp_path, "imagenet", "a", "b", 3)
    with pytest.raises(ImageListError, match="shots"):
        mme_lists(tmp_path, tmp_path, "multi", "real", "sketch", 5)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_fuzzed_lists_parse_or_raise_our_error(tmp_path: Path, content: str | bytes) -> None:
    f = tmp_path / "fuzz.txt"
    f.write_bytes(
        content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass")
    )
    try:
        entries = read_image_list(f, check_files=False)
    except ImageListError as exc:
        message = str(exc)
    else:
        message = str(f)
        assert entries and all(e.label >= 0 for e in entries)
    assert str(f) in message
