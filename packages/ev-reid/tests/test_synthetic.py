"""The synthetic Market-format generator: layout, determinism, and that identity is learnable
(a trivial colour feature scores far above chance) while random features score at chance."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ev_reid.datasets import Market1501, SyntheticMarketConfig, generate_synthetic_market
from ev_reid.records import ReidRecord

CFG = SyntheticMarketConfig(num_ids=40, images_per_id=10, num_cameras=5, image_size=(64, 32))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_market(tmp_path_factory.mktemp("synth") / "market", CFG)


def test_layout_and_counts(synth: Path) -> None:
    meta = json.loads((synth / "synthetic_market.json").read_text())
    counts = meta["counts"]
    assert meta["config"]["num_ids"] == 40
    ds = Market1501(synth)
    names = {p.name for p in (synth / "bounding_box_test").iterdir()}
    assert sum(n.startswith("-1_") for n in names) == counts["junk"] == 40 // 5
    assert sum(n.startswith("0000_") for n in names) == counts["distractors"] == 40 // 2
    assert len(ds.train) == counts["train"] and ds.num_train_pids == 20
    assert len(ds.query) == counts["query"]
    assert len(ds.gallery) == counts["gallery"] + counts["distractors"]  # junk dropped
    assert {r.camid for r in ds.train + ds.query + ds.gallery} == set(range(5))
    train_raw = {int(p.name[:4]) for p in (synth / "bounding_box_train").iterdir()}
    test_pids = {r.pid for r in ds.query}
    assert not train_raw & test_pids  # disjoint train / test identities, as Market
    assert test_pids | {0} == {r.pid for r in ds.gallery}
    # every query has a true match in another camera (the protocol's valid queries)
    gallery = defaultdict(set)
    for r in ds.gallery:
        gallery[r.pid].add(r.camid)
    assert all(gallery[q.pid] - {q.camid} for q in ds.query)
    # one query per (identity, camera)
    assert len({(q.pid, q.camid) for q in ds.query}) == len(ds.query)
    with Image.open(ds.train[0].path) as im:
        assert im.size == (32, 64) and im.mode == "RGB"


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.jpg"))
    }


def test_deterministic_reuse_and_refusals(tmp_path: Path) -> None:
    small = SyntheticMarketConfig(num_ids=6, images_per_id=4, num_cameras=3, image_size=(32, 16))
    a = generate_synthetic_market(tmp_path / "a", small)
    b = generate_synthetic_market(tmp_path / "b", small)
    assert _digest(a) == _digest(b) and len(_digest(a)) > 0
    c = generate_synthetic_market(tmp_path / "c", small, seed=1)
    assert _digest(c) != _digest(a)
    stamp = {p: p.stat().st_mtime_ns for p in a.rglob("*.jpg")}
    assert generate_synthetic_market(a, small) == a  # same config: reused, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*.jpg")} == stamp
    with pytest.raises(FileExistsError, match="another config"):
        generate_synthetic_market(a, small, num_ids=7)
    generate_synthetic_market(a, small, num_ids=7, overwrite=True)
    assert json.loads((a / "synthetic_market.json").read_text())["config"]["num_ids"] == 7
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        generate_synthetic_market(foreign, small, overwrite=True)
    assert (foreign / "notes.txt").exists()
    with pytest.raises(ValueError, match="num_cameras"):
        SyntheticMarketConfig(num_cameras=7)


def _average_precision(
    dist: np.ndarray, query: list[ReidRecord], gallery: list[ReidRecord]
) -> float:
    """Naive Market-protocol mAP: drop same pid + same camera, skip queries without a match."""
    g_pids = np.array([g.pid for g in gallery])
    g_cams = np.array([g.camid for g in gallery])
    aps = []
    for i, q in enumerate(query):
        keep = ~((g_pids == q.pid) & (g_cams == q.camid))
        order = np.argsort(dist[i][keep], kind="stable")
        matches = (g_pids[keep][order] == q.pid).astype(np.float64)
        if matches.sum() == 0:
            continue
        precision = np.cumsum(matches) / np.arange(1, len(matches) + 1)
        aps.append(float((precision * matches).sum() / matches.sum()))
    return float(np.mean(aps))


def _colour_feature(records: list[ReidRecord]) -> np.ndarray:
    """Mean colour of the central half-width band in 6 horizontal stripes (18-d)."""
    feats = []
    for r in records:
        with Image.open(r.path) as im:
            a = np.asarray(im, dtype=np.float64) / 255.0
        w = a.shape[1]
        band = a[:, w // 4 : 3 * w // 4]
        feats.append(np.concatenate([s.mean((0, 1)) for s in np.array_split(band, 6, axis=0)]))
    return np.stack(feats)


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def test_identity_is_learnable_and_random_features_are_at_chance(synth: Path) -> None:
    ds = Market1501(synth)
    rng = np.random.default_rng(0)
    # chance level: the mean AP of uniformly random rankings (same protocol)
    chance = np.mean(
        [_average_precision(rng.random((len(ds.query), len(ds.gallery))), ds.query, ds.gallery)
         for _ in range(20)]
    )  # fmt: skip
    random_map = np.mean(
        [_average_precision(_sqdist(rng.normal(size=(len(ds.query), 64)),
                                    rng.normal(size=(len(ds.gallery), 64))), ds.query, ds.gallery)
         for _ in range(5)]
    )  # fmt: skip
    colour_map = _average_precision(
        _sqdist(_colour_feature(ds.query), _colour_feature(ds.gallery)), ds.query, ds.gallery
    )
    assert chance < 0.15
    assert 0.75 * chance < random_map < 1.3 * chance
    assert colour_map > 4.0 * chance and colour_map > 0.3


def test_unaligned_mode_moves_identity_cues_off_the_stripes(tmp_path: Path, monkeypatch) -> None:
    """Aligned: the upper garment sits in the same band of every crop; unaligned: it does not."""
    from ev_reid.datasets import synthetic

    spread = {}
    for mode in ("aligned", "unaligned"):
        centres: list[float] = []
        render = synthetic._render_labels

        def recording(*args, _render=render, _out=centres, **kwargs):
            labels, mask = _render(*args, **kwargs)
            rows = np.nonzero(labels == synthetic._UPPER)[0]
            if rows.size and labels.shape[0] == 64:  # full-size person images only
                _out.append(float(rows.mean()) / labels.shape[0])
            return labels, mask

        monkeypatch.setattr(synthetic, "_render_labels", recording)
        root = generate_synthetic_market(
            tmp_path / mode, num_ids=8, images_per_id=6, num_cameras=2, image_size=(64, 32),
            num_distractors=0, num_junk=0, mode=mode,
        )  # fmt: skip
        monkeypatch.setattr(synthetic, "_render_labels", render)
        assert len(Market1501(root).train) > 0
        spread[mode] = float(np.std(centres))
    assert spread["aligned"] < 0.04  # camera scale + a few pixels of jitter
    assert spread["unaligned"] > 3 * spread["aligned"]
    with pytest.raises(ValueError, match="mode"):
        generate_synthetic_market(tmp_path / "bad", mode="tilted")
