"""Tests of `SamplingSpec`: validation, serialisation, and the frame-selection index math (pure, no decoding).

Expected indices are worked out by hand in the comments: uniform mode takes the frame nearest each segment centre
``start + (k + 0.5) * (end - start) / n``; rate mode takes the frame nearest each ``start + k / fps``, drops
duplicates, then keeps positions ``floor((k + 0.5) * n / max_frames)`` when there are more than ``max_frames``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from videollm.data.sampling import DEFAULT_NUM_FRAMES, FrameSelection, SamplingSpec

# 48 frames at 8 fps: frame i at i / 8 s, duration 6 s.
CFR_8FPS = [i / 8 for i in range(48)]

# Variable frame rate: 20 frames 0.1 s apart (0.0 .. 1.9), then 20 frames 0.25 s apart (2.0 .. 6.75); the last
# frame lasts 0.125 s (the duration `write_video` gives it at its nominal 8 fps, see tests/test_video.py).
VFR = [i / 10 for i in range(20)] + [2.0 + 0.25 * i for i in range(20)]
VFR_DURATION = 6.875


# ------------------------------------------------------------------------------------------------ validation


def test_default_is_eight_uniform_frames() -> None:
    spec = SamplingSpec()
    assert DEFAULT_NUM_FRAMES == 8
    assert (spec.num_frames, spec.fps, spec.max_frames, spec.start_sec, spec.end_sec, spec.frame_size) == (
        8, None, None, None, None, None,
    )


def test_rate_mode_leaves_num_frames_unset() -> None:
    spec = SamplingSpec(fps=2, max_frames=16)
    assert spec.num_frames is None
    assert spec.fps == 2.0 and type(spec.fps) is float
    assert spec.max_frames == 16


def test_numpy_scalars_are_converted_to_python_numbers() -> None:
    spec = SamplingSpec(num_frames=np.int64(4), start_sec=np.float32(0.5), frame_size=np.int32(32))
    assert type(spec.num_frames) is int and spec.num_frames == 4
    assert type(spec.start_sec) is float and spec.start_sec == 0.5
    assert type(spec.frame_size) is int and spec.frame_size == 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_frames=8, fps=2.0), "exclusive"),
        (dict(num_frames=0), "num_frames must be a positive integer"),
        (dict(num_frames=-3), "num_frames must be a positive integer"),
        (dict(num_frames=2.5), "num_frames must be a positive integer"),
        (dict(num_frames=True), "num_frames must be a positive integer"),
        (dict(num_frames="8"), "num_frames must be a positive integer"),
        (dict(fps=2.0, max_frames=0), "max_frames must be a positive integer"),
        (dict(frame_size=0), "frame_size must be a positive integer"),
        (dict(frame_size=224.0), "frame_size must be a positive integer"),
        (dict(fps=0.0), "fps must be > 0"),
        (dict(fps=-1.0), "fps must be > 0"),
        (dict(fps=float("nan")), "fps must be a finite number"),
        (dict(fps=float("inf")), "fps must be a finite number"),
        (dict(fps="2"), "fps must be a finite number"),
        (dict(fps=True), "fps must be a finite number"),
        (dict(max_frames=4), "max_frames=4 only applies with fps"),
        (dict(start_sec=-0.5), "start_sec must be >= 0"),
        (dict(end_sec=0.0), "end_sec must be > 0"),
        (dict(start_sec=2.0, end_sec=2.0), "must be greater than start_sec"),
        (dict(start_sec=3.0, end_sec=1.0), "must be greater than start_sec"),
        (dict(end_sec=float("inf")), "end_sec must be a finite number"),
    ],
)
def test_invalid_specs_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingSpec(**kwargs)


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingSpec().num_frames = 4  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- serialisation


def test_to_dict_lists_every_field() -> None:
    spec = SamplingSpec(fps=2, max_frames=16, start_sec=1, frame_size=224)
    assert spec.to_dict() == {
        "num_frames": None,
        "fps": 2.0,
        "max_frames": 16,
        "start_sec": 1.0,
        "end_sec": None,
        "frame_size": 224,
    }


@pytest.mark.parametrize(
    "spec",
    [
        SamplingSpec(),
        SamplingSpec(num_frames=16, start_sec=0.5, end_sec=4.0, frame_size=64),
        SamplingSpec(fps=1.5, max_frames=32),
    ],
)
def test_dict_round_trip_through_json(spec: SamplingSpec) -> None:
    restored = SamplingSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec
    assert restored.to_dict() == spec.to_dict()


def test_from_empty_dict_is_the_default() -> None:
    assert SamplingSpec.from_dict({}) == SamplingSpec()


def test_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ValueError) as info:
        SamplingSpec.from_dict({"fps": 2.0, "num_frame": 8, "zoom": 1})
    message = str(info.value)
    assert "unknown SamplingSpec keys ['num_frame', 'zoom']" in message
    assert "valid keys are ['num_frames', 'fps', 'max_frames', 'start_sec', 'end_sec', 'frame_size']" in message


def test_from_dict_validates_values_and_type() -> None:
    with pytest.raises(ValueError, match="exclusive"):
        SamplingSpec.from_dict({"num_frames": 8, "fps": 2.0})
    with pytest.raises(TypeError, match="expects a dict, got list"):
        SamplingSpec.from_dict([("fps", 2.0)])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- uniform select


def test_uniform_on_constant_frame_rate() -> None:
    # Segment centres (k + 0.5) * 6 / 8 = 0.375, 1.125, ... fall exactly on frames 3, 9, ..., 45.
    selection = SamplingSpec(num_frames=8).select(CFR_8FPS, duration=6.0)
    assert selection == FrameSelection(
        indices=(3, 9, 15, 21, 27, 33, 39, 45),
        timestamps=(0.375, 1.125, 1.875, 2.625, 3.375, 4.125, 4.875, 5.625),
        duration=6.0,
    )
    assert all(type(i) is int for i in selection.indices)
    assert all(type(t) is float for t in selection.timestamps)


def test_uniform_repeats_frames_of_a_short_video() -> None:
    # Three frames at 0, 1, 2 s; centres 0.1875, 0.5625, ..., 2.8125: nearest are 0, 1, 1, 1, 2, 2, 2, 2.
    selection = SamplingSpec(num_frames=8).select([0.0, 1.0, 2.0], duration=3.0)
    assert selection.indices == (0, 1, 1, 1, 2, 2, 2, 2)
    assert selection.timestamps == (0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0)


def test_uniform_on_variable_frame_rate() -> None:
    # Centres (k + 0.5) * 6.875 / 4 = 0.859, 2.578, 4.297, 6.016 -> nearest frames 0.9 (9), 2.5 (22), 4.25 (29),
    # 6.0 (36): an index computed from the mean frame rate (40 frames / 6.875 s) would give 5, 15, 25, 35.
    selection = SamplingSpec(num_frames=4).select(VFR, duration=VFR_DURATION)
    assert selection.duration == VFR_DURATION
    assert selection.indices == (9, 22, 29, 36)
    assert selection.timestamps == (0.9, 2.5, 4.25, 6.0)


def test_uniform_window() -> None:
    # Window [1, 3) cut in 4: centres 1.25, 1.75, 2.25, 2.75 -> frames 10, 14, 18, 22.
    selection = SamplingSpec(num_frames=4, start_sec=1.0, end_sec=3.0).select(CFR_8FPS, duration=6.0)
    assert selection.indices == (10, 14, 18, 22)
    assert selection.timestamps == (1.25, 1.75, 2.25, 2.75)
    assert selection.duration == 6.0


def test_end_past_the_video_is_clipped() -> None:
    clipped = SamplingSpec(num_frames=8, end_sec=100.0).select(CFR_8FPS, duration=6.0)
    assert clipped == SamplingSpec(num_frames=8).select(CFR_8FPS, duration=6.0)


def test_tie_goes_to_the_earlier_frame() -> None:
    # One segment over [0, 3]: centre 1.5 is equally near frames 1 and 2.
    assert SamplingSpec(num_frames=1).select([0.0, 1.0, 2.0, 3.0], duration=3.0).indices == (1,)


def test_window_without_frames_falls_back_to_the_nearest_frame() -> None:
    # No frame lies in [1.2, 1.5); the centre 1.35 is nearest frame 1 (at 1.0) of the whole video.
    selection = SamplingSpec(num_frames=1, start_sec=1.2, end_sec=1.5).select([0.0, 1.0, 2.0, 3.0], duration=4.0)
    assert selection.indices == (1,)


def test_duration_is_estimated_and_never_before_the_last_frame() -> None:
    assert SamplingSpec().select([0.0, 0.5, 1.0, 1.5]).duration == 2.0
    assert SamplingSpec().select([0.0]).duration == 0.0
    assert SamplingSpec().select([0.0, 0.5, 1.0], duration=0.25).duration == 1.0


# ---------------------------------------------------------------------------------------------- rate select


def test_rate_on_constant_frame_rate() -> None:
    # Targets 0, 0.5, ..., 5.5 (12) -> frames 0, 4, ..., 44.
    selection = SamplingSpec(fps=2.0).select(CFR_8FPS, duration=6.0)
    assert selection.indices == tuple(range(0, 48, 4))
    assert selection.timestamps == tuple(i / 8 for i in range(0, 48, 4))


def test_rate_with_max_frames_on_constant_frame_rate() -> None:
    # The 12 frames above thinned to 5: positions floor((k + 0.5) * 12 / 5) = 1, 3, 6, 8, 10.
    selection = SamplingSpec(fps=2.0, max_frames=5).select(CFR_8FPS, duration=6.0)
    assert selection.indices == (4, 12, 24, 32, 40)
    assert selection.timestamps == (0.5, 1.5, 3.0, 4.0, 5.0)


def test_rate_on_variable_frame_rate_takes_the_nearest_timestamp() -> None:
    # Targets k / 3 for k < ceil(6.875 * 3) = 21. In the 0.1 s part, 0, .33, .67, 1, 1.33, 1.67 are nearest frames
    # 0, 3, 7, 10, 13, 17; in the 0.25 s part (frame 20 + m at 2 + m / 4), 2, 2.33, 2.67, ..., 6.33, 6.67 are
    # nearest 20, 21, 23, 24, 25, 27, 28, 29, 31, 32, 33, 35, 36, 37, 39: 21 distinct frames.
    selection = SamplingSpec(fps=3.0).select(VFR, duration=VFR_DURATION)
    assert selection.indices == (0, 3, 7, 10, 13, 17, 20, 21, 23, 24, 25, 27, 28, 29, 31, 32, 33, 35, 36, 37, 39)
    assert selection.timestamps == tuple(VFR[i] for i in selection.indices)


def test_rate_with_max_frames_on_variable_frame_rate() -> None:
    # The 21 frames above thinned to 7: positions floor(3k + 1.5) = 1, 4, 7, 10, 13, 16, 19.
    selection = SamplingSpec(fps=3.0, max_frames=7).select(VFR, duration=VFR_DURATION)
    assert selection.indices == (3, 13, 21, 25, 29, 33, 37)
    assert selection.timestamps == (0.3, 1.3, 2.25, 3.25, 4.25, 5.25, 6.25)


def test_rate_above_the_frame_rate_takes_every_frame_once() -> None:
    assert SamplingSpec(fps=20.0).select(CFR_8FPS[:16], duration=2.0).indices == tuple(range(16))


def test_rate_window() -> None:
    # Window [1, 3) at 2 fps: targets 1.0, 1.5, 2.0, 2.5 -> frames 8, 12, 16, 20.
    selection = SamplingSpec(fps=2.0, start_sec=1.0, end_sec=3.0).select(CFR_8FPS, duration=6.0)
    assert selection.indices == (8, 12, 16, 20)
    assert selection.timestamps == (1.0, 1.5, 2.0, 2.5)


def test_rate_always_gives_at_least_one_frame() -> None:
    # A 0.1 s window at 1 fps still has the target at its start.
    selection = SamplingSpec(fps=1.0, start_sec=2.0, end_sec=2.1).select(CFR_8FPS, duration=6.0)
    assert selection.indices == (16,)


# ------------------------------------------------------------------------------------------------- errors


def test_start_at_or_past_the_end_raises() -> None:
    with pytest.raises(ValueError, match=r"start_sec=6.0 is at or past the end of the video \(6.000 s\)"):
        SamplingSpec(start_sec=6.0).select(CFR_8FPS, duration=6.0)


@pytest.mark.parametrize(
    ("timestamps", "message"),
    [
        ([], "at least one frame"),
        ([[0.0, 1.0]], "at least one frame"),
        ([0.0, 2.0, 1.0], "sorted in presentation order"),
    ],
)
def test_bad_timestamps_raise(timestamps: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingSpec().select(timestamps)
