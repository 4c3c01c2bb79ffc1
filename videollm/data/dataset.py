"""Torch datasets that decode videos lazily and encode samples with the model's processor.

Decoding happens in `__getitem__`, so DataLoader workers decode in parallel with training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from videollm.data.formats import ConversationRecord
from videollm.data.processor import VideoLLMProcessor


def record_messages(record: ConversationRecord) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in record.messages]


class ConversationDataset(Dataset):
    """Conversation records -> processor features (input_ids, labels, frames) for supervised fine-tuning."""

    def __init__(self, records: Sequence[ConversationRecord], processor: VideoLLMProcessor):
        self.records = list(records)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        videos = [self.processor.load_video(path) for path in record.videos]
        return self.processor.encode(record_messages(record), videos, sample_id=record.id).as_features()


class VideoCollator:
    """Batches processor features; a picklable callable so DataLoader workers can use it."""

    def __init__(self, processor: VideoLLMProcessor, padding_side: str = "right"):
        self.processor = processor
        self.padding_side = padding_side

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.processor.collate(features, padding_side=self.padding_side)
