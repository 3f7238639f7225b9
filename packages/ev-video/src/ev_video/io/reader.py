"""``VideoReader``: frame-accurate random access to a video file through decord or PyAV.

Both backends return the same RGB frames (FFmpeg's ``rgb24`` conversion, and for a resize
FFmpeg's ``scale`` filter, which decord runs inside its decoder): ``get_batch`` is exact
between them, with or without ``width``/``height``.

* ``backend="decord"`` (default): decord or the decord2 fork, whichever is installed (the
  same ``decord`` module), imported when the first reader opens. decord leaks memory on
  large batches unless the reader seeks back (dmlc/decord#197, #208); the reader does
  ``seek(0)`` after every batch of 256 MiB or more. Open one reader per item (per DataLoader
  worker) -- readers are not shared across processes.
  Some frame sizes, native or resized (e.g. 32x32, 48x48, 96x96), trip a decord bug
  (``DECORDArrayCopyFromTo: The size must exactly match``); the reader then logs a warning and
  decodes that file with PyAV, which returns the same frames (:attr:`VideoReader.backend_used`).
* ``backend="pyav"``: PyAV. The frame index comes from demuxing the packets once (no
  decoding): presentation timestamps sorted, keyframes marked. ``get_batch`` decodes the
  requested frames in order, seeking to the keyframe before a target only when the target
  is behind the decoder or past the next keyframe.

A missing, empty, truncated or undecodable file raises :class:`VideoDecodeError` naming the
file (and the frame, when one frame fails).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ev_core.errors import require
from ev_video.errors import VideoDecodeError

__all__ = ["BACKENDS", "VideoReader"]

log = logging.getLogger(__name__)

_DECORD_COPY_BUG = "DECORDArrayCopyFromTo"
_DECORD_RELEASE_BYTES = 256 * 2**20
_WARNED: set[str] = set()

#: Backend names accepted by :class:`VideoReader`.
BACKENDS: tuple[str, ...] = ("decord", "pyav")


class _DecordBackend:
    def __init__(self, path: Path, width: int | None, height: int | None, num_threads: int) -> None:
        decord = require("decord", "decord", "ev-video", "the decord video backend")
        try:
            self.vr = decord.VideoReader(
                str(path), ctx=decord.cpu(0), width=width or -1, height=height or -1,
                num_threads=num_threads,
            )  # fmt: skip
            self.num_frames = len(self.vr)
            self.fps = float(self.vr.get_avg_fps())
        except Exception as exc:  # decord raises its own DECORDError for every failure
            raise VideoDecodeError(f"decord cannot open the video: {_short(exc)}", path) from None
        self.path = path

    def get_batch(self, indices: list[int]) -> np.ndarray:
        try:
            frames = self.vr.get_batch(indices).asnumpy()
        except Exception as exc:
            raise VideoDecodeError(
                f"decord failed to decode frames {_span(indices)}: {_short(exc)}", self.path
            ) from None
        if frames.nbytes >= _DECORD_RELEASE_BYTES:
            # large batches leak in decord unless the reader seeks back (dmlc/decord#197, #208);
            # not after every batch: the next batch would then decode again from frame 0
            self.vr.seek(0)
        return frames

    def keyframes(self) -> list[int]:
        return [int(i) for i in self.vr.get_key_indices()]

    def close(self) -> None:
        self.vr = None


class _PyAVBackend:
    def __init__(self, path: Path, width: int | None, height: int | None, num_threads: int) -> None:
        self.av = require("av", "pyav", "ev-video", "the PyAV video backend")
        self.path = path
        self.size = (width, height) if width and height else None
        try:
            self.container = self.av.open(str(path))
        except Exception as exc:
            raise VideoDecodeError(f"PyAV cannot open the video: {_short(exc)}", path) from None
        try:
            streams = self.container.streams.video
            if not streams:
                raise VideoDecodeError("has no video stream", path)
            self.stream = streams[0]
            if num_threads != 1:
                self.stream.thread_type = "AUTO"
                self.stream.codec_context.thread_count = num_threads
            pts: list[int] = []
            keys: list[int] = []
            for packet in self.container.demux(self.stream):
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None or packet.size == 0:
                    continue
                pts.append(int(t))
                if packet.is_keyframe:
                    keys.append(int(t))
        except VideoDecodeError:
            self.container.close()
            raise
        except Exception as exc:
            self.container.close()
            raise VideoDecodeError(f"PyAV cannot read the packets: {_short(exc)}", path) from None
        self.pts = np.unique(np.asarray(pts, dtype=np.int64))
        self.key_index = np.searchsorted(self.pts, np.unique(np.asarray(keys, dtype=np.int64)))
        self.num_frames = len(self.pts)
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self._graph: Any = None
        self._frames: Any = None  # live decode iterator
        self._pos = -1  # index of the last frame the iterator returned

    def _convert(self, frame: Any) -> np.ndarray:
        if self.size is None:
            return frame.to_ndarray(format="rgb24")
        if self._graph is None:  # scale + rgb24 in FFmpeg's filter graph, as decord does
            graph = self.av.filter.Graph()
            src = graph.add_buffer(template=self.stream)
            scale = graph.add("scale", f"{self.size[0]}:{self.size[1]}")
            fmt = graph.add("format", "rgb24")
            sink = graph.add("buffersink")
            src.link_to(scale)
            scale.link_to(fmt)
            fmt.link_to(sink)
            graph.configure()
            self._graph = graph
        self._graph.push(frame)
        return self._graph.pull().to_ndarray()

    def _seek(self, target: int) -> None:
        self.container.seek(
            int(self.pts[target]), stream=self.stream, backward=True, any_frame=False
        )
        self._frames = self.container.decode(self.stream)
        self._pos = -1

    def _next_key_after(self, pos: int) -> int:
        i = int(np.searchsorted(self.key_index, pos, side="right"))
        return int(self.key_index[i]) if i < len(self.key_index) else self.num_frames

    def _decode(self, target: int) -> np.ndarray:
        if self._frames is None or target <= self._pos or self._next_key_after(self._pos) <= target:
            self._seek(target)
        try:
            for frame in self._frames:
                t = frame.pts if frame.pts is not None else frame.dts
                if t is None:
                    continue
                idx = int(np.searchsorted(self.pts, t))
                if idx >= self.num_frames or self.pts[idx] != t:
                    continue  # a frame outside the packet index (should not happen)
                self._pos = idx
                if idx == target:
                    return self._convert(frame)
                if idx > target:
                    break
        except VideoDecodeError:
            raise
        except Exception as exc:
            self._frames = None
            raise VideoDecodeError(
                f"PyAV failed while decoding frame {target}: {_short(exc)}", self.path
            ) from None
        self._frames = None
        raise VideoDecodeError(
            f"frame {target} of {self.num_frames} could not be decoded (truncated or corrupt file?)",
            self.path,
        )

    def get_batch(self, indices: list[int]) -> np.ndarray:
        wanted = sorted(set(indices))
        decoded = {i: self._decode(i) for i in wanted}
        return np.stack([decoded[i] for i in indices])

    def keyframes(self) -> list[int]:
        return [int(i) for i in self.key_index]

    def close(self) -> None:
        self._frames = None
        self._graph = None
        self.container.close()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _span(indices: Sequence[int]) -> str:
    return f"{min(indices)}..{max(indices)}" if indices else "[]"


class VideoReader:
    """Random access to the frames of one video file.

    Args:
        path: the video file.
        backend: ``"decord"`` (default; decord or decord2) or ``"pyav"``.
        width: output width (resize inside the decoder); give both ``width`` and ``height``
            or neither.
        height: output height.
        num_threads: decoder threads (``0`` = FFmpeg's choice; ``1`` suits DataLoader workers).

    Raises:
        VideoDecodeError: the file is missing, empty, has no video stream or no frames, or the
            backend cannot open it.
        MissingDependencyError: the backend's module is not installed (names the extra).
        ValueError: an unknown backend, or only one of ``width``/``height``.

    Example::

        with VideoReader("clip.mp4", width=128, height=96) as vr:
            frames = vr.get_batch(range(0, len(vr), 8))  # uint8 [T, 96, 128, 3]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        backend: str = "decord",
        width: int | None = None,
        height: int | None = None,
        num_threads: int = 1,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown video backend {backend!r}; choose one of {BACKENDS}")
        if (width is None) != (height is None) or any(
            v is not None and v <= 0 for v in (width, height)
        ):
            raise ValueError(
                f"give both width and height (positive) or neither, got {width}x{height}"
            )
        self.path = Path(path)
        self.backend = backend
        if not self.path.exists():
            raise VideoDecodeError("video file does not exist", self.path)
        if not self.path.is_file():
            raise VideoDecodeError("is not a file", self.path)
        if self.path.stat().st_size == 0:
            raise VideoDecodeError("video file is empty (0 bytes)", self.path)
        impl = _DecordBackend if backend == "decord" else _PyAVBackend
        self._impl: _DecordBackend | _PyAVBackend | None = impl(
            self.path, width, height, num_threads
        )
        if self._impl.num_frames <= 0:
            self.close()
            raise VideoDecodeError("video has no frames", self.path)
        if not self._impl.fps > 0:
            self.close()
            raise VideoDecodeError("video has no usable frame rate", self.path)
        self._shape: tuple[int, int] | None = (height, width) if width and height else None
        self._open_args = (width, height, num_threads)
        #: the backend actually decoding (``"pyav"`` after a decord resize fallback).
        self.backend_used = backend

    def _backend(self) -> _DecordBackend | _PyAVBackend:
        if self._impl is None:
            raise ValueError(f"VideoReader for {self.path} is closed")
        return self._impl

    def __len__(self) -> int:
        return self._backend().num_frames

    @property
    def fps(self) -> float:
        """Average frame rate (frames per second)."""
        return self._backend().fps

    @property
    def duration(self) -> float:
        """``len(self) / fps`` in seconds."""
        return len(self) / self.fps

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(H, W)`` of the returned frames (decodes frame 0 once when no size was given)."""
        if self._shape is None:
            f = self.get_batch([0])
            self._shape = (int(f.shape[1]), int(f.shape[2]))
        return self._shape

    def keyframe_indices(self) -> list[int]:
        """Indices of the keyframes (cheap seek targets)."""
        return self._backend().keyframes()

    def _check(self, indices: Sequence[int] | Tensor | np.ndarray | range) -> list[int]:
        n = len(self)
        out = []
        for i in indices.tolist() if isinstance(indices, (Tensor, np.ndarray)) else indices:
            j = int(i)
            if j < -n or j >= n:
                raise IndexError(f"frame index {j} out of range for {self.path} ({n} frames)")
            out.append(j + n if j < 0 else j)
        if not out:
            raise IndexError("get_batch needs at least one frame index")
        return out

    def get_batch(self, indices: Sequence[int] | Tensor | np.ndarray | range) -> Tensor:
        """Decode frames (accurate seeking; any order; duplicates allowed).

        Args:
            indices: frame indices (negative ones count from the end).

        Returns:
            ``torch.uint8 [T, H, W, 3]`` RGB frames, in the order asked.

        Raises:
            IndexError: an index out of range, or no index.
            VideoDecodeError: a frame could not be decoded (truncated/corrupt file).
        """
        idx = self._check(indices)
        try:
            frames = self._backend().get_batch(idx)
        except VideoDecodeError as exc:
            if not (self.backend_used == "decord" and _DECORD_COPY_BUG in str(exc)):
                raise
            self._fall_back_to_pyav()
            frames = self._backend().get_batch(idx)
        return torch.from_numpy(np.ascontiguousarray(frames))

    def _fall_back_to_pyav(self) -> None:
        """decord (decord2 3.4) cannot copy frames of some sizes out of its decoder, native or
        resized (``DECORDArrayCopyFromTo: The size must exactly match``, e.g. 32x32, 48x48,
        96x96); PyAV runs the same FFmpeg conversion and returns the same frames."""
        width, height, threads = self._open_args
        if str(self.path) not in _WARNED:  # once per file, not once per DataLoader item
            _WARNED.add(str(self.path))
            log.warning(
                "decord cannot return the frames of %s at this size (a decord bug); decoding with PyAV",
                self.path,
            )  # fmt: skip
        self.close()
        self._impl = _PyAVBackend(self.path, width, height, threads)
        self.backend_used = "pyav"

    def __getitem__(self, index: int) -> Tensor:
        """One frame, ``uint8 [H, W, 3]``."""
        return self.get_batch([index])[0]

    def close(self) -> None:
        """Release the decoder (idempotent)."""
        if self._impl is not None:
            self._impl.close()
            self._impl = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        if self._impl is None:
            return f"VideoReader({str(self.path)!r}, closed)"
        return (
            f"VideoReader({str(self.path)!r}, backend={self.backend!r}, frames={len(self)}, "
            f"fps={self.fps:.3f})"
        )
