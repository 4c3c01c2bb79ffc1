"""Defaults that depend on the device a run trains on: precision, attention kernel, activation checkpointing.

A config that leaves `bf16`, `attn_implementation` or `model_dtype` unset gets settings that suit the device, so the
same YAML serves a CPU and a GPU:

- mixed precision: bf16 autocast where the GPU supports bf16, fp32 elsewhere (TRL turns bf16 on everywhere, CPUs
  included). A CPU keeps fp32 by default so that a run gives the same numbers on every CPU; `bf16: true` there runs
  the matmuls on the CPU's bf16 units where it has them (Intel AMX: SFT steps 1.96x
  faster at the 0.5B shapes, bench/RESULTS.md);
- weights: frozen parts (vision tower, the LLM under LoRA) stored in bf16 when training in bf16, which halves their
  memory and spares autocast a cast of every frozen weight in every step, and in fp32 otherwise, whatever dtype the
  checkpoint was saved in; every parameter that trains stays fp32 for the optimizer;
- attention: flash-attention 2 on a GPU when the flash-attn package is installed, else sdpa, and with packing
  `sdpa_packed` (per-sample attention on packed rows, see `videollm.model.attention`);
- activation checkpointing: off unless asked for (TRL turns it on everywhere): it recomputes the forward in the
  backward pass, about a third more compute, which pays only when a step would not fit in memory otherwise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from torch import nn

from videollm.model.attention import PACKED_SDPA


@dataclass(frozen=True)
class Hardware:
    """What the training device offers, as far as the defaults care."""

    cuda: bool
    bf16: bool
    flash_attn: bool

    @classmethod
    def detect(cls, use_cpu: bool = False) -> Hardware:
        """This machine's device; `use_cpu` (the Trainer's key) trains on the CPU even where a GPU is present."""
        cuda = torch.cuda.is_available() and not use_cpu
        return cls(
            cuda=cuda,
            bf16=cuda and torch.cuda.is_bf16_supported(),
            flash_attn=cuda and importlib.util.find_spec("flash_attn") is not None,
        )

    def attention(self, requested: str | None, packing: bool) -> str:
        """The LLM's attention implementation: the configured one, else the fastest this device runs."""
        if requested is None:
            requested = "flash_attention_2" if self.flash_attn else "sdpa"
        if packing and requested == "sdpa":
            return PACKED_SDPA
        return requested

    def mixed_precision_bf16(self, bf16: bool | None, fp16: bool) -> bool:
        """The Trainer's `bf16` key: as configured, else on where this device supports it and fp16 is not asked for."""
        if bf16 is not None:
            return bf16
        return self.bf16 and not fp16

    def frozen_weights_dtype(self, model_dtype: torch.dtype | None, bf16_training: bool) -> torch.dtype:
        """The dtype the model is built or loaded in: as configured, else bf16 for bf16 training (GPU or CPU) and fp32
        otherwise, whatever dtype the checkpoint was stored in (Qwen2.5's is bf16)."""
        if model_dtype is not None:
            return model_dtype
        return torch.bfloat16 if bf16_training else torch.float32


def out_of_memory_advice(
    gradient_checkpointing: bool, batch_size: int, accumulation_steps: int, tower_frozen: bool, feature_cache: bool
) -> list[str]:
    """What to change when a training step does not fit in accelerator memory, for this config, the cheapest in
    speed first; the advice a user would otherwise dig out of a CUDA allocator traceback."""
    advice = []
    if batch_size > 1:
        advice.append(
            f"per_device_train_batch_size: {batch_size // 2} with gradient_accumulation_steps: {accumulation_steps * 2} "
            "(the same batch per optimizer step)"
        )
    if tower_frozen and not feature_cache:
        advice.append("feature_cache_dir (data_tools/cache_features.py): no vision-tower forward during training")
    if not gradient_checkpointing:
        advice.append("gradient_checkpointing: true (recomputes activations in the backward pass: about a third more compute)")
    advice.append("fewer visual tokens per video: num_frames (or fps with max_frames), or a smaller pool_output_size")
    return advice


def upcast_trainable_parameters(model: nn.Module) -> int:
    """Store every parameter that trains in fp32 (the optimizer's master copy under bf16 autocast); returns how many
    were cast. Frozen parameters keep their dtype."""
    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32 and parameter.is_floating_point():
            parameter.data = parameter.data.float()
            cast += 1
    return cast


@dataclass
class DeviceDefaultsArguments:
    """Trainer keys whose defaults follow the device (SFT and DPO configs share them; see the module docstring)."""

    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision; default: on where the GPU supports bf16 (and fp16 is off), else off"},
    )
    # None, not TRL's True: transformers resolves an unset value to off (from 5.24 through `activation_checkpointing`,
    # the new name, so that only a value the config sets draws the rename's deprecation warning).
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "recompute activations in the backward pass (about a third more compute, far less activation "
                  "memory); off by default: turn it on when a step does not fit in memory", "nargs": "?", "const": True},
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.bf16 = Hardware.detect(self.use_cpu).mixed_precision_bf16(self.bf16, self.fp16)
        super().__post_init__()
