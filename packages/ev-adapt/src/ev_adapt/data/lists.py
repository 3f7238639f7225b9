"""MME-format image lists (``relative/path.jpg <label>`` per line) and the datasets they describe.

File names follow the MME/MCL release (``data/txt/<benchmark>/``):
``labeled_source_images_<source>.txt``, ``labeled_target_images_<target>_<shots>.txt``,
``unlabeled_target_images_<target>_<shots>.txt``, ``validation_target_images_<target>_3.txt``.
VisDA-2017 uses MCL's names instead: ``image_list.txt`` (the source list, VisDA's own
``train/image_list.txt``, not shipped with MCL), ``set1_{labeled,unlabeled}_target_images_sketch_<shots>.txt``
and ``validation.txt``, with source paths relative to ``<image_root>/train`` and target paths
to ``<image_root>/validation``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ev_core.errors import EvError

__all__ = [
    "BENCHMARK_DOMAINS",
    "ImageListError",
    "ListEntry",
    "SSDALists",
    "mme_lists",
    "read_image_list",
]

BENCHMARK_DOMAINS: dict[str, tuple[str, ...]] = {
    "multi": ("real", "clipart", "painting", "sketch"),  # DomainNet-126
    "office_home": ("Art", "Clipart", "Product", "Real"),
    "visda": ("train", "validation"),
}


class ImageListError(EvError):
    """An image list is missing, unreadable or malformed (the message names the file and line)."""


@dataclass(frozen=True)
class ListEntry:
    """One line of an image list: the image file and its class index."""

    path: Path
    label: int


def read_image_list(
    list_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> list[ListEntry]:
    """Parse an MME list: one ``<relative image path> <integer label>`` per non-empty line.

    Args:
        list_file: the ``.txt`` list.
        image_root: folder the paths are relative to (default: the list's folder).
        check_files: verify that every image exists (all missing ones reported at once).

    Returns:
        The entries in file order.

    Raises:
        ImageListError: for a missing/unreadable file, a malformed line (named by number), a
            negative label, an empty list, or missing images.
    """
    path = Path(list_file)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImageListError("image list not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageListError(f"cannot read the image list: {exc}", path=path) from None
    entries: list[ListEntry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise ImageListError(
                f"{path}:{number}: expected '<path> <label>', got {raw!r}", path=path
            )
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            raise ImageListError(
                f"{path}:{number}: the label {label_text!r} is not an integer", path=path
            ) from None
        if label < 0:
            raise ImageListError(f"{path}:{number}: negative label {label}", path=path)
        entries.append(ListEntry(root / rel, label))
    if not entries:
        raise ImageListError("the image list has no entries", path=path)
    if check_files:
        missing = [(i, e.path) for i, e in enumerate(entries, start=1) if not e.path.is_file()]
        if missing:
            shown = ", ".join(str(p) for _, p in missing[:3])
            raise ImageListError(
                f"{len(missing)} of {len(entries)} images listed are missing under {root} "
                f"(first: {shown})",
                path=path,
            )
    return entries


@dataclass
class SSDALists:
    """The lists of one semi-supervised adaptation scenario.

    Attributes:
        labeled_source: every labelled source image.
        labeled_target: the 1/3-shot labelled target images.
        unlabeled_target: the remaining target images (also the test set, as in MME/MCL).
        validation: the target validation images.
        num_classes: 1 + the largest label in any list.
    """

    labeled_source: list[ListEntry]
    labeled_target: list[ListEntry]
    unlabeled_target: list[ListEntry]
    validation: list[ListEntry]
    num_classes: int


def mme_lists(
    list_dir: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    benchmark: str,
    source: str,
    target: str,
    shots: int,
    check_files: bool = True,
) -> SSDALists:
    """Read the four lists of a scenario in the MME layout.

    Args:
        list_dir: the folder with the ``.txt`` lists (e.g. ``data/txt/multi``).
        image_root: the folder the image paths are relative to.
        benchmark: ``"multi"`` (DomainNet-126), ``"office_home"`` or ``"visda"``.
        source: source domain (e.g. ``"real"``).
        target: target domain (e.g. ``"clipart"``).
        shots: 1 or 3 labelled target images per class.
        check_files: verify that every image exists.

    Raises:
        ImageListError: for an unknown benchmark/domain, a missing list or bad contents.
    """
    if benchmark not in BENCHMARK_DOMAINS:
        raise ImageListError(
            f"--benchmark must be one of {sorted(BENCHMARK_DOMAINS)}, got {benchmark!r}"
        )
    if shots not in (1, 3):
        raise ImageListError(f"--shots must be 1 or 3, got {shots}")
    domains = BENCHMARK_DOMAINS[benchmark]
    for option, domain in (("--source", source), ("--target", target)):
        if domain not in domains:
            raise ImageListError(
                f"{option} must be one of {list(domains)} for {benchmark}, got {domain!r}"
            )
    folder = Path(list_dir)
    root = Path(image_root)
    if benchmark == "visda":  # MCL's VisDA lists (source: VisDA's own train list)
        names = {
            "labeled_source": "image_list.txt",
            "labeled_target": f"set1_labeled_target_images_sketch_{shots}.txt",
            "unlabeled_target": f"set1_unlabeled_target_images_sketch_{shots}.txt",
            "validation": "validation.txt",
        }
        roots = {key: root / target for key in names} | {"labeled_source": root / source}
    else:
        names = {
            "labeled_source": f"labeled_source_images_{source}.txt",
            "labeled_target": f"labeled_target_images_{target}_{shots}.txt",
            "unlabeled_target": f"unlabeled_target_images_{target}_{shots}.txt",
            "validation": f"validation_target_images_{target}_3.txt",
        }
        roots = {key: root for key in names}
    read = {
        key: read_image_list(folder / name, roots[key], check_files) for key, name in names.items()
    }
    num_classes = 1 + max(e.label for entries in read.values() for e in entries)
    return SSDALists(num_classes=num_classes, **read)
