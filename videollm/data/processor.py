"""The processor: tokenizer + sampling spec + frame preprocessing + chat template + visual-token layout, saved as one.

Every stage (training, generation, chat, evaluation, serving) encodes through this object, and it is saved next
to the weights, so inference samples and expands videos exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import ProcessorMixin

from videollm.data.sampling import SamplingSpec
from videollm.data.video import FEATURE_KEYS, CachedVideo, DecodedVideo, FrameReader, resize_frames
from videollm.model.projectors import VisualTokenLayout

IGNORE_INDEX = -100
SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


class SampleTooLongError(ValueError):
    """A sample whose visual tokens and prompt do not fit in `max_length`; truncation never cuts visual tokens."""


# Per-video model inputs, concatenated along dim 0 in sample order: raw frames, or cached tower / projector outputs.
VIDEO_TENSOR_KEYS = ("pixel_values_videos", *FEATURE_KEYS.values())


@dataclass
class EncodedSample:
    """One tokenised sample: ids with every `<video>` expanded, labels masked to assistant turns, and its videos as
    model inputs (`video_inputs`: frames under `pixel_values_videos`, or cached features, see `VIDEO_TENSOR_KEYS`)."""

    input_ids: list[int]
    labels: list[int]
    video_inputs: dict[str, torch.Tensor]
    video_num_frames: list[int]
    frame_indices: list[list[int]]
    frame_timestamps: list[list[float]]

    def as_features(self) -> dict[str, Any]:
        """The sample as a dataset item: ids, labels, video inputs, `video_num_frames` (what the collators take)."""
        return {
            "input_ids": self.input_ids,
            "labels": self.labels,
            **self.video_inputs,
            "video_num_frames": self.video_num_frames,
        }


def concat_video_tensors(features: Sequence[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
    """Add the samples' video inputs and `video_num_frames` to `batch`, in sample order (shared by the collators)."""
    for key in VIDEO_TENSOR_KEYS:
        tensors = [f[key] for f in features if f.get(key) is not None]
        if tensors:
            batch[key] = torch.cat(tensors)
    if any(key in batch for key in VIDEO_TENSOR_KEYS):
        batch["video_num_frames"] = torch.tensor(
            [n for f in features for n in (f.get("video_num_frames") or [])], dtype=torch.long
        )
    return batch


class VideoLLMProcessor(ProcessorMixin):
    """Turns conversations with videos into model inputs and back.

    Args:
        tokenizer: a fast tokenizer with the video placeholder as a special token and a chat template.
        sampling: the `SamplingSpec` (as a dict) used to pick frames from every video.
        token_layout: the `VisualTokenLayout` (as a dict) of the model this processor belongs to.
        image_mean / image_std: per-channel normalisation of the vision tower.
        video_token: the placeholder written in prompts; each occurrence becomes the projector's token count.
        timestamps_in_prompt: state the duration and the sampled frame times after each video.
        max_length: longest sequence; text after the last video is truncated, visual tokens never are.
        decode_timeout: seconds one video may take to decode before it is reported as bad.
    """

    def __init__(
        self,
        tokenizer=None,
        sampling: dict | None = None,
        token_layout: dict | None = None,
        image_mean: Sequence[float] = SIGLIP_MEAN_STD[0],
        image_std: Sequence[float] = SIGLIP_MEAN_STD[1],
        video_token: str = "<video>",
        timestamps_in_prompt: bool = False,
        max_length: int | None = None,
        decode_timeout: float | None = 60.0,
        backend: str = "auto",
        chat_template: str | None = None,
    ):
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(tokenizer, chat_template=chat_template)
        if token_layout is None:
            raise ValueError("VideoLLMProcessor needs token_layout (from VideoLLMConfig.visual_token_layout())")
        self.sampling = SamplingSpec(**sampling).to_dict() if sampling else SamplingSpec().to_dict()
        self.token_layout = dict(token_layout)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.video_token = video_token
        self.timestamps_in_prompt = timestamps_in_prompt
        self.max_length = max_length
        self.decode_timeout = decode_timeout
        self.backend = backend
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        if self.video_token_id is None or self.video_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no token for the video placeholder {video_token!r}; add it as a special token")
        self._reader: FrameReader | None = None

    @property
    def spec(self) -> SamplingSpec:
        """The saved sampling spec, as a `SamplingSpec`."""
        return SamplingSpec.from_dict(self.sampling)

    @property
    def layout(self) -> VisualTokenLayout:
        """The model's visual-token layout (how many tokens a video of T frames becomes)."""
        return VisualTokenLayout.from_dict(self.token_layout)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"] = None  # a decode worker process does not travel to DataLoader workers
        return state

    # ---- videos ---------------------------------------------------------------------------------------------------
    def load_video(self, source: str | Path | Sequence[str | Path]) -> DecodedVideo:
        """Decode the frames the saved sampling spec selects, within the decode time limit."""
        if self._reader is None:
            self._reader = FrameReader(self.spec, backend=self.backend, timeout=self.decode_timeout)
        return self._reader(source)

    def pixel_values(self, video: DecodedVideo) -> torch.Tensor:
        """uint8 frames -> normalised float (T, 3, S, S) at the vision tower's frame size."""
        frames = video.frames
        size = self.spec.frame_size
        if size is not None and tuple(frames.shape[-2:]) != (size, size):
            frames = resize_frames(frames, size)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (frames.float() / 255.0 - mean) / std

    def _video_text(self, video: DecodedVideo) -> str:
        if not self.timestamps_in_prompt:
            return self.video_token
        times = ", ".join(f"{t:.1f}s" for t in video.timestamps)
        return (
            f"{self.video_token}\nThe video lasts {video.duration:.1f} s; "
            f"{len(video.timestamps)} frames sampled at {times}."
        )

    # ---- text -----------------------------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text through the chat template (placeholders as they are, not expanded)."""
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.chat_template
        )

    def encode(
        self,
        messages: Sequence[dict],
        videos: Sequence[DecodedVideo] = (),
        sample_id: str = "",
        add_generation_prompt: bool = False,
        with_video_inputs: bool = True,
    ) -> EncodedSample:
        """Tokenise one conversation. Labels cover the assistant turns (their text and end-of-turn token) only.

        `messages` are `{"role", "content"}` dicts whose text holds one `video_token` per entry of `videos`. Without
        `with_video_inputs`, `video_inputs` stays empty: for a caller that has them from another encoding of the same
        videos (the second answer of a preference pair), which saves normalising the frames again.
        """
        messages = [dict(m) for m in messages]
        placeholders = sum(m["content"].count(self.video_token) for m in messages)
        if placeholders != len(videos):
            raise ValueError(f"sample {sample_id!r}: {placeholders} {self.video_token} placeholders but {len(videos)} videos")
        video_iter = iter(videos)
        for message in messages:
            parts = message["content"].split(self.video_token)
            message["content"] = parts[0] + "".join(self._video_text(next(video_iter)) + p for p in parts[1:])

        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        assistant_spans = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(self.render(messages[:i], add_generation_prompt=True))
                end = len(self.render(messages[: i + 1]))
                assistant_spans.append((start, end))

        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids: list[int] = []
        labels: list[int] = []
        counts = [self.layout.count(len(v.indices)) for v in videos]
        video_counts = iter(counts)
        for token_id, (char_start, _) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            if token_id == self.video_token_id:
                n = next(video_counts)
                input_ids.extend([token_id] * n)
                labels.extend([IGNORE_INDEX] * n)
                continue
            in_answer = any(start <= char_start < end for start, end in assistant_spans)
            input_ids.append(token_id)
            labels.append(token_id if in_answer else IGNORE_INDEX)

        input_ids, labels = self._fit(
            input_ids, labels, sum(counts), sample_id, needs_labels=bool(assistant_spans), whole=add_generation_prompt
        )
        return EncodedSample(
            input_ids=input_ids,
            labels=labels,
            video_inputs=self.video_inputs(videos) if with_video_inputs else {},
            video_num_frames=[len(v.indices) for v in videos],
            frame_indices=[list(v.indices) for v in videos],
            frame_timestamps=[list(v.timestamps) for v in videos],
        )

    def video_inputs(self, videos: Sequence[DecodedVideo]) -> dict[str, torch.Tensor]:
        """The model inputs of one sample's videos: normalised frames (`pixel_values_videos`), or for videos read from
        a feature cache their cached features (`FEATURE_KEYS`); empty without videos."""
        if not videos:
            return {}
        cached = [video for video in videos if isinstance(video, CachedVideo)]
        if not cached:
            return {"pixel_values_videos": torch.cat([self.pixel_values(video) for video in videos])}
        if len(cached) != len(videos) or len({video.level for video in cached}) != 1:
            raise ValueError("a sample mixes decoded and cached videos, or cache levels; one run reads one cache")
        return {FEATURE_KEYS[cached[0].level]: torch.cat([video.features for video in cached])}

    def _fit(
        self, input_ids: list[int], labels: list[int], visual: int, sample_id: str, needs_labels: bool, whole: bool
    ) -> tuple[list[int], list[int]]:
        if self.max_length is None or len(input_ids) <= self.max_length:
            return input_ids, labels
        if whole:
            # A prompt to generate from: cutting its end would drop the question and the assistant header the model
            # continues from, and it would answer something else without a word.
            raise SampleTooLongError(
                f"sample {sample_id!r}: the prompt is {len(input_ids)} tokens ({visual} visual), over "
                f"max_length={self.max_length}; a prompt to generate from is never truncated: shorten the conversation, "
                "sample fewer frames, or raise max_length"
            )
        positions = [i for i, t in enumerate(input_ids) if t == self.video_token_id]
        last_visual = positions[-1] if positions else -1
        if last_visual >= self.max_length:
            raise SampleTooLongError(
                f"sample {sample_id!r}: {len(input_ids)} tokens ({visual} visual) do not fit max_length={self.max_length}; "
                "visual tokens are never truncated: use fewer frames, a pooling projector, or a larger max_length"
            )
        input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if needs_labels and all(label == IGNORE_INDEX for label in labels):
            raise SampleTooLongError(
                f"sample {sample_id!r}: truncated to max_length={self.max_length}, no answer token is left "
                f"({visual} visual tokens); raise max_length or sample fewer frames"
            )
        return input_ids, labels

    # ---- batches --------------------------------------------------------------------------------------------------
    def collate(self, features: Sequence[dict], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad token sequences and concatenate the frames of all videos in batch order."""
        pad_id = self.tokenizer.pad_token_id
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            span = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
            input_ids[row, span] = torch.as_tensor(feature["input_ids"])
            attention_mask[row, span] = 1
            if feature.get("labels") is not None:
                labels[row, span] = torch.as_tensor(feature["labels"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return concat_video_tensors(features, batch)

    def __call__(
        self,
        conversations: Sequence[Sequence[dict]],
        videos: Sequence[Sequence[DecodedVideo | str | Path]] | None = None,
        add_generation_prompt: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Encode a batch of conversations for generation (left padded); videos may be paths or decoded videos."""
        videos = videos if videos is not None else [[] for _ in conversations]
        if len(videos) != len(conversations):
            raise ValueError(
                f"{len(conversations)} conversations but {len(videos)} lists of videos; give one list (maybe empty) "
                "per conversation"
            )
        features = []
        for i, (messages, sample_videos) in enumerate(zip(conversations, videos)):
            decoded = [v if isinstance(v, DecodedVideo) else self.load_video(v) for v in sample_videos]
            features.append(self.encode(messages, decoded, sample_id=str(i), add_generation_prompt=add_generation_prompt).as_features())
        batch = self.collate(features, padding_side="left")
        batch.pop("labels")
        return batch

    def batch_decode(self, *args, **kwargs) -> list[str]:
        """The tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        """The tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)
