"""Batched answer generation: the one path that chat, evaluation, serving and self-training generate through."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from videollm.data.processor import VideoLLMProcessor
from videollm.data.video import DecodedVideo


@dataclass
class GenerationSettings:
    """Sampling settings for `generate_answers` (greedy by default)."""

    max_new_tokens: int = field(default=64, metadata={"help": "longest answer in tokens"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    num_return_sequences: int = field(default=1, metadata={"help": "answers per prompt"})

    def generate_kwargs(self, processor: VideoLLMProcessor) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_return_sequences": self.num_return_sequences,
            "pad_token_id": processor.tokenizer.pad_token_id,
            "eos_token_id": processor.tokenizer.eos_token_id,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor: VideoLLMProcessor,
    conversations: Sequence[Sequence[dict]],
    videos: Sequence[Sequence[DecodedVideo | str]],
    settings: GenerationSettings | None = None,
) -> list[list[str]]:
    """Answer each conversation (ending with a user turn); returns `num_return_sequences` answers per prompt."""
    settings = settings or GenerationSettings()
    batch = processor(conversations, videos, add_generation_prompt=True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    output = model.generate(**batch, **settings.generate_kwargs(processor))
    texts = processor.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    k = settings.num_return_sequences
    return [[t.strip() for t in texts[i * k : (i + 1) * k]] for i in range(len(conversations))]
