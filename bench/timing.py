"""What the benchmarks share: the model-shape flags, the device's name for the results, and round-robin timing (a change
of machine load affects every variant alike)."""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def round_robin(variants: dict[str, Callable[[], None]], device: str, steps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each variant over `steps` rounds, after `warmup` untimed rounds (CUDA synchronised)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(steps + warmup):
        for name, step in variants.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def add_shape_arguments(parser: argparse.ArgumentParser, image_size: int, hidden: int) -> None:
    """The device, frame and model-size flags every benchmark takes (defaults differ per benchmark)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=8, help="frames per video")
    parser.add_argument("--image_size", type=int, default=image_size, help="frame side; patch 8: (side/8)^2 tokens a frame")
    parser.add_argument("--llm_hidden", type=int, default=hidden)
    parser.add_argument("--llm_layers", type=int, default=2)
    parser.add_argument("--vision_hidden", type=int, default=hidden)
    parser.add_argument("--vision_layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None, help="also write the results here as JSON")
