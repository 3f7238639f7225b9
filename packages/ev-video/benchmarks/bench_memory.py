"""Flat RSS: a 1-hour synthetic video decoded through sliding windows (optionally detected by STPT).

Writes one long low-resolution H.264 video (default 1 h at 8 fps, 40x40: 28,800 frames -- low
resolution so that it is generated in seconds; the decoder's memory does not grow with the
length either way), then, in a fresh process, walks it with 64-frame windows at 0.5 overlap
through ``VideoReader.get_batch`` (``--detect``: through ``ev_video.inference.detect_video``
with an untrained ``stpt_tiny``), sampling the RSS after every window.

    python packages/ev-video/benchmarks/bench_memory.py [--hours 1] [--detect]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_long_video(path: Path, frames: int, fps: float, size: int) -> None:
    import av

    rng = np.random.default_rng(0)
    bg = rng.integers(20, 60, size=(size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.options = {"preset": "ultrafast", "g": "32"}
        for t in range(frames):
            img = bg.copy()
            cy, cx = size / 2 + size / 3 * np.sin(t / 20), size / 2 + size / 3 * np.cos(t / 31)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size / 8) ** 2] = (200, 60, 60)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def walk(path: str, detect: bool) -> dict:
    import torch

    from ev_video.io import VideoReader, sliding_windows

    samples, t0 = [], time.perf_counter()
    if detect:
        from ev_video.inference import ClipConfig, detect_video
        from ev_video.models import create

        torch.manual_seed(0)
        model = create("stpt_tiny", num_classes=4).eval()
        base = rss_mib()
        segs = detect_video(
            model, path, ["a", "b", "c", "d"], ClipConfig(clip_len=64), batch_size=4
        )
        return {
            "rss_start_mib": base,
            "rss_end_mib": rss_mib(),
            "segments": len(segs),
            "seconds": time.perf_counter() - t0,
        }
    with VideoReader(path) as vr:
        windows = sliding_windows(len(vr), 64, overlap=0.5)
        for k, w in enumerate(windows):
            vr.get_batch(w.indices.tolist())
            if k % max(1, len(windows) // 50) == 0 or k == len(windows) - 1:
                samples.append((k, rss_mib()))
        n = len(vr)
    rss = [r for _, r in samples]
    first_10 = rss[: max(1, len(rss) // 10)]
    return {
        "frames": n,
        "windows": len(windows),
        "seconds": time.perf_counter() - t0,
        "rss_after_first_window_mib": rss[0],
        "rss_max_first_10pct_mib": max(first_10),
        "rss_max_mib": max(rss),
        "rss_end_mib": rss[-1],
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--size", type=int, default=40)
    ap.add_argument("--detect", action="store_true")
    ap.add_argument("--walk", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmark-results/ev_video_memory.json")
    args = ap.parse_args()
    if args.walk:
        print(json.dumps(walk(args.walk, args.detect)))
        return
    path = Path(tempfile.mkdtemp()) / "long.mp4"
    frames = int(args.hours * 3600 * args.fps)
    t = time.perf_counter()
    write_long_video(path, frames, args.fps, args.size)
    print(
        f"wrote {frames} frames ({args.hours} h at {args.fps} fps, {args.size}x{args.size}) in {time.perf_counter() - t:.1f} s"
    )
    cmd = [sys.executable, __file__, "--walk", str(path)] + (["--detect"] if args.detect else [])
    res = json.loads(
        subprocess.run(
            cmd, check=True, capture_output=True, text=True, env={**os.environ, "EV_QUIET": "1"}
        ).stdout
    )
    res.update({"video": {"frames": frames, "fps": args.fps, "size": args.size, "hours": args.hours},
                "machine": "2 CPU cores shared with other jobs (busy)"})  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print({k: v for k, v in res.items() if k != "samples"})
    print("written:", args.out)


if __name__ == "__main__":
    main()
