"""Supervised fine-tuning on video conversations.

transformers' Trainer does the loop, and its checkpoints already hold everything an exact resume needs (weights,
optimizer, scheduler, per-rank RNG states, the step; the data position follows from the step, and skipped batches are
skipped by index in the sampler, so their videos are never decoded). That holds as long as data loading draws no
random numbers (DataLoader workers get new seeds after a resume; frame sampling is deterministic). What video training
adds on top:
- the checkpoint layout (adapter + projector + processor + config together, in `output_dir` itself), written by the
  right rank, atomically, with a `latest_checkpoint` pointer (`CheckpointMixin`);
- the non-finite guard: a NaN/inf step (one corrupt video is enough) is skipped and counted, and the run stops after
  `max_nonfinite_steps` in a row, naming the samples (`NonFiniteGuardMixin`);
- `data_wait_fraction` in the logs: the share of wall time spent waiting for batches (`DataWaitMixin`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from videollm.data.dataset import SAMPLE_ID
from videollm.train.checkpointing import CheckpointMixin
from videollm.train.data_wait import DataWaitMixin
from videollm.train.guards import DEFAULT_MAX_NONFINITE_STEPS, MAX_NONFINITE_STEPS_HELP, NonFiniteGuardMixin
from videollm.train.hardware import DeviceDefaultsArguments
from videollm.train.optim import PartLearningRateArguments, PartLearningRateMixin


@dataclass
class VideoSFTConfig(DeviceDefaultsArguments, PartLearningRateArguments, TrainingArguments):
    """transformers' TrainingArguments plus the non-finite guard's limit, with bf16 following the device.

    `resume_from_checkpoint: true` (or `latest`) resumes from the checkpoint `output_dir/latest_checkpoint` names.
    """

    max_nonfinite_steps: int = field(default=DEFAULT_MAX_NONFINITE_STEPS, metadata={"help": MAX_NONFINITE_STEPS_HELP})


class VideoSFTTrainer(CheckpointMixin, NonFiniteGuardMixin, DataWaitMixin, PartLearningRateMixin, Trainer):
    """HF Trainer with videollm checkpoints (loadable with `load_model`, crash-safe), the non-finite guard, and the
    share of time spent waiting for data in its logs."""

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer drops every dataset field the model's forward does not take before collating; a sample's id must
        # reach the collator, which lists the batch's ids under `sample_ids` for the guard (the model never sees them).
        super()._set_signature_columns_if_needed()
        if SAMPLE_ID not in self._signature_columns:
            self._signature_columns.append(SAMPLE_ID)
