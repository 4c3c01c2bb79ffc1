"""Tests of the video layer (`videollm.data.video`): decoders, sampling on real files, errors, time limit, images.

Every clip is written into a temporary folder by PyAV (through `write_video`, or directly where the test needs
B-frames and short GOPs). Frame ``i`` of every clip has its own content (two 8-pixel bands whose positions encode
``i``, on a grey level that also depends on ``i``), so a decoded frame can be traced back to its source frame
even after lossy compression. The ground truth for a clip is a plain sequential PyAV decode of all its frames,
sorted by presentation time: it shares no seeking code with the backends under test.
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from videollm.data import video
from videollm.data.sampling import SamplingSpec
from videollm.data.video import (
    DecodedVideo,
    FrameReader,
    VideoDecodeError,
    available_backends,
    decode_each,
    probe_video,
    read_video,
    register_backend,
    resize_frames,
    write_video,
)

# The documented preference order of backend="auto" (docstring of `read_video`, `_PREFERENCE` in video.py).
DOCUMENTED_PREFERENCE = ("torchcodec", "pyav", "decord")
_BACKEND_MODULES = {"torchcodec": "torchcodec.decoders", "pyav": "av", "decord": "decord"}


def _importable(module: str) -> bool:
    """Whether a decoder imports here (a CUDA build of torchcodec fails with OSError/RuntimeError, not ImportError)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


INSTALLED = [name for name in DOCUMENTED_PREFERENCE if _importable(_BACKEND_MODULES[name])]
BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(name not in INSTALLED, reason=f"{name} does not import here"))
    for name in DOCUMENTED_PREFERENCE
]

FPS = 8
NUM_FRAMES = 60
# Variable frame rate: 20 frames 0.1 s apart, then 20 frames 0.25 s apart; the last frame lasts 1 / FPS.
VFR_TIMESTAMPS = [i / 10 for i in range(20)] + [2.0 + 0.25 * i for i in range(20)]


# --------------------------------------------------------------------------------------------------- helpers


def make_frames(count: int, height: int = 64, width: int = 64) -> np.ndarray:
    """``(count, H, W, 3)`` uint8 RGB frames that all differ: a red row band at ``i % 8``, a green column band at
    ``(i // 8) % 8`` (distinct for i < 64), on a grey level ``40 + 3 * i`` (mod 160)."""
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    band_h, band_w = height // 8, width // 8
    for i in range(count):
        frames[i] = 40 + (3 * i) % 160
        row, col = i % 8, (i // 8) % 8
        frames[i, row * band_h : (row + 1) * band_h, :, 0] = 255
        frames[i, :, col * band_w : (col + 1) * band_w, 1] = 255
    return frames


def nearest_source(frames: torch.Tensor | np.ndarray, source: np.ndarray) -> list[int]:
    """For each decoded frame (``(T, 3, H, W)`` tensor or ``(T, H, W, 3)`` array), the index of the source frame it
    is closest to (mean absolute difference): which frame a decoder actually returned."""
    decoded = torch.as_tensor(frames)
    if decoded.shape[1] == 3 and decoded.shape[-1] != 3:
        decoded = decoded.permute(0, 2, 3, 1)
    diff = (decoded.to(torch.int16)[:, None] - torch.from_numpy(source).to(torch.int16)[None]).abs()
    return diff.float().mean(dim=(2, 3, 4)).argmin(dim=1).tolist()


def write_gop_clip(path: Path, frames: np.ndarray, codec: str, open_gop: bool) -> None:
    """Write a clip with a keyframe every 12 frames and 2 B-frames between references (PyAV, not `write_video`).

    MPEG-4 Part 2 with B-frames always makes open GOPs in FFmpeg; x264 makes them with ``open-gop=1``. In an open
    GOP the B-frames that follow a keyframe in decode order are shown before it, so a decoder that numbers frames
    by decode order, or seeks to the keyframe, gets them wrong.
    """
    with av.open(str(path), mode="w") as container:
        if codec == "libx264":
            params = "keyint=12:min-keyint=12:bframes=2:b-adapt=0:scenecut=0" + (":open-gop=1" if open_gop else "")
            stream = container.add_stream(codec, rate=FPS, options={"x264-params": params, "crf": "18"})
        else:
            assert open_gop, "FFmpeg's mpeg4 encoder cannot close GOPs that have B-frames"
            stream = container.add_stream(codec, rate=FPS)
            stream.codec_context.gop_size = 12
            stream.codec_context.max_b_frames = 2
            stream.bit_rate = 2_000_000
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))


def decode_all_sequentially(path: str | Path) -> np.ndarray:
    """Ground truth: every frame of the file, decoded front to back by PyAV without seeking, in presentation order."""
    with av.open(str(path)) as container:
        decoded = [(frame.pts, frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
    decoded.sort(key=lambda item: item[0])
    return np.stack([array for _, array in decoded])


def packet_structure(path: Path) -> tuple[bool, int]:
    """(whether some packet is stored before an earlier-shown one, i.e. B-frames; number of keyframes)."""
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size > 0]
    pts = [p.pts for p in packets]
    return any(b < a for a, b in zip(pts, pts[1:])), sum(p.is_keyframe for p in packets)


def write_png(path: Path, array: np.ndarray) -> None:
    """Write one RGB image as PNG with PyAV (lossless, so it reads back bit-exactly)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = array.shape[1], array.shape[0], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode(None))


def as_chw(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` numpy frames as the ``(T, 3, H, W)`` tensor layout of `DecodedVideo.frames`."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


@contextmanager
def fail_after(seconds: int) -> Iterator[None]:
    """Fail a test that would otherwise hang (e.g. if a time limit stopped working) instead of blocking the run."""

    def on_alarm(signum: int, frame: object) -> None:
        raise AssertionError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def hang_or_decode(path: str, indices: Sequence[int]) -> np.ndarray:
    """A decoding backend that never returns for files named ``hang*`` and decodes other files sequentially.

    Module-level so that `FrameReader` can send it to its decode process by reference.
    """
    if Path(path).name.startswith("hang"):
        while True:
            time.sleep(3600)
    return decode_all_sequentially(path)[list(indices)]


# -------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return make_frames(NUM_FRAMES)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, source: np.ndarray) -> dict[str, Path]:
    """60-frame 64x64 clips at 8 fps: default `write_video` output, and B-frame/short-GOP clips."""
    folder = tmp_path_factory.mktemp("clips")
    paths = {
        "h264.mp4": folder / "h264.mp4",
        "mpeg4.mp4": folder / "mpeg4.mp4",
        "vp9.webm": folder / "vp9.webm",
        "h264_bframes.mp4": folder / "h264_bframes.mp4",
        "h264_bframes_open_gop.mkv": folder / "h264_bframes_open_gop.mkv",
        "mpeg4_bframes.mp4": folder / "mpeg4_bframes.mp4",
        "mpeg4_bframes.mkv": folder / "mpeg4_bframes.mkv",
    }
    write_video(paths["h264.mp4"], source, fps=FPS, codec="libx264")
    write_video(paths["mpeg4.mp4"], source, fps=FPS, codec="mpeg4")
    write_video(paths["vp9.webm"], source, fps=FPS, codec="libvpx-vp9")
    write_gop_clip(paths["h264_bframes.mp4"], source, "libx264", open_gop=False)
    write_gop_clip(paths["h264_bframes_open_gop.mkv"], source, "libx264", open_gop=True)
    write_gop_clip(paths["mpeg4_bframes.mp4"], source, "mpeg4", open_gop=True)
    write_gop_clip(paths["mpeg4_bframes.mkv"], source, "mpeg4", open_gop=True)
    return paths


@pytest.fixture(scope="module")
def truth(clips: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Sequentially decoded frames of every clip, ``(T, H, W, 3)``."""
    return {name: torch.from_numpy(decode_all_sequentially(path)) for name, path in clips.items()}


@pytest.fixture(scope="module", params=[("libx264", ".mp4"), ("mpeg4", ".mp4"), ("libvpx-vp9", ".webm")],
                ids=["h264", "mpeg4", "vp9"])
def vfr_clip(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A 40-frame variable-frame-rate clip (`VFR_TIMESTAMPS`), one per codec."""
    codec, suffix = request.param
    path = tmp_path_factory.mktemp("vfr") / f"vfr_{codec}{suffix}"
    write_video(path, make_frames(len(VFR_TIMESTAMPS)), fps=FPS, codec=codec, timestamps=VFR_TIMESTAMPS)
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, source: np.ndarray) -> dict[str, tuple[Path, str]]:
    """Unreadable sources, each with the reason its error must give."""
    folder = tmp_path_factory.mktemp("bad")
    files: dict[str, tuple[Path, str]] = {"missing": (folder / "missing.mp4", "file not found")}

    (folder / "empty.mp4").write_bytes(b"")
    files["empty"] = (folder / "empty.mp4", "file is empty (0 bytes)")

    (folder / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    files["text_renamed"] = (folder / "text.mp4", "not a readable media file")

    for name, codec in (("cut.mp4", "libx264"), ("cut.mkv", "libx264"), ("cut.webm", "libvpx-vp9")):
        whole = folder / f"whole_{name}"
        write_video(whole, source, fps=FPS, codec=codec)
        data = whole.read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        files[f"truncated_{Path(name).suffix[1:]}"] = (folder / name, "truncated")

    with av.open(str(folder / "audio.wav"), mode="w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        samples.sample_rate = 8000
        container.mux(stream.encode(samples))
        container.mux(stream.encode(None))
    files["audio_only"] = (folder / "audio.wav", "no video stream")

    (folder / "no_images").mkdir()
    (folder / "no_images" / "readme.txt").write_text("no frames here")
    files["folder_without_images"] = (folder / "no_images", "folder has no image files")

    (folder / "text.png").write_text("not an image")
    files["text_as_image"] = (folder / "text.png", "not a readable image")
    return files


@pytest.fixture(scope="module")
def hang_backend() -> Iterator[str]:
    """`hang_or_decode` registered as a backend, in a copy of the registry that is restored afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(video, "_BACKENDS", dict(video._BACKENDS))
        register_backend("test-hang", hang_or_decode)
        yield "test-hang"


@pytest.fixture(scope="module")
def timed_reader(hang_backend: str) -> Iterator[FrameReader]:
    """One decode process shared by the time-limit tests (starting one imports torch: seconds)."""
    reader = FrameReader(SamplingSpec(num_frames=8), backend=hang_backend, timeout=1.0)
    yield reader
    reader.close()


# ------------------------------------------------------------------------------- all backends, same frames

GOP_CLIPS = ("h264_bframes.mp4", "h264_bframes_open_gop.mkv", "mpeg4_bframes.mp4", "mpeg4_bframes.mkv")
ALL_CLIPS = ("h264.mp4", "mpeg4.mp4", "vp9.webm", *GOP_CLIPS)


def _index_sets() -> list[list[int]]:
    """Single frames around the first GOP boundaries (where open-GOP B-frames sit) and at the end, a run of
    B-frames across GOPs, and 6 random sorted sets (all frames in order are read by the read_video test below)."""
    singles = [0, 1, 2, *range(7, 14), *range(19, 26), 31, 32, 33, 44, 56, 59]
    rng = np.random.default_rng(20261123)
    sets = [[i] for i in singles] + [[7, 8, 10, 11, 19, 20, 22, 23]]
    for size in (2, 3, 5, 8, 13, 30):
        sets.append(sorted(rng.choice(NUM_FRAMES, size=size, replace=False).tolist()))
    return sets


INDEX_SETS = _index_sets()


@pytest.mark.parametrize("name", GOP_CLIPS)
def test_gop_clips_have_b_frames_and_several_keyframes(clips: dict[str, Path], name: str) -> None:
    has_b_frames, keyframes = packet_structure(clips[name])
    assert has_b_frames
    assert keyframes >= 5


@pytest.mark.parametrize("name", ALL_CLIPS)
def test_ground_truth_is_the_source_in_order(
    clips: dict[str, Path], truth: dict[str, torch.Tensor], source: np.ndarray, name: str
) -> None:
    assert nearest_source(truth[name], source) == list(range(NUM_FRAMES))
    timestamps, duration = probe_video(clips[name])
    assert timestamps == [i / FPS for i in range(NUM_FRAMES)]
    assert duration == NUM_FRAMES / FPS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", GOP_CLIPS)
def test_backends_return_the_true_frames_for_any_indices(
    clips: dict[str, Path], truth: dict[str, torch.Tensor], name: str, backend: str
) -> None:
    """The backend readers are called directly, since `read_video` only asks for indices a `SamplingSpec` picks."""
    reader = video._BACKENDS[backend]
    wrong = [
        indices
        for indices in INDEX_SETS
        if not torch.equal(torch.as_tensor(reader(str(clips[name]), indices)), truth[name][indices])
    ]
    assert wrong == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ALL_CLIPS)
def test_read_video_is_bit_identical_across_backends(
    clips: dict[str, Path], truth: dict[str, torch.Tensor], name: str, backend: str
) -> None:
    for spec in (SamplingSpec(num_frames=8), SamplingSpec(fps=3.0), SamplingSpec(fps=float(FPS))):
        decoded = read_video(clips[name], spec, backend=backend)
        assert decoded.frames.dtype == torch.uint8 and decoded.frames.is_contiguous()
        assert torch.equal(decoded.frames, truth[name][decoded.indices].permute(0, 3, 1, 2))
    assert decoded.indices == list(range(NUM_FRAMES))


# ------------------------------------------------------------------------------------- sampling on real clips


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("spec", "indices"),
    [
        # 60 frames at 8 fps, 7.5 s. Uniform 8: centres (k + 0.5) * 7.5 / 8 s = frame positions 3.75, 11.25, ...,
        # 56.25 -> nearest frames 4, 11, 19, 26, 34, 41, 49, 56.
        (SamplingSpec(num_frames=8), [4, 11, 19, 26, 34, 41, 49, 56]),
        (SamplingSpec(num_frames=8, end_sec=100.0), [4, 11, 19, 26, 34, 41, 49, 56]),
        # 2 fps: targets 0, 0.5, ..., 7.0 -> frames 0, 4, ..., 56 (15); capped at 5: positions floor(3k + 1.5).
        (SamplingSpec(fps=2.0), list(range(0, 60, 4))),
        (SamplingSpec(fps=2.0, max_frames=5), [4, 16, 28, 40, 52]),
        # Window [1, 3): 2 fps targets 1.0, 1.5, 2.0, 2.5; uniform 4 centres 1.25, 1.75, 2.25, 2.75.
        (SamplingSpec(fps=2.0, start_sec=1.0, end_sec=3.0), [8, 12, 16, 20]),
        (SamplingSpec(num_frames=4, start_sec=1.0, end_sec=3.0), [10, 14, 18, 22]),
        # From 6 s to the end (7.5 s): 1 fps targets 6.0, 7.0.
        (SamplingSpec(fps=1.0, start_sec=6.0), [48, 56]),
    ],
)
def test_sampling_on_a_constant_frame_rate_clip(
    clips: dict[str, Path], source: np.ndarray, spec: SamplingSpec, indices: list[int], backend: str
) -> None:
    decoded = read_video(clips["h264_bframes.mp4"], spec, backend=backend)
    assert isinstance(decoded, DecodedVideo)
    assert decoded.indices == indices
    assert decoded.timestamps == [i / FPS for i in indices]
    assert decoded.duration == 7.5
    assert decoded.path == str(clips["h264_bframes.mp4"])
    assert tuple(decoded.frames.shape) == (len(indices), 3, 64, 64)
    assert nearest_source(decoded.frames, source) == indices


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("spec", "indices"),
    [
        # Targets k / 3 for k < ceil(6.875 * 3) = 21, each to the nearest timestamp: 0, 3, 7, 10, 13, 17 in the
        # 0.1 s part, then 20, 21, 23, 24, 25, 27, 28, 29, 31, 32, 33, 35, 36, 37, 39; capped at 7 the positions
        # floor(3k + 1.5) = 1, 4, 7, 10, 13, 16, 19 remain.
        (SamplingSpec(fps=3.0, max_frames=7), [3, 13, 21, 25, 29, 33, 37]),
        # Centres (k + 0.5) * 6.875 / 4 = 0.859, 2.578, 4.297, 6.016 s -> frames at 0.9, 2.5, 4.25, 6.0 s.
        (SamplingSpec(num_frames=4), [9, 22, 29, 36]),
    ],
)
def test_sampling_on_a_variable_frame_rate_clip(
    vfr_clip: Path, spec: SamplingSpec, indices: list[int], backend: str
) -> None:
    path = vfr_clip
    timestamps, duration = probe_video(path)
    assert timestamps == VFR_TIMESTAMPS
    assert duration == 6.75 + 1 / FPS
    decoded = read_video(path, spec, backend=backend)
    assert decoded.indices == indices
    assert decoded.timestamps == [VFR_TIMESTAMPS[i] for i in indices]
    assert decoded.duration == 6.875
    assert nearest_source(decoded.frames, make_frames(len(VFR_TIMESTAMPS))) == indices


def test_repeated_indices_give_repeated_frames(tmp_path: Path) -> None:
    frames = make_frames(4)
    path = tmp_path / "short.mp4"
    write_video(path, frames, fps=2)
    # 4 frames 0.5 s apart, 2 s; centres 0.125, 0.375, ..., 1.875 s are nearest frames 0, 1, 1, 2, 2, 3, 3, 3.
    decoded = read_video(path, SamplingSpec(num_frames=8))
    assert decoded.indices == [0, 1, 1, 2, 2, 3, 3, 3]
    assert decoded.timestamps == [0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.5]
    assert nearest_source(decoded.frames, frames) == decoded.indices
    assert torch.equal(decoded.frames[1], decoded.frames[2])


def test_window_starting_at_the_end_is_a_decode_error(clips: dict[str, Path]) -> None:
    path = clips["h264.mp4"]
    with pytest.raises(VideoDecodeError) as info:
        read_video(path, SamplingSpec(num_frames=4, start_sec=7.5))
    assert info.value.path == str(path)
    assert "start_sec=7.5 is at or past the end of the video (7.500 s)" in str(info.value)


def test_frame_size_resizes_the_decoded_frames(clips: dict[str, Path]) -> None:
    native = read_video(clips["h264.mp4"], SamplingSpec(num_frames=4))
    resized = read_video(clips["h264.mp4"], SamplingSpec(num_frames=4, frame_size=32))
    assert tuple(resized.frames.shape) == (4, 3, 32, 32)
    assert resized.frames.dtype == torch.uint8
    assert torch.equal(resized.frames, resize_frames(native.frames, 32))
    assert resized.indices == native.indices


# ---------------------------------------------------------------------------------------------------- errors

BAD_KINDS = (
    "missing",
    "empty",
    "text_renamed",
    "truncated_mp4",
    "truncated_mkv",
    "truncated_webm",
    "audio_only",
    "folder_without_images",
    "text_as_image",
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_unreadable_sources_raise_video_decode_error(
    bad_files: dict[str, tuple[Path, str]], kind: str, backend: str
) -> None:
    path, reason = bad_files[kind]
    for spec in (SamplingSpec(num_frames=8), SamplingSpec(fps=2.0)):
        with pytest.raises(VideoDecodeError) as info:
            read_video(path, spec, backend=backend)
        assert info.value.path == str(path)
        assert reason in info.value.reason
        assert str(info.value) == f"cannot read video {str(path)!r}: {info.value.reason}"


@pytest.mark.parametrize("kind", [k for k in BAD_KINDS if k not in ("folder_without_images", "text_as_image")])
def test_probe_raises_the_same_errors(bad_files: dict[str, tuple[Path, str]], kind: str) -> None:
    path, reason = bad_files[kind]
    with pytest.raises(VideoDecodeError) as info:
        probe_video(path)
    assert info.value.path == str(path)
    assert reason in info.value.reason


def test_backend_failures_become_video_decode_errors(
    clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(video, "_BACKENDS", dict(video._BACKENDS))
    register_backend("test-raises", _raise_runtime_error)
    register_backend("test-wrong-shape", _return_one_gray_frame)
    path = clips["h264.mp4"]
    with pytest.raises(VideoDecodeError, match="test-raises failed to decode: RuntimeError: decoder exploded"):
        read_video(path, SamplingSpec(num_frames=4), backend="test-raises")
    with pytest.raises(VideoDecodeError, match=r"returned torch.float32 \(1, 8, 8, 3\), expected uint8 \(4, H, W, 3\)"):
        read_video(path, SamplingSpec(num_frames=4), backend="test-wrong-shape")


def _raise_runtime_error(path: str, indices: Sequence[int]) -> np.ndarray:
    """A backend that fails like a crashing decoder library."""
    raise RuntimeError("decoder exploded")


def _return_one_gray_frame(path: str, indices: Sequence[int]) -> torch.Tensor:
    """A backend that returns the wrong number, size and dtype of frames."""
    return torch.full((1, 8, 8, 3), 0.5)


# ---------------------------------------------------------------------------------------- time limit (process)


def test_frame_reader_times_out_and_then_works_again(
    timed_reader: FrameReader, clips: dict[str, Path], truth: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    good = clips["h264.mp4"]
    hang = tmp_path / "hang.mp4"
    shutil.copy(good, hang)
    expected = read_video(good, SamplingSpec(num_frames=8), backend="pyav")
    with fail_after(60):
        first = timed_reader(good)  # starts the decode process
        start = time.monotonic()
        with pytest.raises(VideoDecodeError) as info:
            timed_reader(hang)
        elapsed = time.monotonic() - start
        again = timed_reader(good)  # a fresh decode process
    assert info.value.path == str(hang)
    assert info.value.reason == "decoding timed out after 1s"
    assert 1.0 <= elapsed < 2.5
    for decoded in (first, again):
        assert torch.equal(decoded.frames, expected.frames)
        assert (decoded.indices, decoded.timestamps, decoded.duration, decoded.path) == (
            expected.indices, expected.timestamps, expected.duration, expected.path,
        )


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_frame_reader_passes_decode_errors_back(
    timed_reader: FrameReader, bad_files: dict[str, tuple[Path, str]], kind: str
) -> None:
    path, reason = bad_files[kind]
    with fail_after(60), pytest.raises(VideoDecodeError) as info:
        timed_reader(path)
    assert info.value.path == str(path)
    assert reason in info.value.reason


class _ClipDataset(Dataset):
    """A dataset that decodes through a `FrameReader`, as a training dataset does inside DataLoader workers."""

    def __init__(self, reader: FrameReader, paths: list[Path]):
        self.reader = reader
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[int], int]:
        decoded = self.reader(self.paths[i])
        return decoded.frames, decoded.indices, os.getpid()


def test_frame_reader_pickles_and_works_in_a_dataloader_worker(
    timed_reader: FrameReader, clips: dict[str, Path]
) -> None:
    copy = pickle.loads(pickle.dumps(timed_reader))
    assert repr(copy) == repr(timed_reader)
    assert (copy.spec, copy.backend, copy.timeout, copy.image_fps) == (
        SamplingSpec(num_frames=8), "test-hang", 1.0, 1.0,
    )
    paths = [clips["h264.mp4"], clips["mpeg4_bframes.mp4"]]
    expected = [read_video(p, SamplingSpec(num_frames=8), backend="pyav") for p in paths]
    loader = DataLoader(_ClipDataset(copy, paths), batch_size=None, num_workers=1)
    with fail_after(90):
        results = list(loader)
        parent_result = timed_reader(paths[0])
    for (frames, indices, worker_pid), want in zip(results, expected):
        assert worker_pid != os.getpid()
        assert torch.equal(frames, want.frames)
        assert indices == want.indices
    assert torch.equal(parent_result.frames, expected[0].frames)


_DECODING_PIDS: list[int] = []


def record_pid_and_decode(path: str, indices: Sequence[int]) -> np.ndarray:
    """A backend that notes which process decodes (in this module's list, so only visible in-process)."""
    _DECODING_PIDS.append(os.getpid())
    return decode_all_sequentially(path)[list(indices)]


def report_heavy_imports(path: str, indices: Sequence[int]) -> np.ndarray:
    """A backend that fails with the names of the modules a decode process should not need that it has loaded."""
    heavy = ["transformers", "peft", "videollm.model.modeling", "videollm.data.processor"]
    raise VideoDecodeError(path, "loaded: " + " ".join(name for name in heavy if name in sys.modules))


def test_decode_process_does_not_import_transformers(clips: dict[str, Path]) -> None:
    """The decode process enters the package without its __init__ (which imports transformers and the model), so it
    starts in the time torch and the decoders take to import, not seconds more."""
    reader = FrameReader(SamplingSpec(num_frames=2), backend=f"{__name__}:report_heavy_imports", timeout=60.0)
    with pytest.raises(VideoDecodeError, match=r"loaded: $"):
        reader(clips["h264.mp4"])
    assert "transformers" in sys.modules  # this process has them: the check above is not vacuous
    decoded = FrameReader(SamplingSpec(num_frames=2), backend="pyav", timeout=60.0)(clips["h264.mp4"])
    assert torch.equal(decoded.frames, read_video(clips["h264.mp4"], SamplingSpec(num_frames=2), backend="pyav").frames)


def test_frame_reader_without_timeout_decodes_in_process(
    clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(video, "_BACKENDS", dict(video._BACKENDS))
    register_backend("test-record-pid", record_pid_and_decode)
    _DECODING_PIDS.clear()
    decoded = FrameReader(SamplingSpec(num_frames=4), backend="test-record-pid", timeout=None)(clips["h264.mp4"])
    assert _DECODING_PIDS == [os.getpid()]
    assert torch.equal(decoded.frames, read_video(clips["h264.mp4"], SamplingSpec(num_frames=4)).frames)


def test_frame_reader_rejects_bad_arguments(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    for timeout in (0, -1.0, "5"):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds or None"):
            FrameReader(SamplingSpec(), timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_fps must be a positive number"):
        FrameReader(SamplingSpec(), image_fps=0)
    with pytest.raises(ValueError, match="unknown video backend 'nope'"):
        FrameReader(SamplingSpec(), backend="nope")
    monkeypatch.setattr(video, "_BACKENDS", dict(video._BACKENDS))
    register_backend("test-lambda", lambda path, indices: np.zeros((len(indices), 2, 2, 3), np.uint8))
    reader = FrameReader(SamplingSpec(), backend="test-lambda", timeout=5.0)
    with pytest.raises(TypeError, match="register a module-level function"):
        reader(clips["h264.mp4"])


# ------------------------------------------------------------------------------------------ images as video


@pytest.fixture(scope="module")
def image_frames() -> np.ndarray:
    return make_frames(12, height=30, width=40)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory, image_frames: np.ndarray) -> Path:
    """frame_1.png .. frame_12.png (name order would put frame_10 before frame_2) and a file that is no image."""
    folder = tmp_path_factory.mktemp("frames")
    for i, array in enumerate(image_frames):
        write_png(folder / f"frame_{i + 1}.png", array)
    (folder / "notes.txt").write_text("not a frame")
    return folder


@pytest.mark.parametrize("backend", BACKENDS)
def test_folder_of_images_is_a_video(image_folder: Path, image_frames: np.ndarray, backend: str) -> None:
    every = read_video(image_folder, SamplingSpec(fps=1.0), backend=backend)
    assert torch.equal(every.frames, as_chw(image_frames))
    assert every.indices == list(range(12))
    assert every.timestamps == [float(i) for i in range(12)]
    assert every.duration == 12.0
    assert every.path == str(image_folder)
    # At 2 images per second the folder lasts 6 s; centres 0.6, 1.8, 3.0, 4.2, 5.4 -> images at 0.5, 2, 3, 4, 5.5 s.
    uniform = read_video(image_folder, SamplingSpec(num_frames=5), backend=backend, image_fps=2.0)
    assert uniform.indices == [1, 4, 6, 8, 11]
    assert uniform.timestamps == [0.5, 2.0, 3.0, 4.0, 5.5]
    assert torch.equal(uniform.frames, as_chw(image_frames[[1, 4, 6, 8, 11]]))


def test_list_of_images_is_a_video_in_list_order(image_folder: Path, image_frames: np.ndarray) -> None:
    files = [image_folder / f"frame_{i + 1}.png" for i in reversed(range(12))]
    decoded = read_video(files, SamplingSpec(fps=1.0))
    assert torch.equal(decoded.frames, as_chw(image_frames[::-1].copy()))
    assert decoded.path == str(files[0])
    resized = read_video([str(f) for f in files[:3]], SamplingSpec(num_frames=3, frame_size=16))
    assert tuple(resized.frames.shape) == (3, 3, 16, 16)


def test_single_image_is_a_one_frame_video(image_folder: Path, image_frames: np.ndarray) -> None:
    decoded = read_video(image_folder / "frame_3.png", SamplingSpec(num_frames=4))
    assert decoded.indices == [0, 0, 0, 0]
    assert torch.equal(decoded.frames, as_chw(np.repeat(image_frames[2:3], 4, axis=0)))


def test_images_of_different_sizes_need_frame_size(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", make_frames(1, 16, 16)[0])
    write_png(tmp_path / "b.png", make_frames(2, 24, 32)[1])
    with pytest.raises(VideoDecodeError, match="set SamplingSpec.frame_size") as info:
        read_video(tmp_path, SamplingSpec(fps=1.0))
    assert info.value.path == str(tmp_path / "b.png")
    decoded = read_video(tmp_path, SamplingSpec(fps=1.0, frame_size=8))
    assert tuple(decoded.frames.shape) == (2, 3, 8, 8)


def test_empty_image_list_is_a_decode_error() -> None:
    with pytest.raises(VideoDecodeError, match="no images given"):
        read_video([], SamplingSpec())


# ------------------------------------------------------------------------------------------------ resizing


def test_resize_frames_shape_and_dtype() -> None:
    frames = as_chw(make_frames(20, 30, 40))
    resized = resize_frames(frames, 16)
    assert tuple(resized.shape) == (20, 3, 16, 16)
    assert resized.dtype == torch.uint8
    # Frames are resized in chunks of 8; a frame resized alone gives the same pixels.
    assert torch.equal(resized[13:14], resize_frames(frames[13:14], 16))


def test_resize_frames_keeps_constant_frames_exact() -> None:
    frames = torch.full((2, 3, 30, 40), 77, dtype=torch.uint8)
    assert torch.equal(resize_frames(frames, 64), torch.full((2, 3, 64, 64), 77, dtype=torch.uint8))
    assert torch.equal(resize_frames(frames, 7), torch.full((2, 3, 7, 7), 77, dtype=torch.uint8))


def test_resize_frames_to_the_same_size_is_a_no_op() -> None:
    frames = as_chw(make_frames(2, 16, 16))
    assert resize_frames(frames, 16) is frames


@pytest.mark.parametrize(
    ("frames", "size", "message"),
    [
        (torch.zeros(2, 3, 8, 8), 4, "expects uint8"),
        (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), 4, "expects uint8"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), 4, "expects uint8"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 0, "size must be a positive integer"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 4.0, "size must be a positive integer"),
    ],
)
def test_resize_frames_rejects_bad_input(frames: torch.Tensor, size: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resize_frames(frames, size)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ backend selection


def _spy(calls: list[str], name: str, reader: Callable) -> Callable:
    """`reader`, noting `name` in `calls` each time it decodes (to see which backend "auto" picked)."""

    def wrapped(path: str, indices: Sequence[int]) -> np.ndarray | torch.Tensor:
        calls.append(name)
        return reader(path, indices)

    return wrapped


def test_available_backends_follow_the_documented_preference() -> None:
    assert video._PREFERENCE == DOCUMENTED_PREFERENCE
    backends = available_backends()
    assert backends[: len(INSTALLED)] == INSTALLED
    assert [b for b in backends if b in DOCUMENTED_PREFERENCE] == INSTALLED


def test_auto_uses_the_first_available_backend(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in INSTALLED:
        monkeypatch.setitem(video._BACKENDS, name, _spy(calls, name, video._BACKENDS[name]))
    read_video(clips["h264.mp4"], SamplingSpec(num_frames=2))
    assert calls == INSTALLED[:1]


def test_auto_skips_a_backend_that_does_not_import(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in INSTALLED:
        monkeypatch.setitem(video._BACKENDS, name, _spy(calls, name, video._BACKENDS[name]))
    importable = video._importable
    monkeypatch.setattr(video, "_importable", lambda module: module != "torchcodec.decoders" and importable(module))
    remaining = [name for name in INSTALLED if name != "torchcodec"]
    assert available_backends()[: len(remaining)] == remaining
    read_video(clips["h264.mp4"], SamplingSpec(num_frames=2))
    assert calls == remaining[:1]
    with pytest.raises(ValueError, match="video backend 'torchcodec' is not installed"):
        read_video(clips["h264.mp4"], SamplingSpec(num_frames=2), backend="torchcodec")


def test_registered_backends_come_after_the_builtins(clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video, "_BACKENDS", {name: video._BACKENDS[name] for name in DOCUMENTED_PREFERENCE})
    register_backend("test-sequential", hang_or_decode)
    assert available_backends() == INSTALLED + ["test-sequential"]
    decoded = read_video(clips["mpeg4_bframes.mp4"], SamplingSpec(num_frames=3), backend="test-sequential")
    assert decoded.indices == [10, 30, 50]


@pytest.mark.parametrize("name", ["auto", "pyav", "torchcodec", "decord", ""])
def test_reserved_backend_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="reserved or empty"):
        register_backend(name, hang_or_decode)


def test_register_backend_needs_a_callable_and_read_video_a_known_name(clips: dict[str, Path]) -> None:
    with pytest.raises(TypeError, match="reader must be callable"):
        register_backend("test-not-callable", "decode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown video backend 'ffmpeg-cli'"):
        read_video(clips["h264.mp4"], SamplingSpec(), backend="ffmpeg-cli")


def test_an_unreadable_file_costs_its_own_item_only(clips: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 64)
    items = [("a", [clips["h264.mp4"]]), ("b", [clips["h264.mp4"], broken]), ("c", [])]
    decoded, failed = decode_each(items, lambda item: item[1], lambda path: read_video(path, SamplingSpec(num_frames=2)))
    assert [(item[0], len(videos)) for item, videos in decoded] == [("a", 1), ("c", 0)]
    assert [(item[0], error.path) for item, error in failed] == [("b", str(broken))]
