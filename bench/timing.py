"""Timing shared by the benchmarks: variants run round-robin, so a change of machine load affects all of them alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


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
