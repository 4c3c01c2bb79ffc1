"""Named model configurations: tiny ones that build on a CPU in a second (tests, the demo) and the real recipe."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig


def tiny_vision_config(family: str = "siglip", image_size: int = 32, patch_size: int = 8) -> PreTrainedConfig:
    """A 2-layer, 64-wide SigLIP or CLIP vision tower."""
    model_type = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}[family]
    return AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


def tiny_text_config(vocab_size: int, family: str = "qwen2") -> PreTrainedConfig:
    """A 2-layer, 64-wide decoder-only LM (qwen2, qwen3 or llama).

    Weights start at std 0.1 (about width^-1/2) instead of transformers' 0.02, a scale meant for 4096-wide models: at
    width 64 that leaves the LM nearly deaf to its inputs for hundreds of steps.
    """
    return AutoConfig.for_model(
        family,
        initializer_range=0.1,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def build_tiny_model_and_processor(
    projector_type: str = "mlp",
    vision_family: str = "siglip",
    text_family: str = "qwen2",
    sampling=None,
    image_size: int = 32,
    patch_size: int = 8,
    **config_kwargs,
):
    """A randomly initialised tiny video LLM with the local tiny tokenizer (tests, the demo)."""
    from videollm.data.tokenizer import build_tiny_tokenizer
    from videollm.model.builder import build_model_and_processor

    tokenizer = build_tiny_tokenizer()
    config_kwargs.setdefault("pool_output_size", [4, 2, 2])
    config_kwargs.setdefault("num_query_tokens", 8)
    return build_model_and_processor(
        tiny_vision_config(vision_family, image_size=image_size, patch_size=patch_size),
        tiny_text_config(len(tokenizer), text_family),
        tokenizer=tokenizer,
        projector_type=projector_type,
        sampling=sampling,
        **config_kwargs,
    )
