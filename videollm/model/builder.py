"""Builders: a videollm model and its processor from named parts, configs, or a saved checkpoint.

`build_model_and_processor` is the one entry point recipes use. A part given as a string is a hub name or a local
directory loaded with its pretrained weights; a part given as a config is built with random weights (tests, demo).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from videollm.data.processor import CLIP_MEAN_STD, SIGLIP_MEAN_STD, VideoLLMProcessor
from videollm.data.sampling import SamplingSpec
from videollm.data.tokenizer import VIDEO_TOKEN
from videollm.model.configuration import VideoLLMConfig
from videollm.model.modeling import VideoLLMForConditionalGeneration
from videollm.model.projectors import build_projector

logger = logging.getLogger(__name__)


def resolve_vision_config(vision: str | PretrainedConfig, trust_remote_code: bool = False) -> PretrainedConfig:
    """The vision-tower config of a name/path or config; a full CLIP/SigLIP model contributes its vision half."""
    config = AutoConfig.from_pretrained(vision, trust_remote_code=trust_remote_code) if isinstance(vision, (str, Path)) else vision
    return getattr(config, "vision_config", None) or config


def drop_unused_vision_layers(config: PretrainedConfig, feature_layer: int) -> tuple[PretrainedConfig, int]:
    """The tower config cut after the layer whose output the projector reads, and that layer's index in the cut tower.

    LLaVA-style models read a layer before the last (`vision_feature_layer` -2 by default), so the layers after it
    (and SigLIP's pooling head on top) would run on every frame for nothing: a quarter of a 4-layer tower's forward,
    one 27th of SigLIP-so400m's. Cut from the config, they are never built, loaded or run; the kept layers load their
    pretrained weights unchanged, so the features are the same (LLaVA-NeXT deletes them from its SigLIP tower for the
    same reason). A config without `num_hidden_layers`, or a layer index that keeps every layer, is returned as is.
    """
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):
        return config, feature_layer
    keep = feature_layer if feature_layer >= 0 else layers + 1 + feature_layer  # hidden_states[0]: the embeddings
    if not 1 <= keep < layers:
        return config, feature_layer
    logger.info(
        "vision tower: the projector reads layer %d of %d, so the %d after it are not built (a pretrained "
        "checkpoint's load report lists their weights as unexpected)", keep, layers, layers - keep,
    )  # fmt: skip
    config = copy.deepcopy(config)
    config.num_hidden_layers = keep
    if hasattr(config, "vision_use_head"):
        config.vision_use_head = False
    return config, -1


def _load_vision_tower(
    vision: str | PretrainedConfig, config: PretrainedConfig, dtype: torch.dtype | None, trust_remote_code: bool
):
    if not isinstance(vision, (str, Path)):
        full_config = resolve_vision_config(vision)
        full = AutoModel.from_config(full_config, dtype=dtype)
        if getattr(full_config, "num_hidden_layers", None) == getattr(config, "num_hidden_layers", None):
            return full
        # A random tower with layers cut is the first layers of a random full tower: a seeded build gives the same
        # weights, features and (the random stream moving on as before) the same LLM as one that kept every layer.
        with torch.random.fork_rng(devices=[]):
            tower = AutoModel.from_config(config, dtype=dtype)
        with _gathered_weights(full, tower):
            missing = tower.load_state_dict(full.state_dict(), strict=False).missing_keys
        if missing:
            raise RuntimeError(f"vision tower: cutting layers left weights without a value: {missing}")
        return tower
    tower_class = MODEL_MAPPING[type(config)]
    return tower_class.from_pretrained(
        str(vision), config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def _gathered_weights(*modules: nn.Module) -> contextlib.AbstractContextManager:
    """Under DeepSpeed ZeRO-3, where every rank holds a slice of each weight, the whole weights of `modules` for the
    block, with rank 0's changes kept when it ends; elsewhere the weights are whole already."""
    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for module in modules for p in module.parameters()], modifier_rank=0)


def _vision_mean_std(vision: str | PretrainedConfig, config: PretrainedConfig) -> tuple[list[float], list[float]]:
    if isinstance(vision, (str, Path)) and (Path(vision) / "preprocessor_config.json").is_file():
        values = json.loads((Path(vision) / "preprocessor_config.json").read_text())
        if "image_mean" in values and "image_std" in values:
            return values["image_mean"], values["image_std"]
    mean, std = CLIP_MEAN_STD if config.model_type.startswith("clip") else SIGLIP_MEAN_STD
    return list(mean), list(std)


def resize_vocab_deterministically(model: VideoLLMForConditionalGeneration, vocab_size: int) -> None:
    """Grow the embeddings to `vocab_size`, new rows set to the mean of the old ones.

    transformers samples new rows at random; a mean keeps a LoRA checkpoint's rebuilt base bit-identical to the
    base it was trained on.
    """
    old_size = model.get_input_embeddings().num_embeddings  # the weight's own shape is empty under ZeRO-3
    if vocab_size <= old_size:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with _gathered_weights(model.get_input_embeddings(), model.get_output_embeddings()), torch.no_grad():
        for weights in {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            weights[old_size:] = weights[:old_size].mean(0, keepdim=True)
    model.config.text_config.vocab_size = vocab_size


def build_model_and_processor(
    vision: str | PretrainedConfig,
    text: str | PretrainedConfig,
    tokenizer: Any = None,
    projector_type: str = "mlp",
    sampling: SamplingSpec | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    processor_kwargs: dict | None = None,
    trust_remote_code: bool = False,
    **config_kwargs: Any,
) -> tuple[VideoLLMForConditionalGeneration, VideoLLMProcessor]:
    """Assemble a new video LLM from a vision tower, a projector (fresh) and a causal LM.

    `tokenizer` is a tokenizer object or name/path (default: the LLM's). The video placeholder is added to it when
    missing and the embeddings grow to match. `sampling.frame_size` is set to the vision tower's input size. Weights
    load from safetensors only; code shipped with a hub repository runs only with `trust_remote_code`.
    """
    vision_config, feature_layer = drop_unused_vision_layers(
        resolve_vision_config(vision, trust_remote_code),
        config_kwargs.pop("vision_feature_layer", VideoLLMConfig.vision_feature_layer),
    )
    text_config = AutoConfig.from_pretrained(text, trust_remote_code=trust_remote_code) if isinstance(text, (str, Path)) else text
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        source = tokenizer or text
        if not isinstance(source, (str, Path)):
            raise ValueError("tokenizer: required when the LLM is given as a config (no checkpoint to take it from)")
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    if VIDEO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    config = VideoLLMConfig(
        vision_config=vision_config,
        text_config=text_config,
        projector_type=projector_type,
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_name_or_path=_source(vision),
        text_name_or_path=_source(text),
        vision_feature_layer=feature_layer,
        **config_kwargs,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = _assemble(config, vision, text, dtype, trust_remote_code)
    resize_vocab_deterministically(model, len(tokenizer))

    mean, std = _vision_mean_std(vision, vision_config)
    sampling = sampling or SamplingSpec()
    sampling_dict = {**sampling.to_dict(), "frame_size": config.frame_size}
    processor = VideoLLMProcessor(
        tokenizer,
        sampling=sampling_dict,
        token_layout=config.visual_token_layout().to_dict(),
        image_mean=mean,
        image_std=std,
        video_token=VIDEO_TOKEN,
        **(processor_kwargs or {}),
    )
    return model, processor


def _source(part: str | PretrainedConfig) -> str | None:
    """Where a pretrained part came from, as a LoRA checkpoint's config records it to rebuild its base: a local
    directory as an absolute path (so the checkpoint loads from any working directory), a hub name as given."""
    if not isinstance(part, (str, Path)):
        return None
    return str(Path(part).resolve()) if Path(part).is_dir() else str(part)


def _assemble(
    config: VideoLLMConfig,
    vision: str | PretrainedConfig,
    text: str | PretrainedConfig,
    dtype: torch.dtype | None,
    trust_remote_code: bool = False,
) -> VideoLLMForConditionalGeneration:
    """The model around its parts: each part is built or loaded once, in `dtype`.

    The parts are passed to the model's constructor rather than slotted into a model built from the config: under
    DeepSpeed ZeRO-3 a model built from the config partitions and initialises every part first, and the tower and LLM
    loaded here are already partitioned by their own `from_pretrained`.
    """
    vision_tower = _load_vision_tower(vision, config.vision_config, dtype, trust_remote_code)
    if isinstance(text, (str, Path)):
        # The checkpoint's embeddings have its own vocabulary size; the caller grows them to the tokenizer's.
        checkpoint_config = copy.deepcopy(config.text_config)
        remote = {"trust_remote_code": trust_remote_code}
        checkpoint_config.vocab_size = AutoConfig.from_pretrained(str(text), **remote).vocab_size
        llm = AutoModelForCausalLM.from_pretrained(
            str(text), config=checkpoint_config, dtype=dtype, use_safetensors=True, **remote
        )
    else:
        llm = AutoModelForCausalLM.from_config(config.text_config, dtype=dtype)
    # Each part resolved its attention kernel (the one asked for, else its default) on its own config; the model's
    # config, which the LLM runs with from here on, records the same.
    config._attn_implementation = {
        "vision_config": vision_tower.config._attn_implementation,
        "text_config": llm.config._attn_implementation,
    }
    llm.config = config.text_config
    getattr(llm, llm.base_model_prefix).config = config.text_config
    projector = build_projector(config)
    if dtype is not None:
        projector.to(dtype)
    # Every part is given, so nothing new is allocated; on the meta device `post_init` also leaves the weights as
    # built (elsewhere it would initialise them again, the projector's included).
    with torch.device("meta"):
        model = VideoLLMForConditionalGeneration(
            config,
            vision_tower=vision_tower,
            projector=projector,
            language_model=getattr(llm, llm.base_model_prefix),
            lm_head=llm.get_output_embeddings(),
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
    return model
