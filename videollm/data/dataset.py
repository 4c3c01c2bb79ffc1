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

# A sample's record id travels with its features, and a batch lists them, so the non-finite guard
# (`videollm.train.guards`) can name the samples of a bad step; the trainer takes them out before the forward.
SAMPLE_ID = "sample_id"  # a dataset item's id
SAMPLE_IDS = "sample_ids"  # a batch's list of sample ids


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
        return {**self.processor.encode(record_messages(record), videos, sample_id=record.id).as_features(), SAMPLE_ID: record.id}

    def _describe(self, index: int) -> SampleInfo:
        record = self.records[index]
        return SampleInfo(id=record.id, videos=record.videos, source=record.source)


class VideoCollator:
    """Batches processor features; a picklable callable so DataLoader workers can use it.

    Args:
        sample_ids: also list the samples' ids under `sample_ids`, for a trainer with the non-finite guard (it
            removes them before the forward); off for callers that pass the batch straight to the model.
    """

    def __init__(self, processor: VideoLLMProcessor, padding_side: str = "right", sample_ids: bool = False):
        self.processor = processor
        self.padding_side = padding_side
        self.sample_ids = sample_ids

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return with_sample_ids(features, self.processor.collate(features, padding_side=self.padding_side), self.sample_ids)


def with_sample_ids(features: Sequence[dict[str, Any]], batch: dict[str, Any], enabled: bool) -> dict[str, Any]:
    """`batch` plus the features' ids under `sample_ids` when `enabled` (shared by the collators)."""
    if enabled:
        batch[SAMPLE_IDS] = [f.get(SAMPLE_ID) for f in features]
    return batch
