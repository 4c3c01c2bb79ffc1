"""Non-finite guard: an optimizer step whose loss or gradient is NaN/inf is skipped, counted, and reported by sample.

transformers' Trainer only hides a NaN loss from the logged average (`logging_nan_inf_filter`); the NaN gradients
still reach the optimizer and poison every weight. One corrupt video (a decoder returning garbage, an all-black clip
normalised by zero variance) is enough. `NonFiniteGuardMixin` decides once per optimizer step, identically on every
rank, whether the step is finite, and if not:
- no optimizer update: the gradients are dropped (`grad = None`), which every torch optimizer treats as "no update
  for this parameter" (no moment update, no weight decay), so the parameters stay bit-for-bit unchanged (plain,
  DDP, FSDP). DeepSpeed steps inside its engine, before the Trainer sees the gradient norm: it skips such a step
  itself with fp16 (any stage) and with ZeRO-1/2 in fp32/bf16 (its `check_grad_overflow`, on by default), and reports
  an infinite norm, which the guard counts the same way. ZeRO-3 in fp32/bf16 has no such check: there the guard
  counts, names and stops, but cannot undo the update;
- the step is counted (`nonfinite_steps` in every training log entry, and in checkpoints so a resumed run counts on);
  it still is a step: `global_step` and the learning-rate schedule advance as in a run without the bad sample;
- the samples of the offending micro-batches are logged by id (a `sample_ids` list in the batch, when the collator
  provides one);
- after `max_nonfinite_steps` skipped steps in a row the run stops with `NonFiniteTrainingError`, naming the samples.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object
from torch import nn
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState

from videollm.data.dataset import SAMPLE_IDS

logger = logging.getLogger(__name__)

DEFAULT_MAX_NONFINITE_STEPS = 5
MAX_NONFINITE_STEPS_HELP = (
    "stop training after this many optimizer steps in a row had a NaN/inf loss or gradient (each such step is skipped "
    "and counted); 0 never stops"
)


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard(TrainerCallback, ExportableState):
    """The guard's counters and the current step's micro-batches; saved with every checkpoint (`ExportableState`)."""

    def __init__(self, max_consecutive: int = DEFAULT_MAX_NONFINITE_STEPS):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._micro_batches: list[tuple[torch.Tensor, list[str]]] = []
        self._streak_samples: list[str] = []  # the offending samples of the current run of skipped steps

    def state(self) -> dict[str, Any]:
        return {
            "args": {"max_consecutive": self.max_consecutive},
            "attributes": {"skipped": self.skipped, "consecutive": self.consecutive},
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Take the counters of a checkpoint's saved state (the limit stays this run's setting)."""
        attributes = saved.get("attributes", {})
        self.skipped = int(attributes.get("skipped", 0))
        self.consecutive = int(attributes.get("consecutive", 0))

    def record(self, loss: torch.Tensor, sample_ids: Sequence[Any] | None) -> None:
        """Note one micro-batch's loss (kept on device: no sync until the optimizer step) and its sample ids."""
        self._micro_batches.append((torch.isfinite(loss.detach()).all(), [str(i) for i in sample_ids or []]))

    def local_offenders(self) -> tuple[bool, list[str]]:
        """(whether a micro-batch of this rank had a non-finite loss, the ids of those micro-batches' samples)."""
        bad = [ids for finite, ids in self._micro_batches if not bool(finite)]
        return bool(bad), [sample for ids in bad for sample in ids]

    def step_samples(self) -> list[str]:
        return [sample for _, ids in self._micro_batches for sample in ids]

    def end_step(self, skipped: bool, step: int, sample_ids: Sequence[str]) -> None:
        """Close one optimizer step: count it if it was skipped, and stop the run after too many in a row."""
        self._micro_batches = []
        if not skipped:
            self.consecutive = 0
            self._streak_samples = []
            return
        self.skipped += 1
        self.consecutive += 1
        self._streak_samples.extend(sample_ids)
        named = _name(sample_ids)
        logger.warning(
            "step %d: non-finite loss or gradient, update skipped (%d so far); samples: %s", step, self.skipped, named
        )
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.consecutive} optimizer steps in a row (up to step {step}) had a non-finite loss or gradient "
                f"(max_nonfinite_steps={self.max_consecutive}); samples: {_name(self._streak_samples)}. "
                "Check these samples (decoded frames, labels) or lower the learning rate."
            )


def _name(sample_ids: Sequence[str]) -> str:
    return ", ".join(sample_ids) if sample_ids else "unknown (the batches carry no sample_ids)"


class NonFiniteGuardMixin:
    """Trainer mixin that skips and counts non-finite optimizer steps (see the module docstring).

    Put it before `transformers.Trainer` (or a TRL trainer) in the bases; `args.max_nonfinite_steps` sets the limit.
    A `sample_ids` list in a batch is taken out before the model sees the batch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Plain TrainingArguments (e.g. the STaR recipe's) have no such key and get the default.
        limit = getattr(self.args, "max_nonfinite_steps", DEFAULT_MAX_NONFINITE_STEPS)
        self.add_callback(NonFiniteGuard(limit))

    @property
    def nonfinite_guard(self) -> NonFiniteGuard:
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, NonFiniteGuard))

    def train(self, resume_from_checkpoint: str | None = None, trial=None, ignore_keys_for_eval=None):
        if resume_from_checkpoint is not None and not isinstance(resume_from_checkpoint, bool):
            state_file = Path(resume_from_checkpoint) / TRAINER_STATE_NAME
            if state_file.is_file():
                saved = json.loads(state_file.read_text()).get("stateful_callbacks", {}).get(NonFiniteGuard.__name__)
                if saved:
                    self.nonfinite_guard.restore(saved[-1] if isinstance(saved, list) else saved)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval
        )

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        inputs = dict(inputs)
        sample_ids = inputs.pop(SAMPLE_IDS, None)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.record(loss, sample_ids)
        return loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys=None):
        inputs = {key: value for key, value in inputs.items() if key != SAMPLE_IDS}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        # The Trainer calls this at every optimizer step, after the gradients are complete (and reduced across ranks)
        # and right before `optimizer.step()`: the one point where a step can still be dropped.
        grad_norm = super()._get_grad_norm(model, grad_norm)
        guard = self.nonfinite_guard
        loss_bad, offenders = guard.local_offenders()
        loss_bad_anywhere = self._on_any_rank(loss_bad)
        skipped = loss_bad_anywhere or not math.isfinite(float(grad_norm))
        if skipped:
            if self.accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed's engine owns its gradients
                model.zero_grad(set_to_none=True)
            if not loss_bad_anywhere:  # a NaN gradient under finite losses: every sample of the step is a suspect
                offenders = guard.step_samples()
            if self.args.world_size > 1:
                offenders = [sample for rank_ids in gather_object([offenders]) for sample in rank_ids]
        # `global_step` counts finished steps; this one becomes step global_step + 1.
        guard.end_step(skipped, self.state.global_step + 1, offenders)
        return grad_norm

    def _on_any_rank(self, flag: bool) -> bool:
        """One decision for all ranks, so that they skip (and stay in sync) together."""
        if self.args.world_size <= 1:
            return flag
        votes = torch.tensor([float(flag)], device=self.args.device)
        return bool(self.accelerator.reduce(votes, reduction="sum").item() > 0)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["nonfinite_steps"] = self.nonfinite_guard.skipped
        super().log(logs, start_time)
