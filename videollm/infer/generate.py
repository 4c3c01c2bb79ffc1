"""Batched answer generation: the one path that chat, evaluation, serving and self-training generate through.

k answers per prompt (`num_return_sequences`) share ONE vision encode and ONE prompt prefill: the prompts of a batch
are encoded and prefilled once, then the KV cache is repeated k times along the batch and the k continuations are
decoded together. transformers' own `num_return_sequences` path repeats every input tensor instead, which here means
the frames: it encodes each video k times, and, as `pixel_values_videos` holds frames (not videos) along its first
dimension, its row-by-row repeat puts each frame k times in a row (f0 f0 f0 f1 ...): the model would see garbled clips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
from torch import nn

from videollm.data.processor import VIDEO_TENSOR_KEYS, SampleTooLongError, VideoLLMProcessor
from videollm.data.video import DecodedVideo
from videollm.model.modeling import KV_CACHE_FIELD

T = TypeVar("T")


@dataclass
class GenerationSettings:
    """Sampling settings for `generate_answers` (greedy by default)."""

    max_new_tokens: int = field(default=64, metadata={"help": "longest answer in tokens"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    num_return_sequences: int = field(default=1, metadata={"help": "answers per prompt"})

    def generate_kwargs(self, processor: VideoLLMProcessor) -> dict:
        """Keyword arguments of `model.generate` for ONE sequence per input row (rows are expanded beforehand)."""
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "pad_token_id": processor.tokenizer.pad_token_id,
            "eos_token_id": processor.tokenizer.eos_token_id,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)

    def problem(self, flag: str = "--") -> str | None:
        """Why these settings cannot generate, naming the setting (`flag` + its name), or None: a front end checks
        before it loads a model, as generation would refuse them only then."""
        if self.max_new_tokens < 1:
            return f"{flag}max_new_tokens: must be >= 1, got {self.max_new_tokens}"
        if self.num_return_sequences < 1:
            return f"{flag}num_return_sequences: must be >= 1, got {self.num_return_sequences}"
        if self.do_sample and not self.temperature > 0:
            return f"{flag}temperature: must be > 0 when sampling, got {self.temperature} (or greedy: do_sample false)"
        if self.do_sample and not 0 < self.top_p <= 1:
            return f"{flag}top_p: must be in (0, 1], got {self.top_p}"
        return None


def set_apart_too_long(
    processor: VideoLLMProcessor,
    decoded: Sequence[tuple[T, list[DecodedVideo]]],
    messages_of: Callable[[T], Sequence[dict]],
) -> tuple[list[tuple[T, list[DecodedVideo]]], list[tuple[T, SampleTooLongError]]]:
    """`(item, videos)` whose prompt fits the processor's `max_length`, and `(item, error)` for the others, both in
    order: a prompt to generate from is never cut, so an over-long question costs itself and not the batch it came
    in (the prompts are tokenized once more for this, which is cheap next to generating)."""
    if processor.max_length is None:
        return list(decoded), []
    fitting, too_long = [], []
    for item, videos in decoded:
        try:
            processor.encode(messages_of(item), videos, add_generation_prompt=True, with_video_inputs=False)
        except SampleTooLongError as error:
            too_long.append((item, error))
        else:
            fitting.append((item, videos))
    return fitting, too_long


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor: VideoLLMProcessor,
    conversations: Sequence[Sequence[dict]],
    videos: Sequence[Sequence[DecodedVideo | str]],
    settings: GenerationSettings | None = None,
    batch_size: int | None = None,
) -> list[list[str]]:
    """Answer each conversation (ending with a user turn); returns `num_return_sequences` answers per prompt.

    `videos` are paths, decoded videos, or videos read from a feature cache (`FeatureCache.get`), whose cached
    features replace the vision tower (and projector) in the prefill.

    `batch_size` prompts (default: all) go through one vision pass and one prefill; their k samples decode together.
    Sampling draws from torch's global generator: seed it (`torch.manual_seed`) for repeatable samples.
    """
    settings = settings or GenerationSettings()
    if settings.num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {settings.num_return_sequences}")
    step = batch_size or max(len(conversations), 1)
    answers: list[list[str]] = []
    for start in range(0, len(conversations), step):
        chunk = slice(start, start + step)
        answers.extend(_generate_batch(model, processor, conversations[chunk], videos[chunk], settings))
    return answers


def _generate_batch(model, processor, conversations, videos, settings: GenerationSettings) -> list[list[str]]:
    k = settings.num_return_sequences
    batch = processor(conversations, videos, add_generation_prompt=True)
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    prompt_length = input_ids.shape[1]
    if bool((input_ids[:, -1] == processor.video_token_id).any()):
        raise ValueError("a prompt ends with a visual token; render prompts with add_generation_prompt=True")
    # Positions as `generate` derives them from a left-padded mask, so the continuation sees the same positions.
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

    # Prefill every prompt token but the last, videos included, once per prompt. `generate` then runs the last prompt
    # token of each of the k copies on the repeated cache: it needs one uncached token to start from, and this way its
    # own sampling code (temperature, top-p, stopping) draws the k answers.
    prefill = model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids[:, :-1],
        **{key: batch[key] for key in (*VIDEO_TENSOR_KEYS, "video_num_frames") if key in batch},
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(prefill, KV_CACHE_FIELD)
    if k > 1:
        cache.batch_repeat_interleave(k)
    output = model.generate(
        input_ids=input_ids.repeat_interleave(k, dim=0),
        attention_mask=attention_mask.repeat_interleave(k, dim=0),
        **{KV_CACHE_FIELD: cache},
        **settings.generate_kwargs(processor),
        # transformers steps every process in lockstep whenever DeepSpeed ZeRO-3 is on; that is needed only when the
        # weights are partitioned, and would hang processes that answer different numbers of batches with whole ones
        synced_gpus=any(hasattr(parameter, "ds_id") for parameter in model.parameters()),
    )
    texts = processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
    return [[t.strip() for t in texts[i * k : (i + 1) * k]] for i in range(len(conversations))]
