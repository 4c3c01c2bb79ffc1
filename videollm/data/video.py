"""Video decoding: one entry point (`read_video`) over several decoders, with a time limit (`FrameReader`).

Frame selection is decided once, from the presentation timestamps that a PyAV demux of the file yields without
decoding anything (`probe_video`); `SamplingSpec.select` turns them into frame indices, and the chosen backend
decodes exactly those indices. Every backend numbers frames in presentation order and converts with FFmpeg's
swscale, so all of them return bit-identical RGB frames (the tests check this).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import BufferTooShort
from multiprocessing.connection import Connection
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import av
import numpy as np
import torch
import torch.nn.functional as F

from videollm.data.sampling import FrameSelection, SamplingSpec

T = TypeVar("T")

Reader = Callable[[str, Sequence[int]], "np.ndarray | torch.Tensor"]
"""A decoding backend: ``reader(path, indices)`` returns the frames at ``indices`` (strictly increasing,
presentation order) as uint8 RGB of shape ``(len(indices), H, W, 3)``, numpy or torch."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# Preference order of `backend="auto"`, from bench/bench_decode.py on a 2-core CPU (2026-11-23): torchcodec is
# the fastest on both h264 and mpeg4; PyAV comes before decord because it is about as fast, is a hard
# dependency that is maintained, and decord can hang while holding the GIL and leaks memory (decord#373).
_PREFERENCE = ("torchcodec", "pyav", "decord")

# Starting a worker imports torch and the decoders; this bounds how long that may take, separately from the
# per-video timeout.
_WORKER_START_TIMEOUT_S = 120.0

# resize_frames converts frames to float32 in chunks of at most this many bytes (and at most 8 frames), so that a
# 4000x4000 clip is resized one frame at a time instead of needing gigabytes at once.
_RESIZE_CHUNK_BYTES = 256 * 2**20


class VideoDecodeError(Exception):
    """The one exception for unreadable media: missing, empty, truncated, not a video, no frames, too slow.

    Attributes:
        path: the file (or frame folder) that could not be read.
        reason: what went wrong, in words.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read video {self.path!r}: {self.reason}"


@dataclass
class DecodedVideo:
    """Frames chosen by a `SamplingSpec` and decoded.

    Attributes:
        frames: uint8 tensor ``(T, 3, H, W)``, RGB; ``H = W = spec.frame_size`` when that is set.
            Empty for a video read from a feature cache (`CachedVideo`).
        indices: index of each frame in the video (presentation order); may repeat for uniform sampling.
        timestamps: presentation time of each frame in seconds from the first frame of the video.
        duration: length of the whole video in seconds.
        path: the video file, the frame folder, or the first image of a list of images.
    """

    frames: torch.Tensor
    indices: list[int]
    timestamps: list[float]
    duration: float
    path: str


# The model input that each feature-cache level's features travel under (the model's forward takes both).
FEATURE_KEYS = {"tower": "video_frame_features", "projector": "video_embeds"}


@dataclass
class CachedVideo(DecodedVideo):
    """A video read from a feature cache (`videollm.data.feature_cache`): no frames (`frames` holds zero), the frame
    metadata that decoding would have returned (the processor expands `<video>` and writes timestamps from it), and
    the cached `features` of `level` (`FEATURE_KEYS`), which the processor hands to the model in place of pixels."""

    features: torch.Tensor
    level: str


def decode_each(
    items: Sequence[T], paths_of: Callable[[T], Sequence[str]], load_video: Callable[[str], DecodedVideo]
) -> tuple[list[tuple[T, list[DecodedVideo]]], list[tuple[T, VideoDecodeError]]]:
    """Every item's videos (`paths_of(item)`) read with `load_video`: `(item, videos)` for the items whose videos all
    decode and `(item, error)` for the others, both in item order, so that an unreadable file costs its own question
    and not the batch it came in."""
    decoded, failed = [], []
    for item in items:
        try:
            decoded.append((item, [load_video(path) for path in paths_of(item)]))
        except VideoDecodeError as error:
            failed.append((item, error))
    return decoded, failed


# ---------------------------------------------------------------------------------------------------- backends


def _read_torchcodec(path: str, indices: Sequence[int]) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder

    # "exact" scans the file and numbers frames by sorted PTS, the same numbering as probe_video.
    decoder = VideoDecoder(path, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=1)
    return decoder.get_frames_at(list(indices)).data


def _read_decord(path: str, indices: Sequence[int]) -> np.ndarray:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    decord_keys = np.asarray(reader.get_key_indices(), dtype=np.int64)
    if np.array_equal(decord_keys, _probe(path).keyframes):
        return reader.get_batch(list(indices)).asnumpy()
    # decord numbers keyframes by decode order. With open GOPs (frames shown before their keyframe but decoded after
    # it, e.g. MPEG-4 Part 2 with B-frames, x264 --open-gop) that is not their frame number, and every seek of decord
    # lands on the wrong frame. decord seeks only when a read crosses one of its keyframe numbers `k` from before
    # `k - 1`, so also reading each frame `k - 1` makes it decode the file from the start without a single seek.
    wanted = set(int(i) for i in indices)
    last = max(wanted)
    frames: list[np.ndarray] = []
    for i in sorted(wanted | {int(k) - 1 for k in decord_keys if 0 < k <= last}):
        frame = reader[i].asnumpy()
        if i in wanted:
            frames.append(frame)
    return np.stack(frames)


def _read_pyav(path: str, indices: Sequence[int]) -> np.ndarray:
    with av.open(path) as container:
        stream = container.streams.best("video")
        index = _scan(container, stream, path)
        order = np.asarray(indices, dtype=np.int64)
        wanted = index.pts[order]
        gops = index.gop[order]
        frames: list[np.ndarray] = []
        restarted = False
        while len(frames) < len(wanted):
            i = len(frames)
            # Seek to the keyframe that starts the target's GOP (by its DTS, never later than any frame in it), so
            # that the seek cannot land after the target even when the demuxer indexes by DTS.
            container.seek(int(index.gop_seek[gops[i]]), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None or frame.pts < wanted[i]:
                    continue
                if frame.pts > wanted[i]:
                    if restarted:
                        raise VideoDecodeError(path, f"pyav: no frame with pts {wanted[i]} (index {order[i]})")
                    restarted = True
                    index.gop_seek[gops[i]] = index.gop_seek[0]
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
                i += 1
                # Decode on within the GOP; jump with a seek when the next target lies in a later one.
                if i == len(wanted) or gops[i] != gops[i - 1]:
                    break
            else:
                if len(frames) < len(wanted):
                    raise VideoDecodeError(path, f"pyav: decoding ended before frame {order[len(frames)]}")
        return np.stack(frames)


_BACKENDS: dict[str, Reader] = {"torchcodec": _read_torchcodec, "pyav": _read_pyav, "decord": _read_decord}
_BACKEND_MODULES = {"torchcodec": "torchcodec.decoders", "pyav": "av", "decord": "decord"}


def register_backend(name: str, reader: Reader) -> None:
    """Add (or replace) a decoding backend usable as ``read_video(..., backend=name)``.

    `reader(path, indices)` gets strictly increasing frame indices and returns uint8 RGB frames
    ``(len(indices), H, W, 3)``. For use with a timeout (`FrameReader`) the decode process is told the reader's
    ``module:qualname`` and imports it, so it must be a module-level function of an importable module (not a
    lambda, closure, or function defined in ``__main__``). A backend can also be named by that reference directly,
    e.g. ``read_video(..., backend="mypackage.decoders:read")``, without registering it.

    Raises:
        ValueError: the name is ``"auto"`` or one of the built-in backends.
    """
    if not isinstance(name, str) or not name or name == "auto" or name in _BACKEND_MODULES:
        raise ValueError(f"backend name {name!r} is reserved or empty; built-ins are {sorted(_BACKEND_MODULES)}")
    if not callable(reader):
        raise TypeError(f"backend {name!r}: reader must be callable, got {type(reader).__name__}")
    _BACKENDS[name] = reader


def _importable(module: str) -> bool:
    try:
        __import__(module)
    # Not only ImportError: a torchcodec built for CUDA raises OSError/RuntimeError while loading its libraries.
    except Exception:
        return False
    return True


def available_backends() -> list[str]:
    """Backends that can be used here: the importable built-ins in `auto` preference order, then registered ones."""
    builtins = [name for name in _PREFERENCE if _importable(_BACKEND_MODULES[name])]
    return builtins + [name for name in _BACKENDS if name not in _BACKEND_MODULES]


def _import_reader(reference: str) -> Reader:
    """The function a ``"module:qualname"`` reference names, imported with importlib.

    Raises:
        ImportError / AttributeError: the module or the name does not exist.
        TypeError: the name is not callable.
    """
    module_name, _, qualname = reference.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"{reference!r} is not a 'module:function' reference")
    target = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{reference!r} is not callable")
    return target


def _reader_reference(name: str, reader: Reader) -> str:
    """``module:qualname`` of a reader, checked to import back to the same function (so a decode process can)."""
    module_name = getattr(reader, "__module__", None)
    qualname = getattr(reader, "__qualname__", None)
    problem = None
    if not module_name or not qualname or module_name == "__main__" or "<" in qualname:
        problem = f"{module_name}:{qualname} is not importable by name"
    else:
        reference = f"{module_name}:{qualname}"
        try:
            if _import_reader(reference) is reader:
                return reference
            problem = f"{reference} imports to a different object"
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            problem = f"{reference} cannot be imported ({e})"
    raise TypeError(
        f"backend {name!r} cannot be sent to the decode process: {problem}; register a module-level function"
    )


def _resolve_backend(backend: str) -> tuple[str, Reader]:
    if isinstance(backend, str) and ":" in backend:
        try:
            return backend, _import_reader(backend)
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"video backend {backend!r} cannot be imported: {e}") from e
    if backend == "auto":
        for name in _PREFERENCE:
            if _importable(_BACKEND_MODULES[name]):
                return name, _BACKENDS[name]
        raise RuntimeError("no video decoding backend is importable (install av, torchcodec or decord)")
    if backend not in _BACKENDS:
        raise ValueError(
            f"unknown video backend {backend!r}; choose 'auto', one of {sorted(_BACKENDS)}, or a 'module:function'"
        )
    if backend in _BACKEND_MODULES and not _importable(_BACKEND_MODULES[backend]):
        raise ValueError(f"video backend {backend!r} is not installed or fails to import here")
    return backend, _BACKENDS[backend]


# ------------------------------------------------------------------------------------------- probing (no decode)


@dataclass
class _StreamIndex:
    pts: np.ndarray  # int64 PTS of every frame, sorted (presentation order)
    gop: np.ndarray  # for every frame in presentation order, the number of the GOP it is decoded in
    gop_seek: np.ndarray  # for every GOP, a timestamp to seek to that lands on or before its keyframe
    keyframes: np.ndarray  # frame number (presentation order) of every keyframe packet, in decode order
    timestamps: np.ndarray  # seconds from the first frame
    duration: float


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)")


def _scan(container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: str) -> _StreamIndex:
    pts: list[int] = []
    gop: list[int] = []
    gop_seek: list[int] = []
    key_pts: list[int] = []
    last_duration = 0
    n_packets = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            n_packets += 1
            if packet.is_corrupt:
                raise VideoDecodeError(path, f"corrupt packet {n_packets - 1} (the file is probably truncated)")
            # Frames the container marks as discarded (edit lists) are not output by decoders, so not numbered.
            if packet.is_discard:
                continue
            timestamp = packet.pts if packet.pts is not None else packet.dts
            if timestamp is None:
                raise VideoDecodeError(path, "video packets carry no timestamps")
            if packet.is_keyframe:
                key_pts.append(timestamp)
            if packet.is_keyframe or not gop_seek:
                gop_seek.append(packet.dts if packet.dts is not None else timestamp)
            pts.append(timestamp)
            gop.append(len(gop_seek) - 1)
            last_duration = packet.duration or 0
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"demuxing failed after {n_packets} packets: {e}") from e
    if not pts:
        raise VideoDecodeError(path, "the video stream has no frames")
    if stream.frames and n_packets < stream.frames:
        raise VideoDecodeError(
            path, f"truncated: the header declares {stream.frames} frames but only {n_packets} can be read"
        )

    order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    sorted_pts = np.asarray(pts, dtype=np.int64)[order]
    tb = stream.time_base or Fraction(1, 1)
    # Integer PTS times an exact rational, divided once: a correctly rounded float for every frame.
    timestamps = (sorted_pts - sorted_pts[0]) * tb.numerator / tb.denominator
    if last_duration > 0:
        frame_interval = last_duration * tb.numerator / tb.denominator
    elif len(timestamps) > 1:
        frame_interval = float(np.median(np.diff(timestamps)))
    elif stream.average_rate:
        frame_interval = 1.0 / float(stream.average_rate)
    else:
        frame_interval = 0.0
    duration = float(timestamps[-1] + frame_interval)

    # Matroska/WebM have no frame count in the header; a file cut short shows as a duration shortfall. Only
    # checked for single-stream files, where the container duration is the video's and not, say, the audio's.
    if not stream.frames and len(container.streams) == 1 and container.duration:
        declared = container.duration / av.time_base
        if declared - duration > max(0.5, 0.05 * declared):
            raise VideoDecodeError(
                path, f"truncated: the header declares {declared:.3f} s but frames end at {duration:.3f} s"
            )
    return _StreamIndex(
        pts=sorted_pts,
        gop=np.asarray(gop, dtype=np.int64)[order],
        gop_seek=np.asarray(gop_seek, dtype=np.int64),
        keyframes=np.searchsorted(sorted_pts, np.asarray(key_pts, dtype=np.int64)),
        timestamps=timestamps,
        duration=duration,
    )


def _open(path: str) -> av.container.InputContainer:
    _check_file(path)
    try:
        return av.open(path)
    except av.FFmpegError as e:
        raise VideoDecodeError(path, f"not a readable media file ({e.strerror or e})") from e


def _probe(path: str) -> _StreamIndex:
    with _open(path) as container:
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream")
        return _scan(container, container.streams.best("video"), path)


def probe_video(path: str | Path) -> tuple[list[float], float]:
    """Presentation timestamps (seconds from the first frame) of every frame, and the duration, without decoding.

    Raises:
        VideoDecodeError: the file is missing, empty, not a video, truncated, or has no frames.
    """
    index = _probe(str(path))
    return index.timestamps.tolist(), index.duration


# ---------------------------------------------------------------------------------------------------- decoding


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 frames ``(T, 3, H, W)`` to ``(T, 3, size, size)`` with antialiased bicubic interpolation.

    Written in torch because torchvision is unusable in this stack. The aspect ratio is not kept (like the
    SigLIP/CLIP image processors, which also resize to a square). Bicubic with antialiasing matches those
    processors' PIL resampling closely. Frames are processed in chunks to bound the float32 working memory
    (one frame at a time for very large frames).
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"resize_frames expects uint8 (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"resize_frames: size must be a positive integer, got {size!r}")
    if frames.shape[-2:] == (size, size):
        return frames
    out = torch.empty((frames.shape[0], 3, size, size), dtype=torch.uint8)
    frame_bytes = 4 * frames[0].numel()
    step = max(1, min(8, _RESIZE_CHUNK_BYTES // frame_bytes))
    for start in range(0, frames.shape[0], step):
        chunk = frames[start : start + step].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[start : start + step] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _read_image(path: str) -> np.ndarray:
    _check_file(path)
    try:
        with av.open(path) as container:
            return next(container.decode(video=0)).to_ndarray(format="rgb24")
    except (av.FFmpegError, StopIteration, IndexError) as e:
        raise VideoDecodeError(path, f"not a readable image ({e})") from e


def _image_files(source: str | Path | Sequence[str | Path]) -> tuple[str, list[str]] | None:
    """(label, image files) when `source` is a frame folder, an image, or a list of images; None for a video."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = sorted(
                (p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()), key=_natural_key
            )
            if not files:
                raise VideoDecodeError(str(path), f"folder has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            return str(path), [str(p) for p in files]
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return str(path), [str(path)]
        return None
    files = [str(p) for p in source]
    if not files:
        raise VideoDecodeError("<empty image list>", "no images given")
    return files[0], files


def _label(source: str | Path | Sequence[str | Path]) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    files = list(source)
    return str(files[0]) if files else "<empty image list>"


def _select(spec: SamplingSpec, timestamps: np.ndarray, duration: float, path: str) -> FrameSelection:
    try:
        return spec.select(timestamps, duration)
    except ValueError as e:
        raise VideoDecodeError(path, str(e)) from e


def _to_tensor(array: np.ndarray | torch.Tensor, expected: int, path: str, backend: str) -> torch.Tensor:
    frames = torch.as_tensor(array)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != expected:
        raise VideoDecodeError(
            path,
            f"backend {backend!r} returned {frames.dtype} {tuple(frames.shape)}, expected uint8 ({expected}, H, W, 3)",
        )
    return frames.permute(0, 3, 1, 2)


def _gather(frames: torch.Tensor, unique: np.ndarray, indices: Sequence[int]) -> torch.Tensor:
    """Frames for `indices` (which may repeat) from frames decoded at the sorted `unique` indices."""
    positions = torch.from_numpy(np.searchsorted(unique, np.asarray(indices, dtype=np.int64)))
    return frames.index_select(0, positions).contiguous()


def _decode(
    source: str | Path | Sequence[str | Path], spec: SamplingSpec, backend: str, reader: Reader, image_fps: float
) -> DecodedVideo:
    images = _image_files(source)
    if images is not None:
        label, files = images
        selection = _select(spec, np.arange(len(files)) / image_fps, len(files) / image_fps, label)
        unique = np.unique(np.asarray(selection.indices, dtype=np.int64))
        arrays = [_read_image(files[i]) for i in unique]
        tensors = [torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0) for a in arrays]
        if spec.frame_size is not None:
            tensors = [resize_frames(t, spec.frame_size) for t in tensors]
        for i, t in zip(unique, tensors):
            if t.shape != tensors[0].shape:
                raise VideoDecodeError(
                    files[i], f"image is {tuple(t.shape[-2:])} but {files[unique[0]]} is {tuple(tensors[0].shape[-2:])}"
                    "; set SamplingSpec.frame_size to resize frames of different sizes",
                )
        frames = torch.cat(tensors)
    else:
        label = str(source)
        index = _probe(label)
        selection = _select(spec, index.timestamps, index.duration, label)
        unique = np.unique(np.asarray(selection.indices, dtype=np.int64))
        try:
            array = reader(label, unique.tolist())
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(label, f"{backend} failed to decode: {type(e).__name__}: {e}") from e
        frames = _to_tensor(array, len(unique), label, backend)
        if spec.frame_size is not None:
            frames = resize_frames(frames, spec.frame_size)
    return DecodedVideo(
        frames=_gather(frames, unique, selection.indices),
        indices=list(selection.indices),
        timestamps=list(selection.timestamps),
        duration=selection.duration,
        path=label,
    )


def read_video(
    source: str | Path | Sequence[str | Path],
    spec: SamplingSpec,
    backend: str = "auto",
    timeout: float | None = None,
    image_fps: float = 1.0,
) -> DecodedVideo:
    """Decode the frames of a video that `spec` selects.

    Args:
        source: a video file; a folder of frame images (sorted by name, numbers compared as numbers); one image;
            or a list of image files. Images are frames at `image_fps` and are decoded with PyAV whatever the
            backend.
        spec: which frames, and the output size.
        backend: ``"auto"`` (first importable of torchcodec, pyav, decord), one of those, or a registered name.
        timeout: seconds; when set, decoding runs in a separate process that is killed past the limit (a
            temporary `FrameReader`, which costs a process start; keep a `FrameReader` for many videos).
        image_fps: frame rate given to image sequences.

    Returns:
        The frames, uint8 ``(T, 3, H, W)`` RGB, with their indices and timestamps.

    Raises:
        VideoDecodeError: the source is missing, empty, truncated, not a video, has no frames, cannot be decoded,
            the clip window starts past its end, or decoding took longer than `timeout`.
    """
    if timeout is not None:
        with FrameReader(spec, backend=backend, timeout=timeout, image_fps=image_fps) as frame_reader:
            return frame_reader(source)
    _check_image_fps(image_fps)
    name, reader = _resolve_backend(backend)
    return _decode(source, spec, name, reader, image_fps)


def _check_image_fps(image_fps: float) -> None:
    if not isinstance(image_fps, (int, float)) or isinstance(image_fps, bool) or not image_fps > 0:
        raise ValueError(f"image_fps must be a positive number, got {image_fps!r}")


# -------------------------------------------------------------------------------------------- timed decoding


# The decode process and its parent talk in JSON messages and raw frame bytes; nothing received is unpickled. A
# request names the reader as "module:qualname" (checked by the parent to import back to the registered function),
# and the process imports it.
#
#   request  {"source": path | [paths], "spec": SamplingSpec.to_dict(), "backend": name, "reader": "module:qualname",
#             "image_fps": float}
#   reply    {"status": "ok", "shape": [T, 3, H, W], "dtype": "uint8", "indices", "timestamps", "duration", "path"}
#            followed by one message of T*3*H*W bytes (C order); or
#            {"status": "error", "type": "VideoDecodeError", "path", "reason"} | {"status": "error", "type", "message"}

# Exception types a decode process may report that the parent raises as themselves; any other becomes RuntimeError.
_REMOTE_ERRORS = MappingProxyType({"ValueError": ValueError, "TypeError": TypeError, "RuntimeError": RuntimeError})


def _send_json(conn: Connection, message: dict) -> None:
    conn.send_bytes(json.dumps(message).encode("utf-8"))


def _recv_json(conn: Connection) -> dict:
    return json.loads(conn.recv_bytes().decode("utf-8"))


def _error_reply(error: Exception) -> dict:
    if isinstance(error, VideoDecodeError):
        return {"status": "error", "type": "VideoDecodeError", "path": error.path, "reason": error.reason}
    return {"status": "error", "type": type(error).__name__, "message": str(error)}


def _raise_remote_error(reply: dict) -> None:
    if reply.get("type") == "VideoDecodeError":
        raise VideoDecodeError(reply["path"], reply["reason"])
    kind = _REMOTE_ERRORS.get(reply.get("type"))
    if kind is not None:
        raise kind(reply.get("message", ""))
    raise RuntimeError(f"the decode process failed: {reply.get('type')}: {reply.get('message')}")


def _worker_main(fd: int, reader_reference: str) -> None:
    """Loop of the decode process: receive a JSON request, decode, send frames as raw bytes or the error back."""
    conn = Connection(fd)
    try:
        _import_reader(reader_reference)
    except Exception:
        pass  # each request that names this reader fails with the import error, reported to the caller
    _send_json(conn, {"status": "ready"})
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        frames = None
        try:
            request = json.loads(payload.decode("utf-8"))
            reader = _import_reader(request["reader"])
            spec = SamplingSpec.from_dict(request["spec"])
            video = _decode(request["source"], spec, request["backend"], reader, float(request["image_fps"]))
            frames = video.frames.contiguous().numpy()
            reply = {
                "status": "ok",
                "shape": list(frames.shape),
                "dtype": str(frames.dtype),
                "indices": [int(i) for i in video.indices],
                "timestamps": [float(t) for t in video.timestamps],
                "duration": float(video.duration),
                "path": video.path,
            }
        except Exception as e:
            frames, reply = None, _error_reply(e)
        try:
            _send_json(conn, reply)
            if frames is not None:
                conn.send_bytes(memoryview(frames.reshape(-1)))
        except (EOFError, OSError):
            return


# The child imports this module by name (not via -m, which would make it __main__) after taking the parent's
# sys.path, so readers in test or user modules import in it as they do in the parent. It enters the `videollm`
# package without running the package's __init__, which imports transformers and the model to register them with the
# Auto classes: a decode process needs neither, and skipping them makes every process start (one per DataLoader
# worker, and again after each timeout) seconds faster (bench/RESULTS.md).
_BOOTSTRAP = (
    "import sys, importlib.util; sys.path[:0] = sys.argv[3:]; "
    "sys.modules['videollm'] = importlib.util.module_from_spec(importlib.util.find_spec('videollm')); "
    "from videollm.data.video import _worker_main; _worker_main(int(sys.argv[1]), sys.argv[2])"
)


def _stop_worker(process: subprocess.Popen, conn: Connection, owner_pid: int) -> None:
    conn.close()
    if os.getpid() != owner_pid:
        return
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class FrameReader:
    """Reads videos with a time limit, in a persistent decode process.

    A decode that takes longer than `timeout` seconds kills the process (it is restarted lazily on the next
    call) and raises ``VideoDecodeError(path, 'decoding timed out after Ns')``. A process is needed because
    decord can hang while holding the GIL, which no thread-based timeout can interrupt.

    The decode process is a fresh interpreter started with `subprocess` (spawn semantics: no fork of a process
    that has torch threads, which can deadlock) and talks over a socket pair. Not `multiprocessing`, because
    DataLoader workers are daemonic and `multiprocessing` forbids daemonic processes to have children; a
    subprocess works inside them. It also exits on its own when its parent goes away (end of file on the socket).

    Requests and replies are JSON plus the raw frame bytes (no pickle): the backend travels as the
    ``module:qualname`` of its reader, which the decode process imports.

    The reader pickles without its process, so it can sit in a Dataset sent to DataLoader workers; each copy
    starts its own process on first use. With ``timeout=None`` it decodes in the calling process.
    """

    def __init__(
        self, spec: SamplingSpec, backend: str = "auto", timeout: float | None = 30.0, image_fps: float = 1.0
    ):
        if timeout is not None and (not isinstance(timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"FrameReader: timeout must be a positive number of seconds or None, got {timeout!r}")
        _check_image_fps(image_fps)
        _resolve_backend(backend)
        self.spec = spec
        self.backend = backend
        self.timeout = timeout
        self.image_fps = image_fps
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._finalizer: weakref.finalize | None = None
        self._owner_pid: int | None = None
        self._lock = threading.Lock()

    def __call__(self, source: str | Path | Sequence[str | Path]) -> DecodedVideo:
        """Decode the frames of `source` that the spec selects (see `read_video`), within the time limit."""
        name, reader = _resolve_backend(self.backend)
        if self.timeout is None:
            return _decode(source, self.spec, name, reader, self.image_fps)
        source = str(source) if isinstance(source, (str, Path)) else [str(s) for s in source]
        label = _label(source)
        reference = name if ":" in name else _reader_reference(name, reader)
        request = {
            "source": source,
            "spec": self.spec.to_dict(),
            "backend": name,
            "reader": reference,
            "image_fps": float(self.image_fps),
        }
        with self._lock:
            conn = self._ensure_worker(reference)
            try:
                _send_json(conn, request)
                reply = self._receive(conn, label)
                if reply["status"] == "ok":
                    if reply["dtype"] != "uint8" or len(reply["shape"]) != 4:
                        raise RuntimeError(f"the decode process sent {reply['dtype']} {reply['shape']}, not uint8")
                    frames = torch.empty(reply["shape"], dtype=torch.uint8)
                    self._receive(conn, label, into=frames)
            except (EOFError, OSError):
                code = self._kill_worker()
                raise VideoDecodeError(label, f"the decode process died (exit code {code})") from None
            except BaseException:
                # A time limit, an interrupt (an alarm, Ctrl-C) or a garbled reply: the process may still send this
                # request's answer later, which the next request would take for its own. It is not reused.
                self._kill_worker()
                raise
        if reply["status"] != "ok":
            _raise_remote_error(reply)
        return DecodedVideo(frames, reply["indices"], reply["timestamps"], reply["duration"], reply["path"])

    def _receive(self, conn: Connection, label: str, into: torch.Tensor | None = None) -> dict | None:
        """The next message within the time limit: a JSON reply, or raw frame bytes written into `into`."""
        if not conn.poll(self.timeout):
            self._kill_worker()
            raise VideoDecodeError(label, f"decoding timed out after {self.timeout:g}s")
        if into is None:
            return _recv_json(conn)
        try:
            size = conn.recv_bytes_into(into.view(-1).numpy())
        except BufferTooShort:
            size = -1
        if size != into.numel():
            raise RuntimeError(f"the decode process sent the wrong number of frame bytes (expected {into.numel()})")
        return None

    def _ensure_worker(self, reader_reference: str) -> Connection:
        """The live decode process, started when there is none; it imports the reader's module before it reports
        ready, so the time limit of a request covers decoding, not imports."""
        if self._process is not None and self._owner_pid != os.getpid():
            # A fork (e.g. a DataLoader worker) inherited the parent's process handle and socket: drop our copy of
            # the socket and start our own process, leaving the parent's alone.
            self._finalizer.detach()
            self._conn.close()
            self._process = self._conn = self._finalizer = None
        if self._process is not None and self._process.poll() is None:
            return self._conn
        if self._process is not None:
            self._kill_worker()
        parent_sock, child_sock = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(child_sock.fileno()), reader_reference, *sys.path],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        self._process, self._conn, self._owner_pid = process, conn, os.getpid()
        self._finalizer = weakref.finalize(self, _stop_worker, process, conn, self._owner_pid)
        if not conn.poll(_WORKER_START_TIMEOUT_S):
            self._kill_worker()
            raise RuntimeError(f"the decode process did not start within {_WORKER_START_TIMEOUT_S:g}s")
        try:
            ready = _recv_json(conn)
        except (EOFError, OSError):
            code = self._kill_worker()
            raise RuntimeError(f"the decode process failed to start (exit code {code}); see its error above") from None
        if ready.get("status") != "ready":
            self._kill_worker()
            raise RuntimeError(f"the decode process sent {ready!r} instead of its ready message")
        return conn

    def _kill_worker(self) -> int | None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is None:
            return None
        process.kill()
        code = process.wait()
        conn.close()
        return code

    def close(self) -> None:
        """Stop the decode process (if any); the reader stays usable and starts a new one when called again."""
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()
            self._process = self._conn = self._finalizer = None

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_process", "_conn", "_finalizer", "_lock"):
            state[key] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"FrameReader(spec={self.spec!r}, backend={self.backend!r}, timeout={self.timeout!r}, "
            f"image_fps={self.image_fps!r})"
        )


# ------------------------------------------------------------------------------------------------------ writing

_ENCODER_OPTIONS = {
    # x264's C code paths: with its SIMD paths the same frames sometimes gave different bytes within one process
    # (about 1 in 10 regenerations of a 14-clip synthetic set, with torch loaded; none in 120 with asm=0), and synthetic
    # sets must regenerate byte for byte. Encoding takes 1.5-2.5x longer, fine for the test clips and synthetic data
    # this writes. One thread: for these small clips it encoded faster than x264's automatic thread count.
    "libx264": {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "asm=0"},
    "mpeg4": {},
    "libvpx-vp9": {"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8"},
}
_VFR_TIME_BASE = Fraction(1, 90000)
# MPEG-4 Part 2 codes the time base denominator in 16 bits (at most 65535).
_VFR_TIME_BASE_MPEG4 = Fraction(1, 60000)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 8.0,
    codec: str = "libx264",
    timestamps: Sequence[float] | None = None,
) -> None:
    """Encode RGB frames into a video file (used by the tests and the synthetic-data generator).

    Args:
        path: output file; the container follows the suffix (.mp4, .mkv, .webm, ...). MP4 is written with
            the index first (faststart) so it can be streamed.
        frames: uint8 ``(T, H, W, 3)`` RGB; H and W must be even (yuv420p).
        fps: frame rate of a constant-frame-rate clip (the nominal rate when `timestamps` is given).
        codec: ``"libx264"`` (h264), ``"mpeg4"`` or ``"libvpx-vp9"``; all yuv420p.
        timestamps: presentation time of each frame in seconds, strictly increasing, for a variable-frame-rate
            clip (encoded at 1/90000 s, 1/60000 s for mpeg4; MKV and WebM store them at 1 ms). Read back
            relative to the first frame.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_video: frames must be uint8 (T, H, W, 3) with T > 0, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"write_video: height and width must be even for yuv420p, got {height}x{width}")
    if codec not in _ENCODER_OPTIONS:
        raise ValueError(f"write_video: codec must be one of {sorted(_ENCODER_OPTIONS)}, got {codec!r}")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"write_video: fps must be a positive number, got {fps!r}")
    rate = Fraction(fps).limit_denominator(1001)
    if timestamps is None:
        time_base, pts = 1 / rate, list(range(len(frames)))
    else:
        if len(timestamps) != len(frames):
            raise ValueError(f"write_video: {len(timestamps)} timestamps for {len(frames)} frames")
        time_base = _VFR_TIME_BASE_MPEG4 if codec == "mpeg4" else _VFR_TIME_BASE
        pts = [round(float(t) / time_base) for t in timestamps]
        if pts[0] < 0 or any(b <= a for a, b in zip(pts, pts[1:])):
            raise ValueError(f"write_video: timestamps must be >= 0 and strictly increasing (at {time_base} s)")

    path = Path(path)
    options = {"movflags": "+faststart"} if path.suffix.lower() in {".mp4", ".mov", ".m4v"} else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=rate, options=dict(_ENCODER_OPTIONS[codec]))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = time_base
        if codec == "mpeg4":
            stream.bit_rate = max(1_000_000, 12 * width * height)
        for array, frame_pts in zip(frames, pts):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts, frame.time_base = frame_pts, time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
