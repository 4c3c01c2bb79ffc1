"""From recipe config to a ready-to-train model and processor: the part every recipe shares."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments, set_seed

from videollm.data.feature_cache import FeatureCacheError
from videollm.data.processor import VideoLLMProcessor
from videollm.data.robust import BadSampleError, BadSampleLimitExceeded, failure_message
from videollm.data.sampling import SamplingSpec
from videollm.model.attention import PACKED_SDPA
from videollm.model.builder import build_model_and_processor
from videollm.model.checkpoint import is_adapter_checkpoint, load_model
from videollm.model.presets import build_tiny_model_and_processor
from videollm.model.trainable import apply_policy_to_adapter, apply_trainable_policy, unwrap
from videollm.train.config import DataArguments, ModelArguments
from videollm.train.guards import NonFiniteTrainingError
from videollm.train.hardware import Hardware, out_of_memory_advice, upcast_trainable_parameters

logger = logging.getLogger(__name__)
DEFAULT_SAMPLING = SamplingSpec(num_frames=8)


def load_or_build(
    model_args: ModelArguments,
    data_args: DataArguments,
    seed: int | None = None,
    training_args: TrainingArguments | None = None,
    hardware: Hardware | None = None,
) -> tuple[nn.Module, VideoLLMProcessor]:
    """Build a new model (tiny, or from a vision tower + an LLM) or load a checkpoint, then apply the trainable policy.

    A checkpoint keeps its saved sampling spec unless the data keys ask for another one. With `seed`, new weights
    (a tiny model, a new projector, LoRA) are drawn from it, so the same config builds the same model in every process
    that builds it: the recipe, its other ranks, and `data_tools/cache_features.py`, whose cache is keyed by the weights.
    Unset `model_dtype` and `attn_implementation` follow `hardware` (default: the device `training_args` trains on) and
    the run's precision, as `videollm.train.hardware` describes; every parameter that trains is then kept in fp32.
    """
    if seed is not None:
        set_seed(seed)
    hardware = hardware or Hardware.detect(use_cpu=bool(getattr(training_args, "use_cpu", False)))
    dtype = hardware.frozen_weights_dtype(model_args.torch_dtype(), bf16_training=bool(getattr(training_args, "bf16", False)))
    requested = data_args.sampling_spec()
    architecture = {
        "projector_type": model_args.projector_type,
        "pool_output_size": model_args.pool_output_size,
        "num_query_tokens": model_args.num_query_tokens,
        "vision_feature_layer": model_args.vision_feature_layer,
        "frame_embeddings": model_args.frame_embeddings,
    }
    continue_adapter = False
    if model_args.tiny:
        model, processor = build_tiny_model_and_processor(
            sampling=requested or DEFAULT_SAMPLING, image_size=model_args.tiny_image_size, dtype=dtype, **architecture
        )
    elif model_args.model_name_or_path:
        continue_adapter = is_adapter_checkpoint(model_args.model_name_or_path) and model_args.tune_llm == "lora"
        model, processor = load_model(
            model_args.model_name_or_path, dtype=dtype, trainable=continue_adapter, merge=not continue_adapter
        )
        for key, value in _ignored_architecture_keys(architecture, unwrap(model).config).items():
            logger.warning("%s: %s is ignored: the checkpoint is loaded as it was built (%s)", key, value[0], value[1])
        if requested is not None and requested != processor.spec:
            logger.warning("sampling spec %s replaces the checkpoint's %s", requested, processor.spec)
            processor.sampling = {**requested.to_dict(), "frame_size": processor.spec.frame_size}
    else:
        model, processor = build_model_and_processor(
            model_args.vision_name_or_path,
            model_args.llm_name_or_path,
            tokenizer=model_args.tokenizer_name_or_path,
            sampling=requested or DEFAULT_SAMPLING,
            dtype=dtype,
            **architecture,
        )
    for key, value in data_args.processor_overrides().items():
        setattr(processor, key, value)
    text_attention = hardware.attention(model_args.attn_implementation, data_args.packing)
    # sdpa_packed is for packed LLM rows; the tower attends within one frame and runs plain sdpa.
    vision_attention = "sdpa" if text_attention == PACKED_SDPA else text_attention
    model.set_attn_implementation({"vision_config": vision_attention, "text_config": text_attention})
    if continue_adapter:
        model = apply_policy_to_adapter(model, model_args.policy())
    else:
        model = apply_trainable_policy(model, model_args.policy())
    if model_args.model_dtype is None:
        upcast_trainable_parameters(model)
    return model, processor


def _ignored_architecture_keys(architecture: dict[str, Any], config: Any) -> dict[str, tuple[Any, Any]]:
    """Architecture keys set to something other than their default and other than the loaded checkpoint's value, with
    (asked, kept): a checkpoint is never rebuilt, so such a key does nothing, which the user should hear about."""
    defaults = {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(ModelArguments)
    }
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    ignored = {}
    for key, value in architecture.items():
        asked, kept = plain(value), plain(getattr(config, key, None))
        if asked != plain(defaults[key]) and asked != kept:
            ignored[key] = (asked, kept)
    return ignored


def run_summary(trainer: Trainer) -> str:
    """One line per rank that says how the run was distributed and how far it got (visible in multi-process logs)."""
    args = trainer.args
    backend = "ddp" if args.world_size > 1 else "single process"
    if trainer.is_deepspeed_enabled:
        backend = f"deepspeed zero_stage={trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    elif trainer.is_fsdp_enabled:
        backend = "fsdp"
    return (
        f"rank {args.process_index} of {args.world_size} finished after {trainer.state.global_step} steps "
        f"({backend}, device {args.device})"
    )


@contextlib.contextmanager
def training_failures_as_errors(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> Iterator[None]:
    """Stop the recipe with one `error: ...` line (exit code 1) instead of a traceback when training meets a failure
    of the run rather than of the code: steps that stay non-finite, too many unreadable videos, a feature cache that
    does not match the run, or a step that does not fit in accelerator memory (with what to change in the config)."""
    try:
        yield
    except NonFiniteTrainingError as error:
        sys.exit(f"error: {error}")
    except (BadSampleError, BadSampleLimitExceeded) as error:
        sys.exit(f"error: {failure_message(error)}")
    except FeatureCacheError as error:
        sys.exit(f"error: {error}")
    except torch.OutOfMemoryError as error:
        advice = out_of_memory_advice(
            gradient_checkpointing=bool(training_args.gradient_checkpointing),
            batch_size=training_args.per_device_train_batch_size,
            accumulation_steps=training_args.gradient_accumulation_steps,
            tower_frozen=model_args.tune_vision == "frozen",
            feature_cache=data_args.feature_cache_dir is not None,
        )
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
        sys.exit("error: a training step ran out of accelerator memory (" + first_line + "); try, in this order:\n"
                 + "\n".join(f"  - {line}" for line in advice))  # fmt: skip
