"""`data_wait_fraction` (videollm.train.data_wait): the share of wall time the training loop waited for batches.

A fake clock makes the figures exact: fetching a slow sample takes one clock second, an optimizer step one more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from videollm.data.dataset import VideoCollator
from videollm.data.sampling import SamplingSpec
from videollm.data.video import DecodedVideo
from videollm.model.presets import build_tiny_model_and_processor
from videollm.train.data_wait import DATA_WAIT_KEY
from videollm.train.sft import VideoSFTConfig, VideoSFTTrainer

STEPS = 4


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Samples(torch.utils.data.Dataset):
    """Encoded samples; a fetch costs `fetch_seconds` on the clock."""

    def __init__(self, processor, clock: FakeClock, fetch_seconds: float):
        video = DecodedVideo(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), [0, 1], [0.0, 0.5], 1.0, "clip")
        messages = [{"role": "user", "content": "<video>\nWhat color?"}, {"role": "assistant", "content": "red"}]
        self.item = processor.encode(messages, [video]).as_features()
        self.clock, self.fetch_seconds = clock, fetch_seconds

    def __len__(self) -> int:
        return STEPS

    def __getitem__(self, index: int) -> dict:
        self.clock.now += self.fetch_seconds
        return self.item


class StepTakesOneSecond(TrainerCallback):
    def __init__(self, clock: FakeClock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.now += 1.0


@pytest.mark.parametrize("fetch_seconds, expected", [(0.0, 0.0), (1.0, 0.5), (3.0, 0.75)])
def test_data_wait_fraction_is_the_share_of_time_spent_fetching(tmp_path: Path, fetch_seconds, expected):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=2))
    clock = FakeClock()
    args = VideoSFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=1, max_steps=STEPS,
        logging_steps=STEPS, save_strategy="no", dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = VideoSFTTrainer(
        model=model, args=args, train_dataset=Samples(processor, clock, fetch_seconds),
        data_collator=VideoCollator(processor), processing_class=processor, callbacks=[StepTakesOneSecond(clock)],
    )  # fmt: skip
    trainer.data_wait_clock = clock
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 1 and logged[0][DATA_WAIT_KEY] == pytest.approx(expected)


class EvaluationTakesTenSeconds(TrainerCallback):
    def __init__(self, clock: FakeClock):
        self.clock = clock

    def on_evaluate(self, args, state, control, **kwargs):
        self.clock.now += 10.0


def logged_shares(tmp_path: Path, evaluate: bool) -> list[float]:
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=2))
    clock = FakeClock()
    evaluation = dict(eval_strategy="steps", eval_steps=1) if evaluate else {}
    args = VideoSFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=1, max_steps=STEPS,
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=0, **evaluation,
    )  # fmt: skip
    trainer = VideoSFTTrainer(
        model=model, args=args, train_dataset=Samples(processor, clock, 1.0), eval_dataset=Samples(processor, FakeClock(), 0.0),
        data_collator=VideoCollator(processor), processing_class=processor,
        callbacks=[StepTakesOneSecond(clock), EvaluationTakesTenSeconds(clock)],
    )  # fmt: skip
    trainer.data_wait_clock = clock
    trainer.train()
    return [entry[DATA_WAIT_KEY] for entry in trainer.state.log_history if "loss" in entry]


def test_evaluation_time_is_not_counted_as_training_time(tmp_path: Path):
    """Evaluating after every step (10 clock seconds each) leaves the logged shares as they are without evaluation
    (where the first step also waits for the batch the data loader fetches ahead, and the last for none)."""
    without = logged_shares(tmp_path / "plain", evaluate=False)
    assert without == pytest.approx([2 / 3, 0.5, 0.5, 0.0], abs=1e-4)
    assert logged_shares(tmp_path / "evaluated", evaluate=True) == without
