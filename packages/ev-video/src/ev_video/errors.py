"""Errors a user of ev-video can fix (all :class:`ev_core.errors.EvError`)."""

from __future__ import annotations

from ev_core.errors import EvError

__all__ = ["AnnotationError", "VideoDecodeError"]


class VideoDecodeError(EvError):
    """A video file is missing, empty, truncated or cannot be decoded (message names the file)."""


class AnnotationError(EvError):
    """An annotation file (THUMOS14 text / ActivityNet JSON) or record list is malformed."""
