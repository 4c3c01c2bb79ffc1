"""Torch datasets that decode videos lazily and encode samples with the model's processor.

Decoding happens in `__getitem__`, so DataLoader workers decode in parallel with training. With a
`BadSamplePolicy`, an unreadable video is handled by it (replaced and quarantined, or a clear error) instead of
ending the run with a decoder traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from videollm.data.formats import ConversationRecord
from videollm.data.processor import VideoLLMProcessor
from videollm.data.robust import BadSampleGuard, BadSamplePolicy, SampleInfo


def record_messages(record: ConversationRecord) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in record.messages]


class ConversationDataset(Dataset):
    """Conversation records -> processor features (input_ids, labels, frames) for supervised fine-tuning.

    Args:
        records: the conversations.
        processor: decodes (within its time limit) and encodes them.
        bad_samples: what to do with a record whose video cannot be decoded; None lets `VideoDecodeError` through.
        name: the dataset's name in messages and quarantine lines (``"train"``, ``"eval"``).
    """

    def __init__(
        self,
        records: Sequence[ConversationRecord],
        processor: VideoLLMProcessor,
        bad_samples: BadSamplePolicy | None = None,
        name: str = "train",
    ):
        self.records = list(records)
        self.processor = processor
        self.guard: BadSampleGuard | None = bad_samples.guard(len(self.records), name) if bad_samples else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.guard is None:
            return self._encode(index)
        return self.guard.load(index, self._encode, self._describe)

    def _encode(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        videos = [self.processor.load_video(path) for path in record.videos]
        return self.processor.encode(record_messages(record), videos, sample_id=record.id).as_features()

    def _describe(self, index: int) -> SampleInfo:
        record = self.records[index]
        return SampleInfo(id=record.id, videos=record.videos, source=record.source)


class VideoCollator:
    """Batches processor features; a picklable callable so DataLoader workers can use it."""

    def __init__(self, processor: VideoLLMProcessor, padding_side: str = "right"):
        self.processor = processor
        self.padding_side = padding_side

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.processor.collate(features, padding_side=self.padding_side)
