"""Decode-speed benchmark of the video backends behind `read_video` (not a test).

Writes its own clips into a temporary folder, then for every clip, sampling and backend measures the median
wall time of `read_video` over ``--runs`` runs, in-process (no timeout) and through a warm `FrameReader` (decoding
in its own process, which adds pickling the frames across a socket). Everything `read_video` does is timed:
the PyAV probe of the timestamps, the backend's decode of the selected frames, the conversion to a tensor. The
probe alone is shown too, since every backend pays it (decord pays it twice: it checks its keyframe numbering).
In-process runs also report CPU time, which a busy shared machine disturbs less than wall time. All backends are
checked to return identical frames.

Usage: ``python bench/bench_decode.py [--runs 10]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch
from timing import device_name

from videollm.data.sampling import SamplingSpec
from videollm.data.video import FrameReader, available_backends, probe_video, read_video, write_video

SPECS = {"8 uniform": SamplingSpec(num_frames=8), "fps=2": SamplingSpec(fps=2.0)}


def make_frames(count: int, size: int) -> np.ndarray:
    """Smooth, moving content (a drifting colour gradient and a square crossing the frame), so that the encoders
    produce realistic P/B-frames rather than the huge frames of random noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frames = np.empty((count, size, size, 3), dtype=np.uint8)
    side = max(4, size // 6)
    for i in range(count):
        phase = i / count
        frames[i, ..., 0] = 255 * ((x + phase) % 1.0)
        frames[i, ..., 1] = 255 * ((y + 2 * phase) % 1.0)
        frames[i, ..., 2] = 128
        top = int((size - side) * (0.5 + 0.5 * np.sin(2 * np.pi * phase)))
        left = int((size - side) * phase)
        frames[i, top : top + side, left : left + side] = (255, 255, 255)
    return frames


def write_open_gop_mpeg4(path: Path, frames: np.ndarray, fps: int) -> None:
    """MPEG-4 Part 2 with 2 B-frames and a keyframe every 12 frames: open GOPs (the common DivX/Xvid layout), where
    decord has to decode from the start instead of seeking (see `_read_decord`)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.codec_context.gop_size = 12
        stream.codec_context.max_b_frames = 2
        stream.bit_rate = max(1_000_000, 12 * frames.shape[1] * frames.shape[2])
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))


def write_clips(folder: Path) -> dict[str, Path]:
    """The benchmark clips, named by what they are."""
    big = make_frames(300, 224)
    clips = {
        "h264 224x224 300f": folder / "h264_224.mp4",
        "mpeg4 224x224 300f": folder / "mpeg4_224.mp4",
        "mpeg4 B-frames 224x224 300f": folder / "mpeg4_bframes_224.mp4",
        "h264 64x64 32f": folder / "h264_64.mp4",
    }
    write_video(clips["h264 224x224 300f"], big, fps=30, codec="libx264")
    write_video(clips["mpeg4 224x224 300f"], big, fps=30, codec="mpeg4")
    write_open_gop_mpeg4(clips["mpeg4 B-frames 224x224 300f"], big, fps=30)
    write_video(clips["h264 64x64 32f"], make_frames(32, 64), fps=8, codec="libx264")
    return clips


def measure(cells: dict[str, Callable[[], object]], runs: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time and median CPU time of this process, in ms, of each cell over `runs` runs.

    One untimed warm-up call each, then the cells take turns run by run, so that a load spike on a shared machine
    hits all of them alike instead of one backend's whole series. CPU time counts every thread of this process
    and is less disturbed by other processes than wall time; it says nothing for work done in a `FrameReader`
    process.
    """
    for fn in cells.values():
        fn()
    wall: dict[str, list[float]] = {key: [] for key in cells}
    cpu: dict[str, list[float]] = {key: [] for key in cells}
    for _ in range(runs):
        for key, fn in cells.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - wall_start)
            cpu[key].append(time.process_time() - cpu_start)
    return (
        {key: 1000 * statistics.median(times) for key, times in wall.items()},
        {key: 1000 * statistics.median(times) for key, times in cpu.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per cell (median reported)")
    parser.add_argument("--json", default=None, help="also write the results here as JSON")
    args = parser.parse_args()
    load_before = _load_average()

    backends = [b for b in available_backends() if b in ("torchcodec", "pyav", "decord")]
    rows = []
    start_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        clips = write_clips(Path(tmp))
        readers = {}
        for backend in backends:
            readers[backend] = {name: FrameReader(spec, backend=backend, timeout=60.0) for name, spec in SPECS.items()}
            begin = time.perf_counter()
            readers[backend]["8 uniform"](clips["h264 64x64 32f"])
            start_s[backend] = time.perf_counter() - begin
        for clip, path in clips.items():
            for name, spec in SPECS.items():
                reference = read_video(path, spec, backend=backends[0])
                for backend in backends:
                    frames = read_video(path, spec, backend=backend).frames
                    if not torch.equal(frames, reference.frames):
                        raise SystemExit(f"{backend} and {backends[0]} return different frames for {clip}, {name}")
                cells: dict[str, Callable[[], object]] = {"probe": partial(probe_video, path)}
                for backend in backends:
                    cells[backend] = partial(read_video, path, spec, backend=backend)
                    cells[f"{backend} FrameReader"] = partial(readers[backend][name], path)
                wall, cpu = measure(cells, args.runs)
                rows.append((clip, f"{name} ({len(reference.indices)} frames)", wall, cpu))
        for by_spec in readers.values():
            for reader in by_spec.values():
                reader.close()

    print(f"CPU: {device_name('cpu')} ({os.cpu_count()} cores), {platform.machine()}; torch {torch.__version__}, "
          f"PyAV {av.__version__}; load average before/after: {load_before} / {_load_average()}")
    print(f"median of {args.runs} runs, ms; every backend returned bit-identical frames\n")
    print("Wall time, in-process (`read_video`, no timeout) and through a warm `FrameReader` (timeout set):\n")
    header = ["clip", "sampling", "probe only", *backends, *(f"{b} FrameReader" for b in backends)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for clip, name, wall, _ in rows:
        keys = ["probe", *backends, *(f"{b} FrameReader" for b in backends)]
        print("| " + " | ".join([clip, name, *(f"{wall[k]:.1f}" for k in keys)]) + " |")
    print("\nCPU time of the process, in-process `read_video`:\n")
    header = ["clip", "sampling", "probe only", *backends]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for clip, name, _, cpu in rows:
        print("| " + " | ".join([clip, name, *(f"{cpu[k]:.1f}" for k in ["probe", *backends])]) + " |")
    print("\nFrameReader process start (first call; imports torch, the decoder and the decoding module, not the "
          "package): " + ", ".join(f"{b} {start_s[b]:.1f} s" for b in backends))
    if args.json:
        cells = [{"clip": clip, "sampling": name, "wall_ms": wall, "cpu_ms": cpu} for clip, name, wall, cpu in rows]
        result = {"runs": args.runs, "cpu": device_name("cpu"), "cores": os.cpu_count(), "cells": cells, "reader_start_s": start_s}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


def _load_average() -> str:
    """The 1-minute load average (how busy the machine was), or '?' where the OS does not say."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
