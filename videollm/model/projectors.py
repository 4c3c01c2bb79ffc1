"""Projectors: frame features from the vision tower -> visual tokens in the LLM's embedding space.

Each projector type has one module and one entry in `VisualTokenLayout.count`, the single place that says how many
tokens a video becomes. The processor holds the same layout, so placeholder expansion and the model cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from videollm.model.configuration import VideoLLMConfig


@dataclass(frozen=True)
class VisualTokenLayout:
    """How a video of `num_frames` frames maps to visual tokens, for a given projector and patch grid."""

    projector_type: str
    patch_grid: int
    pool_output_size: tuple[int, int, int] = (16, 12, 12)
    num_query_tokens: int = 32

    def count(self, num_frames: int) -> int:
        """Number of visual tokens a video with `num_frames` frames becomes."""
        if num_frames < 1:
            raise ValueError(f"a video needs at least one frame, got {num_frames}")
        if self.projector_type == "mlp":
            return num_frames * self.patch_grid**2
        if self.projector_type == "pool":
            frames, height, width = self.pool_output_size
            return min(num_frames, frames) * min(height, self.patch_grid) * min(width, self.patch_grid)
        if self.projector_type == "qformer":
            return self.num_query_tokens
        if self.projector_type == "stc":
            return math.ceil(num_frames / 2) * math.ceil(self.patch_grid / 2) ** 2
        raise ValueError(f"unknown projector_type {self.projector_type!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> VisualTokenLayout:
        values = dict(values)
        values["pool_output_size"] = tuple(values.get("pool_output_size", (16, 12, 12)))
        return cls(**values)


class FrameEmbedding(nn.Module):
    """Learned embedding of each frame's index in its clip, added to that frame's patch features.

    Image-trained towers see frames independently, so without it the only trace of frame order is the visual
    tokens' position in the LLM sequence. Added before the projector's non-linearity, it lets the projector mix
    "where" with "when", which is what motion questions need (Video-LLaMA's frame position embeddings, applied to
    every projector type here).
    """

    def __init__(self, max_frames: int, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(max_frames, hidden)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def index(self, num_frames: list[int], device: torch.device) -> torch.Tensor:
        """Frame index within its own clip for every frame of the batch (clips concatenated)."""
        limit = self.embedding.num_embeddings
        if max(num_frames) > limit:
            raise ValueError(f"a clip has {max(num_frames)} frames but the model supports at most {limit} (max_frames)")
        return torch.cat([torch.arange(n, device=device) for n in num_frames])

    def forward(self, features: torch.Tensor, num_frames: list[int]) -> torch.Tensor:
        """features: (sum of frames, patches, hidden) -> the same with each frame's index embedding added."""
        offsets = self.embedding(self.index(num_frames, features.device)).to(features.dtype)
        return features + offsets[:, None, :]


class MLPProjector(nn.Module):
    """LLaVA's two-layer GELU MLP applied to every patch of every frame (after the frame embedding, if any)."""

    def __init__(self, vision_hidden: int, text_hidden: int, max_frames: int | None = None):
        super().__init__()
        self.frame_embedding = FrameEmbedding(max_frames, vision_hidden) if max_frames else None
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))

    def embed_frames(self, features: torch.Tensor, num_frames: list[int]) -> torch.Tensor:
        return features if self.frame_embedding is None else self.frame_embedding(features, num_frames)

    def forward(self, features: torch.Tensor, num_frames: list[int]) -> list[torch.Tensor]:
        """features: (sum of frames, patches, vision_hidden) -> one (tokens, text_hidden) tensor per video."""
        tokens = self.project(self.embed_frames(features, num_frames))
        return [video.flatten(0, 1) for video in tokens.split(num_frames)]


class PoolProjector(MLPProjector):
    """PLLaVA: adaptive average pooling over (time, height, width), then the MLP.

    Pooling before the MLP smooths the high-norm outlier features of single patches and cuts the token count.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, layout: VisualTokenLayout, max_frames: int | None = None):
        super().__init__(vision_hidden, text_hidden, max_frames)
        self.layout = layout

    def forward(self, features: torch.Tensor, num_frames: list[int]) -> list[torch.Tensor]:
        grid = self.layout.patch_grid
        frames_out, height_out, width_out = self.layout.pool_output_size
        outputs = []
        for video in self.embed_frames(features, num_frames).split(num_frames):
            volume = video.reshape(video.shape[0], grid, grid, -1).permute(3, 0, 1, 2)  # (C, T, H, W)
            target = (min(video.shape[0], frames_out), min(height_out, grid), min(width_out, grid))
            pooled = F.adaptive_avg_pool3d(volume, target)
            outputs.append(self.project(pooled.flatten(1).transpose(0, 1)))
        return outputs


class STCProjector(MLPProjector):
    """VideoLLaMA 2's spatial-temporal convolution connector, reduced to its core: a 3x3x3 convolution with stride 2
    over (time, height, width) of the patch grid, then the MLP.

    Each output token sees a patch neighbourhood in consecutive frames, so local motion is a feature of one token
    instead of a relation the LLM must discover across many; the stride also cuts the token count by 8.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, layout: VisualTokenLayout, max_frames: int | None = None):
        super().__init__(vision_hidden, text_hidden, max_frames)
        self.layout = layout
        self.conv = nn.Conv3d(vision_hidden, vision_hidden, kernel_size=3, stride=2, padding=1)
        self.conv_act = nn.GELU()

    def forward(self, features: torch.Tensor, num_frames: list[int]) -> list[torch.Tensor]:
        grid = self.layout.patch_grid
        outputs = []
        for video in self.embed_frames(features, num_frames).split(num_frames):
            volume = video.reshape(video.shape[0], grid, grid, -1).permute(3, 0, 1, 2).unsqueeze(0)  # (1, C, T, H, W)
            mixed = self.conv_act(self.conv(volume))[0]
            outputs.append(self.project(mixed.flatten(1).transpose(0, 1)))
        return outputs


class QFormerProjector(nn.Module):
    """Video-LLaMA style: learned queries cross-attend to all frame features of a clip (with frame position
    embeddings), giving a fixed token budget whatever the frame count, then a linear layer into the LLM."""

    def __init__(self, config: VideoLLMConfig):
        super().__init__()
        from transformers import Blip2QFormerModel

        vision_hidden = config.vision_config.hidden_size
        qformer_config = config.qformer_config
        qformer_config.encoder_hidden_size = vision_hidden
        self.frame_embedding = FrameEmbedding(config.max_frames, vision_hidden)
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_query_tokens, qformer_config.hidden_size) * 0.02)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.linear = nn.Linear(qformer_config.hidden_size, config.text_config.hidden_size)

    def forward(self, features: torch.Tensor, num_frames: list[int]) -> list[torch.Tensor]:
        features = self.frame_embedding(features, num_frames)
        patches, hidden = features.shape[1], features.shape[2]
        longest = max(num_frames)
        memory = features.new_zeros(len(num_frames), longest, patches, hidden)
        mask = torch.zeros(len(num_frames), longest, patches, dtype=torch.long, device=features.device)
        for i, video in enumerate(features.split(num_frames)):
            memory[i, : video.shape[0]] = video
            mask[i, : video.shape[0]] = 1
        queries = self.query_tokens.expand(len(num_frames), -1, -1).to(memory.dtype)
        output = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=memory.flatten(1, 2),
            encoder_attention_mask=mask.flatten(1, 2),
        ).last_hidden_state
        return list(self.linear(output).unbind(0))


def build_projector(config: VideoLLMConfig) -> nn.Module:
    """The projector named by `config.projector_type`."""
    vision_hidden = config.vision_config.hidden_size
    text_hidden = config.text_config.hidden_size
    max_frames = config.max_frames if config.frame_embeddings else None
    if config.projector_type == "mlp":
        return MLPProjector(vision_hidden, text_hidden, max_frames)
    if config.projector_type == "pool":
        return PoolProjector(vision_hidden, text_hidden, config.visual_token_layout(), max_frames)
    if config.projector_type == "stc":
        return STCProjector(vision_hidden, text_hidden, config.visual_token_layout(), max_frames)
    if config.projector_type == "qformer":
        return QFormerProjector(config)
    raise ValueError(f"projector_type: unknown {config.projector_type!r}")
