"""Which frames of a video a model sees.

`SamplingSpec` is the single description of frame selection. Training, generation, chat and evaluation all
use the same spec (it is saved with the processor), so a model is never evaluated on frames chosen differently
from the ones it was trained on. `SamplingSpec.select` is pure index math over the presentation timestamps of
a video's frames; decoding lives in `videollm.data.video`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_NUM_FRAMES = 8

# Timestamps are floats computed from integer PTS; two frames closer than this are treated as equally near.
_TIME_EPS = 1e-9


@dataclass(frozen=True)
class FrameSelection:
    """The frames chosen from one video.

    Attributes:
        indices: frame indices in presentation order (may repeat for uniform sampling of a short video).
        timestamps: presentation time in seconds of each selected frame, from the start of the video.
        duration: length of the whole video in seconds (end of its last frame).
    """

    indices: tuple[int, ...]
    timestamps: tuple[float, ...]
    duration: float


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingSpec:
    """How frames are chosen from a video; the same spec is used by training, generation, chat and eval.

    Exactly one mode is active:

    * uniform (``num_frames``): the window is cut into ``num_frames`` equal segments and the frame nearest each
      segment centre is taken. Always exactly ``num_frames`` frames (indices repeat for very short videos), so
      the number of visual tokens is known before decoding.
    * rate (``fps``): target times ``start + k / fps`` inside the window, each mapped to the frame with the
      nearest timestamp (correct for variable frame rate), duplicates dropped, then uniformly thinned to
      ``max_frames`` when there are more.

    ``num_frames`` defaults to 8 when ``fps`` is not given, so ``SamplingSpec()`` samples 8 uniform frames and
    ``SamplingSpec(fps=2.0, max_frames=32)`` samples by rate without having to unset ``num_frames``.

    Attributes:
        num_frames: number of uniformly sampled frames (uniform mode).
        fps: sampling rate in frames per second (rate mode).
        max_frames: cap on the number of frames in rate mode.
        start_sec: start of the clip window in seconds from the start of the video (default: 0).
        end_sec: end of the clip window in seconds (default: end of the video; clipped to it).
        frame_size: output frames are resized to ``frame_size x frame_size`` (None keeps the native size).
    """

    num_frames: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    start_sec: float | None = None
    end_sec: float | None = None
    frame_size: int | None = None

    def __post_init__(self) -> None:
        if self.num_frames is None and self.fps is None:
            object.__setattr__(self, "num_frames", DEFAULT_NUM_FRAMES)
        if self.num_frames is not None and self.fps is not None:
            raise ValueError(
                f"SamplingSpec: num_frames={self.num_frames!r} and fps={self.fps!r} are exclusive; set "
                "num_frames for uniform sampling or fps (optionally with max_frames) for rate sampling"
            )
        for name in ("num_frames", "max_frames", "frame_size"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"SamplingSpec.{name} must be a positive integer, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, int(value))
        for name in ("fps", "start_sec", "end_sec"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"SamplingSpec.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"SamplingSpec.fps must be > 0, got {self.fps!r}")
        if self.max_frames is not None and self.fps is None:
            raise ValueError(
                f"SamplingSpec.max_frames={self.max_frames} only applies with fps; uniform sampling already "
                "takes exactly num_frames frames"
            )
        if self.start_sec is not None and self.start_sec < 0:
            raise ValueError(f"SamplingSpec.start_sec must be >= 0, got {self.start_sec!r}")
        if self.end_sec is not None and self.end_sec <= 0:
            raise ValueError(f"SamplingSpec.end_sec must be > 0, got {self.end_sec!r}")
        if self.start_sec is not None and self.end_sec is not None and self.end_sec <= self.start_sec:
            raise ValueError(
                f"SamplingSpec.end_sec={self.end_sec!r} must be greater than start_sec={self.start_sec!r}"
            )

    def to_dict(self) -> dict:
        """All fields as a plain dict (JSON/YAML-serialisable); `from_dict` restores an equal spec."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SamplingSpec:
        """Build a spec from a dict such as one written by `to_dict` or read from a YAML config.

        Raises:
            ValueError: on keys that are not fields (named in the message), or on invalid values.
        """
        if not isinstance(d, dict):
            raise TypeError(f"SamplingSpec.from_dict expects a dict, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown SamplingSpec keys {unknown}; valid keys are {valid}")
        return cls(**d)

    def select(self, timestamps: Sequence[float], duration: float | None = None) -> FrameSelection:
        """Choose frames given the presentation timestamps of every frame of a video.

        Args:
            timestamps: seconds from the start of the video of each frame, sorted (frame ``i`` is at
                ``timestamps[i]``).
            duration: length of the video in seconds (end of the last frame). When None it is estimated as the
                last timestamp plus the median frame interval.

        Returns:
            The selected indices, their timestamps, and the duration. Ties between two equally near frames go
            to the earlier one.

        Raises:
            ValueError: no timestamps, unsorted timestamps, or a clip window that starts at or past the end.
        """
        ts = np.asarray(timestamps, dtype=np.float64)
        if ts.ndim != 1 or ts.size == 0:
            raise ValueError("SamplingSpec.select needs the timestamps of at least one frame")
        if ts.size > 1 and np.any(np.diff(ts) < 0):
            raise ValueError("SamplingSpec.select needs timestamps sorted in presentation order")
        if duration is None:
            duration = float(ts[-1] + (np.median(np.diff(ts)) if ts.size > 1 else 0.0))
        duration = max(float(duration), float(ts[-1]))

        start = self.start_sec or 0.0
        if self.start_sec is not None and start >= duration:
            raise ValueError(f"SamplingSpec.start_sec={start} is at or past the end of the video ({duration:.3f} s)")
        end = duration if self.end_sec is None else min(self.end_sec, duration)

        # Only frames inside the window are candidates; a window too short to hold any frame falls back to the
        # whole video so that it still yields the frame nearest to it.
        lo = int(np.searchsorted(ts, start - _TIME_EPS, side="left"))
        hi = int(np.searchsorted(ts, end - _TIME_EPS, side="left"))
        if hi <= lo:
            lo, hi = 0, ts.size

        if self.num_frames is not None:
            n = self.num_frames
            targets = start + (np.arange(n) + 0.5) * (end - start) / n
            indices = _nearest(ts, targets, lo, hi)
        else:
            n_targets = max(1, math.ceil((end - start) * self.fps - _TIME_EPS))
            targets = start + np.arange(n_targets) / self.fps
            indices = np.unique(_nearest(ts, targets, lo, hi))
            if self.max_frames is not None and indices.size > self.max_frames:
                keep = ((np.arange(self.max_frames) + 0.5) * indices.size / self.max_frames).astype(np.int64)
                indices = indices[keep]
        return FrameSelection(
            indices=tuple(int(i) for i in indices),
            timestamps=tuple(float(ts[i]) for i in indices),
            duration=duration,
        )


def _nearest(ts: np.ndarray, targets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Index into `ts` of the frame nearest each target, searching only ``ts[lo:hi]``; ties go left."""
    window = ts[lo:hi]
    right = np.clip(np.searchsorted(window, targets, side="left"), 0, window.size - 1)
    left = np.clip(right - 1, 0, window.size - 1)
    take_right = (window[right] - targets) < (targets - window[left]) - _TIME_EPS
    return lo + np.where(take_right, right, left)
