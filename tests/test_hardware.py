"""Defaults that follow the device: precision, weights dtype, attention, activation checkpointing."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

from videollm.data.dataset import VideoCollator
from videollm.data.sampling import SamplingSpec
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.model.attention import PACKED_SDPA
from videollm.model.presets import build_tiny_model_and_processor
from videollm.model.trainable import unwrap
from videollm.train.config import DataArguments, ModelArguments, parse_config
from videollm.train.dpo import VideoDPOConfig
from videollm.train.guards import NonFiniteTrainingError
from videollm.train.hardware import Hardware, out_of_memory_advice, upcast_trainable_parameters
from videollm.train.setup import load_or_build, training_failures_as_errors
from videollm.train.sft import VideoSFTConfig, VideoSFTTrainer

from test_packing import features, make_video

CPU = Hardware(cuda=False, bf16=False, flash_attn=False)
GPU = Hardware(cuda=True, bf16=True, flash_attn=False)
GPU_FLASH = Hardware(cuda=True, bf16=True, flash_attn=True)
OLD_GPU = Hardware(cuda=True, bf16=False, flash_attn=False)  # a V100: no bf16
REPO = Path(__file__).resolve().parents[1]


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
    assert GPU.frozen_weights_dtype(None, bf16_training=False) == torch.float32
    assert CPU.frozen_weights_dtype(None, bf16_training=True) == torch.bfloat16  # no per-step cast under autocast
    assert CPU.frozen_weights_dtype(None, bf16_training=False) == torch.float32
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


@pytest.mark.parametrize("hardware", [GPU, CPU], ids=["gpu", "cpu"])
def test_bf16_training_stores_frozen_weights_in_bf16_and_trains_fp32(saved_model, tmp_path, hardware):
    """The default for bf16 training, on a GPU or a CPU: the tower and the LLM under LoRA in bf16 (half the memory, no
    cast per step), LoRA and the projector in fp32 for the optimizer; a step under bf16 autocast gives fp32 gradients to
    exactly those."""
    training_args = VideoSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to="none")
    model_args = ModelArguments(model_name_or_path=str(saved_model), tune_llm="lora", tune_projector="full", lora_r=4)
    model, processor = load_or_build(model_args, DataArguments(), seed=0, training_args=training_args, hardware=hardware)
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


def train_two_steps_with_the_defaults(base: Path, tmp_path: Path, **config) -> None:
    """Two Trainer steps from `base` with the device defaults (and `config` on top): the frozen weights in bf16 when
    training in bf16, the trainable ones in fp32; the loss is finite and only the trainable weights change."""
    from transformers import Trainer

    args = VideoSFTConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, **config,
    )  # fmt: skip
    model_args = ModelArguments(model_name_or_path=str(base), tune_llm="lora", lora_r=4)
    model, processor = load_or_build(model_args, DataArguments(num_frames=4), seed=0, training_args=args)
    frozen_dtype = torch.bfloat16 if args.bf16 else torch.float32
    assert {p.dtype for p in unwrap(model).model.vision_tower.parameters()} == {frozen_dtype}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(model=model, args=args, train_dataset=features(processor), data_collator=VideoCollator(processor))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n].detach().cpu(), v.cpu()) for n, v in trainable.items() if "lora_B" in n)
    assert all(torch.equal(after[n].detach().cpu(), v.cpu()) for n, v in frozen.items())


def test_bf16_trainer_steps_on_the_cpu(saved_model, tmp_path):
    """`bf16: true` on a CPU (the fast path where it has bf16 matmul units): bf16 frozen weights, fp32 trainables."""
    train_two_steps_with_the_defaults(saved_model, tmp_path, use_cpu=True, bf16=True)


def test_explicit_model_dtype_is_kept_for_every_weight(saved_model, tmp_path):
    model_args = ModelArguments(model_name_or_path=str(saved_model), tune_llm="lora", model_dtype="bfloat16", lora_r=4)
    model, _ = load_or_build(model_args, DataArguments(), seed=0, hardware=CPU)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16}


def test_fp32_training_of_a_bf16_checkpoint_loads_it_in_fp32(tmp_path):
    """Real checkpoints are often stored in bf16 (Qwen2.5): fp32 training still gets fp32 frozen weights, not the
    stored dtype that transformers would pick."""
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    training_args = VideoSFTConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none")
    model_args = ModelArguments(model_name_or_path=str(tmp_path / "base"), tune_llm="lora", lora_r=4)
    loaded, _ = load_or_build(model_args, DataArguments(), seed=0, training_args=training_args, hardware=CPU)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


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


def test_out_of_memory_advice_follows_the_config():
    advice = out_of_memory_advice(
        gradient_checkpointing=False, batch_size=4, accumulation_steps=2, tower_frozen=True, feature_cache=False
    )
    assert advice[0] == (
        "per_device_train_batch_size: 2 with gradient_accumulation_steps: 4 (the same batch per optimizer step)"
    )
    assert any(line.startswith("feature_cache_dir") for line in advice)
    assert any(line.startswith("gradient_checkpointing: true") for line in advice)
    assert advice[-1].startswith("fewer visual tokens per video")
    # Nothing it already does: batch 1, cache on, checkpointing on leaves the visual tokens.
    assert out_of_memory_advice(
        gradient_checkpointing=True, batch_size=1, accumulation_steps=8, tower_frozen=True, feature_cache=True
    ) == [advice[-1]]
    # A vision tower that trains cannot be cached: the cache is not suggested then.
    training_tower = out_of_memory_advice(
        gradient_checkpointing=False, batch_size=4, accumulation_steps=2, tower_frozen=False, feature_cache=False
    )
    assert not any(line.startswith("feature_cache_dir") for line in training_tower)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
         "error: a training step ran out of accelerator memory (CUDA out of memory. Tried to allocate 2.00 GiB); try"),
        (NonFiniteTrainingError("5 optimizer steps in a row were not finite"),
         "error: 5 optimizer steps in a row were not finite"),
    ],
)  # fmt: skip
def test_training_failures_become_one_error(tmp_path, error, expected):
    args = VideoSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(SystemExit) as exit_info:
        with training_failures_as_errors(ModelArguments(tiny=True, tune_llm="full"), DataArguments(), args):
            raise error
    assert str(exit_info.value.code).startswith(expected)


def test_other_errors_keep_their_traceback(tmp_path):
    args = VideoSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(KeyError):
        with training_failures_as_errors(ModelArguments(tiny=True, tune_llm="full"), DataArguments(), args):
            raise KeyError("a bug")


def test_sft_recipe_turns_out_of_memory_into_advice(tmp_path, monkeypatch):
    """The SFT recipe as users run it, with the first training step running out of GPU memory: one error line with
    what to change for this config, instead of the allocator's traceback."""
    data = tmp_path / "data"
    generate_dataset(SyntheticConfig(output_dir=str(data), num_train=4, num_eval=1, num_test=1))

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(VideoSFTTrainer, "train", out_of_memory)
    argv = ["recipes/sft.py", "--config", "recipes/configs/sft_tiny.yaml", "--train_file", str(data / "train.jsonl"),
            "--video_root", str(data), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "recipes" / "sft.py"), run_name="__main__")
    message = str(exit_info.value.code)
    assert message.startswith("error: a training step ran out of accelerator memory (CUDA out of memory.")
    assert "per_device_train_batch_size: 8 with gradient_accumulation_steps: 2" in message  # sft_tiny: batch 16
    assert "gradient_checkpointing: true" in message
