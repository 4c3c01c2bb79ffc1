"""Defaults that follow the device: precision, weights dtype, attention, activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from videollm.data.dataset import VideoCollator
from videollm.data.sampling import SamplingSpec
from videollm.model.attention import PACKED_SDPA
from videollm.model.presets import build_tiny_model_and_processor
from videollm.model.trainable import unwrap
from videollm.train.config import DataArguments, ModelArguments, parse_config
from videollm.train.dpo import VideoDPOConfig
from videollm.train.hardware import Hardware, upcast_trainable_parameters
from videollm.train.setup import load_or_build
from videollm.train.sft import VideoSFTConfig

from test_packing import make_video

CPU = Hardware(cuda=False, bf16=False, flash_attn=False)
GPU = Hardware(cuda=True, bf16=True, flash_attn=False)
GPU_FLASH = Hardware(cuda=True, bf16=True, flash_attn=True)
OLD_GPU = Hardware(cuda=True, bf16=False, flash_attn=False)  # a V100: no bf16


@pytest.mark.parametrize(
    ("hardware", "requested", "packing", "expected"),
    [
        (CPU, None, False, "sdpa"),
        (CPU, None, True, PACKED_SDPA),
        (GPU, None, True, PACKED_SDPA),
        (GPU_FLASH, None, False, "flash_attention_2"),
        (GPU_FLASH, None, True, "flash_attention_2"),
        (GPU_FLASH, "sdpa", True, PACKED_SDPA),
        (GPU_FLASH, "eager", False, "eager"),
        (CPU, "flash_attention_2", False, "flash_attention_2"),  # what is asked for is kept, and fails loudly if absent
    ],
)
def test_attention_default(hardware, requested, packing, expected):
    assert hardware.attention(requested, packing) == expected


@pytest.mark.parametrize(
    ("hardware", "bf16", "fp16", "expected"),
    [(CPU, None, False, False), (GPU, None, False, True), (GPU, None, True, False), (OLD_GPU, None, False, False),
     (GPU, False, False, False), (CPU, True, False, True)],
)  # fmt: skip
def test_mixed_precision_default(hardware, bf16, fp16, expected):
    assert hardware.mixed_precision_bf16(bf16, fp16) is expected


def test_weights_dtype_default():
    assert GPU.frozen_weights_dtype(None, bf16_training=True) == torch.bfloat16
    assert GPU.frozen_weights_dtype(None, bf16_training=False) is None
    assert CPU.frozen_weights_dtype(None, bf16_training=True) is None  # CPU bf16 autocast keeps fp32 weights
    assert GPU.frozen_weights_dtype(torch.float16, bf16_training=True) == torch.float16


def test_configs_default_to_fp32_and_no_checkpointing_on_the_cpu(tmp_path):
    """TRL's DPOConfig turns bf16 and gradient checkpointing on everywhere; ours follow the device (a CPU: both off),
    and a value the config sets is kept."""
    sft = VideoSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    dpo = VideoDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    for config in (sft, dpo):
        assert config.bf16 is False
        assert not config.gradient_checkpointing
    (parsed,) = parse_config(
        [VideoDPOConfig], ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "true", "--gradient_checkpointing", "true"]
    )
    assert parsed.bf16 is True
    assert parsed.gradient_checkpointing


def test_configs_turn_bf16_on_where_the_gpu_supports_it(tmp_path, monkeypatch):
    seen = []

    def detect(use_cpu: bool = False) -> Hardware:
        seen.append(use_cpu)
        return GPU

    monkeypatch.setattr(Hardware, "detect", staticmethod(detect))
    # use_cpu: the Trainer itself refuses bf16 on a machine without a GPU; the wiring is what is checked here.
    assert VideoSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").bf16 is True
    assert VideoDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").bf16 is True
    assert seen == [True, True]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny checkpoint to start LoRA from (LoRA needs pretrained frozen parts)."""
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4))
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_bf16_on_a_gpu_stores_frozen_weights_in_bf16_and_trains_fp32(saved_model, tmp_path):
    """The default for bf16 training on a GPU: the tower and the LLM under LoRA in bf16 (half the memory), LoRA and the
    projector in fp32 for the optimizer; a step under bf16 autocast gives fp32 gradients to exactly those."""
    training_args = VideoSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to="none")
    model_args = ModelArguments(model_name_or_path=str(saved_model), tune_llm="lora", tune_projector="full", lora_r=4)
    model, processor = load_or_build(model_args, DataArguments(), seed=0, training_args=training_args, hardware=GPU)
    base = unwrap(model)
    assert {p.dtype for p in base.model.vision_tower.parameters()} == {torch.bfloat16}
    frozen_llm = {p.dtype for n, p in base.model.language_model.named_parameters() if "lora_" not in n}
    assert frozen_llm == {torch.bfloat16}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("projector" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}

    messages = [{"role": "user", "content": "<video>\nWhat moves?"}, {"role": "assistant", "content": "a square"}]
    batch = VideoCollator(processor)([processor.encode(messages, [make_video(4, 0)]).as_features()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_explicit_model_dtype_is_kept_for_every_weight(saved_model, tmp_path):
    model_args = ModelArguments(model_name_or_path=str(saved_model), tune_llm="lora", model_dtype="bfloat16", lora_r=4)
    model, _ = load_or_build(model_args, DataArguments(), seed=0, hardware=CPU)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}


def test_fp32_training_keeps_fp32_weights(saved_model, tmp_path):
    training_args = VideoSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model_args = ModelArguments(model_name_or_path=str(saved_model), tune_llm="lora", lora_r=4)
    model, _ = load_or_build(model_args, DataArguments(), seed=0, training_args=training_args, hardware=GPU)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(("requested", "packing", "text", "vision"), [("eager", False, "eager", "eager"), (None, True, PACKED_SDPA, "sdpa")])
def test_attention_reaches_a_loaded_checkpoint(saved_model, requested, packing, text, vision):
    """`attn_implementation` applies to a checkpoint too, not only to a model built from parts."""
    model_args = ModelArguments(model_name_or_path=str(saved_model), tune_llm="full", attn_implementation=requested)
    model, _ = load_or_build(model_args, DataArguments(packing=packing), hardware=CPU)
    assert model.config.text_config._attn_implementation == text
    assert model.config.vision_config._attn_implementation == vision
    assert model.model.language_model.config._attn_implementation == text


def test_upcast_casts_only_what_trains():
    layers = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    layers[0].requires_grad_(False)
    assert upcast_trainable_parameters(layers) == 2
    assert [p.dtype for p in layers.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2
