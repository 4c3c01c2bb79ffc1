"""The configuration of a videollm model: vision tower + projector + language model."""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from videollm.model.projectors import VisualTokenLayout

PROJECTOR_TYPES = ("mlp", "pool", "qformer", "stc")
# Vision towers whose patch sequence starts with a class token; it carries no spatial information and is dropped.
VISION_MODELS_WITH_CLS = ("clip_vision_model",)


class VideoLLMConfig(PreTrainedConfig):
    """Composite config. `vision_config` and `text_config` are any transformers vision / causal-LM configs.

    `vision_name_or_path` / `text_name_or_path` record where pretrained parts came from, so a LoRA checkpoint
    can rebuild its frozen base from them instead of storing it again.
    """

    model_type = "videollm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "qformer_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_2_qformer", optional=True),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    projector_type: Literal["mlp", "pool", "qformer", "stc"] = "mlp"
    vision_feature_layer: int = -2
    # PLLaVA-style pooling target (frames, height, width); frames is a cap: shorter clips keep their frame count.
    pool_output_size: list[int] | tuple[int, int, int] = (16, 12, 12)
    num_query_tokens: int = 32
    max_frames: int = 64
    # Learned frame-index embeddings added to frame features before the projector (always on for the Q-Former).
    frame_embeddings: bool = True
    video_token_id: int | None = None
    vision_name_or_path: str | None = None
    text_name_or_path: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type: {self.projector_type!r} is not one of {', '.join(PROJECTOR_TYPES)}")
        self.pool_output_size = [int(v) for v in self.pool_output_size]
        if len(self.pool_output_size) != 3 or min(self.pool_output_size) < 1:
            raise ValueError(f"pool_output_size: expected 3 positive ints (frames, height, width), got {self.pool_output_size}")
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens: must be a positive number of visual tokens, got {self.num_query_tokens}")
        layers = getattr(self.vision_config, "num_hidden_layers", None)
        if isinstance(layers, int) and not -(layers + 1) <= self.vision_feature_layer <= layers:
            # hidden_states holds the embeddings and then each layer's output: layers + 1 entries
            raise ValueError(
                f"vision_feature_layer: {self.vision_feature_layer} is not a hidden state of the {layers}-layer vision "
                f"tower; choose from {-(layers + 1)} to {layers} (-2 is LLaVA's: the layer before the last)"
            )
        if self.projector_type == "qformer" and self.qformer_config is None:
            from transformers import Blip2QFormerConfig

            self.qformer_config = Blip2QFormerConfig(
                hidden_size=self.vision_config.hidden_size,
                num_hidden_layers=2,
                num_attention_heads=max(1, self.vision_config.hidden_size // 64),
                intermediate_size=4 * self.vision_config.hidden_size,
                encoder_hidden_size=self.vision_config.hidden_size,
            )
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def vision_has_cls_token(self) -> bool:
        return self.vision_config.model_type in VISION_MODELS_WITH_CLS

    @property
    def frame_size(self) -> int:
        """The side of the square frames the vision tower takes."""
        return int(self.vision_config.image_size)

    def visual_token_layout(self) -> VisualTokenLayout:
        """The one description of how many visual tokens a video becomes; shared with the processor."""
        grid = self.frame_size // int(self.vision_config.patch_size)
        return VisualTokenLayout(
            projector_type=self.projector_type,
            patch_grid=grid,
            pool_output_size=tuple(self.pool_output_size),
            num_query_tokens=self.num_query_tokens,
        )
