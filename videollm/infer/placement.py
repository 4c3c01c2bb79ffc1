"""Where and in which dtype a checkpoint runs for inference: the chat CLI, batch generation, the server, the demo, the
evaluator and `data_tools/make_preferences.py` all take `--device` and `--dtype` from here.

Left at `auto`, a checkpoint runs on the GPU when torch sees one, in bf16 where the GPU supports it (fp32 on older
GPUs), and on the CPU in fp32, which gives the same numbers on every CPU; the same defaults as training
(`videollm.train.hardware`). transformers alone would load on the CPU, in the dtype of the checkpoint's config.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from videollm.data.processor import VideoLLMProcessor
from videollm.model.checkpoint import load_model
from videollm.train.hardware import Hardware

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class PlacementArguments:
    """The device and dtype of an inference front end."""

    device: str = field(
        default="auto", metadata={"help": "auto (the GPU if torch sees one, else the CPU) | cpu | cuda | cuda:N"}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on a GPU that supports it, else fp32) | float32 | bfloat16 | float16",
                  "choices": DTYPES},  # fmt: skip
    )

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        """The device and dtype to load in; ValueError naming the flag for a device this machine does not have."""
        name = self.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise ValueError(f"--device: {self.device!r} is not a device torch knows ({error})") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError(f"--device: {self.device} asked for, but torch {torch.__version__} sees no GPU")
            if device.index is not None and device.index >= count:
                raise ValueError(f"--device: {self.device} asked for, but torch sees {count} CUDA device(s)")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.dtype != "auto":
            return device, getattr(torch, self.dtype)
        bf16 = device.type == "cuda" and Hardware.detect().mixed_precision_bf16(None, fp16=False)
        return device, torch.bfloat16 if bf16 else torch.float32

    def resolve_or_exit(self) -> tuple[torch.device, torch.dtype]:
        """`resolve` for a front end's `main`: a bad flag ends the program with one line that names it."""
        try:
            return self.resolve()
        except ValueError as error:
            sys.exit(f"error: {error}")


def load_for_inference(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, VideoLLMProcessor]:
    """A checkpoint (full, merged or LoRA adapter, merged here for speed) in eval mode on `device`, in `dtype`
    (None: as saved)."""
    model, processor = load_model(path, dtype=dtype, merge=True)
    return model.to(device), processor
