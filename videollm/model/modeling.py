"""The videollm model: a transformers vision tower, a projector and a transformers causal LM, in the HF VLM layout.

Layout (the one TRL's trainers expect): `VideoLLMForConditionalGeneration.model` is a `VideoLLMModel` that returns
`.last_hidden_state`, and `lm_head` sits on top, so TRL can call `model.model(**batch)` and apply the LM head itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from videollm.model.attention import PACKED_BOUNDS, PACKED_SDPA, sample_bounds  # importing registers sdpa_packed
from videollm.model.configuration import VideoLLMConfig
from videollm.model.loss import causal_lm_loss
from videollm.model.projectors import build_projector

# transformers 5.24 renamed the KV cache's forward argument and output field from `past_key_values` to `cache` (the old
# name still works, with a warning, until 5.40). The model accepts both and speaks the installed version's name.
KV_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class VideoLLMModelOutput(BaseModelOutputWithPast):
    video_features: list[torch.Tensor] | None = None


class VideoLLMPreTrainedModel(PreTrainedModel):
    config: VideoLLMConfig
    config_class = VideoLLMConfig
    base_model_prefix = "model"
    input_modalities = ("video", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _no_split_modules = []
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class VideoLLMModel(VideoLLMPreTrainedModel):
    """Vision tower + projector + decoder-only LM body; returns hidden states, not logits."""

    def __init__(
        self,
        config: VideoLLMConfig,
        vision_tower: nn.Module | None = None,
        projector: nn.Module | None = None,
        language_model: nn.Module | None = None,
    ):
        """Parts not given are built from `config` (how `from_pretrained` creates the model before loading weights);
        the builder passes the parts it loaded from pretrained checkpoints."""
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.projector = projector if projector is not None else build_projector(config)
        self.language_model = language_model if language_model is not None else AutoModel.from_config(config.text_config)
        # Where this run's visual input enters the vision path: None (pixels: the tower runs), or the level of a
        # feature cache ("tower": the projector runs on cached tower outputs; "projector": neither runs). Set by
        # `use_cached_vision`; the dummy forward of text-only batches follows it.
        self.cached_vision_level: str | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def encode_frames(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Vision-tower features of every frame, `(frames, patches, vision_hidden)`, class token dropped."""
        vision_dtype = next(self.vision_tower.parameters()).dtype
        vision_out = self.vision_tower(pixel_values=pixel_values_videos.to(vision_dtype), output_hidden_states=True)
        features = vision_out.hidden_states[self.config.vision_feature_layer]
        return features[:, 1:] if self.config.vision_has_cls_token else features

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor | None,
        video_num_frames: torch.Tensor | list[int],
        frame_features: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Encode all frames of all videos in one vision pass; return one (tokens, hidden) tensor per video.

        `frame_features` (from `encode_frames`) skips the vision tower: preference training with a frozen tower and
        a trained projector encodes frames once and projects them for the policy and the reference.
        """
        num_frames = [int(n) for n in video_num_frames]
        if frame_features is None:
            if sum(num_frames) != pixel_values_videos.shape[0]:
                raise ValueError(
                    f"video_num_frames sums to {sum(num_frames)} but pixel_values_videos holds "
                    f"{pixel_values_videos.shape[0]} frames"
                )
            frame_features = self.encode_frames(pixel_values_videos)
        projector_dtype = next(self.projector.parameters()).dtype
        return self.projector(frame_features.to(projector_dtype), num_frames)

    def blank_frame(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """One blank frame in the form this run's video batches take (`like` gives the device): its pixels
        (`pixel_values_videos`), its tower features (`video_frame_features`) in a run fed by a tower-level feature
        cache, or nothing in a run fed by a projector-level cache, where no vision module ever runs."""
        if self.cached_vision_level == "projector":
            return {}
        if self.cached_vision_level == "tower":
            grid = self.config.visual_token_layout().patch_grid
            return {"video_frame_features": like.new_zeros(1, grid * grid, self.config.vision_config.hidden_size)}
        size = self.config.frame_size
        return {"pixel_values_videos": like.new_zeros(1, 3, size, size)}

    def _dummy_video_features(self, like: torch.Tensor) -> torch.Tensor:
        """Run the vision path on one blank frame so every rank touches the same parameters (ZeRO-3/FSDP
        gather them collectively; a rank that skipped the tower would hang the others).

        Only the part that video batches of this run use (`blank_frame`): in a run fed by a feature cache the other
        ranks never run the tower (tower level) or the whole vision path (projector level), so a text-only batch must
        not either.
        """
        blank = self.blank_frame(like)
        if not blank:
            return like.new_zeros(())
        pixels, features = blank.get("pixel_values_videos"), blank.get("video_frame_features")
        return torch.cat(self.get_video_features(pixels, [1], frame_features=features)).sum()

    def _needs_dummy_video(self, cache: Cache | None) -> bool:
        """Whether a forward without video must still run the vision path, as the forwards of other ranks may.

        With gradients (training), always: DDP and ZeRO need a gradient for every trainable weight on every rank.
        Without gradients (evaluation, reference passes), only when the vision weights are sharded (ZeRO-3 params
        carry `ds_id`, FSDP2 params are DTensors): every forward gathers them collectively. Decoding steps after the
        prefill never see video on any rank, so they skip it.
        """
        if self.training and torch.is_grad_enabled():
            return True
        weight = next(self.vision_tower.parameters())
        if not (hasattr(weight, "ds_id") or isinstance(weight, DTensor)):
            return False
        return cache is None or cache.get_seq_length() == 0

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_num_frames: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> VideoLLMModelOutput:
        """`video_embeds` are projector outputs computed beforehand (all visual tokens of the batch in order, `(N, D)`):
        preference training encodes each video once and reuses the result for chosen, rejected and the reference."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if video_embeds is not None and pixel_values_videos is not None:
            raise ValueError("pass pixel_values_videos or precomputed video_embeds, not both")
        if cache is None:
            cache = past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        video_features = None
        if video_embeds is not None:
            video_features = [video_embeds]
            inputs_embeds = self._scatter_video_features(input_ids, inputs_embeds, video_features)
        elif pixel_values_videos is not None:
            if video_num_frames is None:
                raise ValueError("pixel_values_videos needs video_num_frames (frames per video, in order)")
            video_features = self.get_video_features(pixel_values_videos, video_num_frames)
            inputs_embeds = self._scatter_video_features(input_ids, inputs_embeds, video_features)
        elif self._needs_dummy_video(cache):
            inputs_embeds = inputs_embeds + 0.0 * self._dummy_video_features(inputs_embeds).to(inputs_embeds.dtype)

        if cache is None and self.config.text_config._attn_implementation == PACKED_SDPA:
            # Every layer attends within the same samples: find them once here, not once per layer (a host sync each
            # on a GPU).
            kwargs[PACKED_BOUNDS] = sample_bounds(position_ids) or []
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{KV_CACHE_FIELD: cache},
            **kwargs,
        )
        return VideoLLMModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            **{KV_CACHE_FIELD: getattr(outputs, KV_CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            video_features=video_features,
        )

    def _scatter_video_features(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, video_features: list[torch.Tensor]
    ) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("pixel_values_videos needs input_ids to locate the video placeholder tokens")
        placeholder = input_ids == self.config.video_token_id
        features = torch.cat(video_features).to(inputs_embeds.device, inputs_embeds.dtype)
        if int(placeholder.sum()) != features.shape[0]:
            raise ValueError(
                f"the batch has {int(placeholder.sum())} video placeholder tokens but the projector produced "
                f"{features.shape[0]} visual tokens ({[f.shape[0] for f in video_features]} per video); "
                "encode inputs with the processor saved with this model"
            )
        return inputs_embeds.masked_scatter(placeholder.unsqueeze(-1), features)


class VideoLLMForConditionalGeneration(VideoLLMPreTrainedModel, GenerationMixin):
    """The trainable, generating video LLM: `VideoLLMModel` plus the LM head."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: VideoLLMConfig, lm_head: nn.Module | None = None, **parts: nn.Module):
        """`lm_head` and `parts` (`VideoLLMModel`'s `vision_tower`, `projector`, `language_model`) not given are built
        from `config`."""
        super().__init__(config)
        self.model = VideoLLMModel(config, **parts)
        self.lm_head = lm_head if lm_head is not None else nn.Linear(
            config.text_config.hidden_size, config.text_config.vocab_size, bias=False
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def encode_frames(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        return self.model.encode_frames(pixel_values_videos)

    def use_cached_vision(self, level: str | None) -> None:
        """Declare that this run's videos arrive as cached features of `level` ("tower" or "projector", see
        `videollm.data.feature_cache`), or as pixels (None), so text-only batches skip what video batches skip."""
        if level not in (None, "tower", "projector"):
            raise ValueError(f"cached vision level: {level!r} is not one of None | tower | projector")
        self.model.cached_vision_level = level

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor | None,
        video_num_frames: torch.Tensor | list[int],
        frame_features: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        return self.model.get_video_features(pixel_values_videos, video_num_frames, frame_features)

    def visual_tokens(self, video_inputs: dict[str, torch.Tensor], video_num_frames: torch.Tensor | list[int]) -> torch.Tensor:
        """The visual tokens of a batch's videos, all in order, `(N, D)`, from the inputs the processor made of them
        (`VideoLLMProcessor.video_inputs`): frames, cached tower features (the tower is skipped) or cached projector
        outputs (returned as they are). Lets a caller encode once and reuse the tokens (`video_embeds`)."""
        if "video_embeds" in video_inputs:
            return video_inputs["video_embeds"]
        pixels, features = video_inputs.get("pixel_values_videos"), video_inputs.get("video_frame_features")
        return torch.cat(self.model.get_video_features(pixels, video_num_frames, frame_features=features))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_num_frames: torch.Tensor | None = None,
        video_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        video_frame_features: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """In training, a forward with `labels` returns the loss and no logits (see `videollm.model.loss`).

        `video_frame_features` are cached vision-tower outputs (`videollm.data.feature_cache`, `encode_frames` layout):
        the tower is skipped and only the projector runs on them.
        """
        if video_frame_features is not None:
            if video_embeds is not None or pixel_values_videos is not None:
                raise ValueError("pass one of pixel_values_videos, video_embeds or video_frame_features")
            if video_num_frames is None:
                raise ValueError("video_frame_features needs video_num_frames (frames per video, in order)")
            video_embeds = self.visual_tokens({"video_frame_features": video_frame_features}, video_num_frames)
        if labels is not None and use_cache is None:
            # A loss needs no KV cache, and packed rows (position_ids restarting per sample) must not build one: with
            # a cache, transformers' masks stop separating the samples.
            use_cache = False
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache=cache,
            inputs_embeds=inputs_embeds,
            pixel_values_videos=pixel_values_videos,
            video_num_frames=video_num_frames,
            video_embeds=video_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if labels is not None and self.training and isinstance(logits_to_keep, int) and logits_to_keep == 0:
            # Training never materialises full-vocabulary logits: the LM head runs at the label positions only.
            loss = causal_lm_loss(
                hidden_states,
                self.lm_head,
                labels,
                shift_labels=kwargs.get("shift_labels"),
                num_items_in_batch=kwargs.get("num_items_in_batch"),
            )
            return CausalLMOutputWithPast(
                loss=loss,
                logits=None,
                **{KV_CACHE_FIELD: getattr(outputs, KV_CACHE_FIELD)},
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{KV_CACHE_FIELD: getattr(outputs, KV_CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
