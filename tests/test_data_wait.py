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
