"""Crash-safe checkpoints (videollm.train.checkpointing): kill -9 during saves never leaves a partial checkpoint that
`resume_from_checkpoint: latest` would pick, rotation happens after publishing, the right rank writes."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from itertools import count
from pathlib import Path

import pytest
import torch
from transformers.utils.logging import disable_progress_bar

from videollm.data.sampling import SamplingSpec
from videollm.model.checkpoint import load_model
from videollm.model.presets import build_tiny_model_and_processor
from videollm.train.checkpointing import (
    LATEST_POINTER,
    STAGING_PREFIX,
    SUPERSEDED_PREFIX,
    checkpoint_step,
    clean_incomplete,
    list_checkpoints,
    resolve_latest_checkpoint,
    resume_target,
)
from videollm.train.sft import VideoSFTConfig, VideoSFTTrainer

# What a complete checkpoint of a full fine-tune holds: the videollm layout plus the Trainer's resume state.
CHECKPOINT_FILES = {
    "config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
    "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
}  # fmt: skip
SAVE_TOTAL_LIMIT = 2


def make_trainer(output_dir: Path, config_class: type = VideoSFTConfig) -> VideoSFTTrainer:
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=2))
    args = config_class(
        output_dir=str(output_dir), use_cpu=True, report_to="none", save_strategy="steps", save_steps=1,
        save_total_limit=SAVE_TOTAL_LIMIT,
    )  # fmt: skip
    trainer = VideoSFTTrainer(model=model, args=args, processing_class=processor)
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    return trainer


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> VideoSFTTrainer:
    return make_trainer(tmp_path_factory.mktemp("ckpt") / "out")


def save_forever(trainer: VideoSFTTrainer, first_step: int) -> None:
    """The child process: save checkpoints first_step, first_step + 1, ... until it is killed."""
    # Progress bars share tqdm's process-shared lock with the parent: a child killed while holding it (writing the
    # "Writing model shards" bar) would leave the parent waiting on it forever.
    disable_progress_bar()
    for step in count(first_step):
        trainer.state.global_step = step
        trainer._save_checkpoint(trainer.model, trial=None)


def assert_complete(path: Path) -> None:
    assert CHECKPOINT_FILES <= {p.name for p in path.iterdir()}, sorted(p.name for p in path.iterdir())
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["global_step"] == checkpoint_step(path)
    torch.load(path / "optimizer.pt", weights_only=True)
    model, _ = load_model(path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kill_9_at_20_random_points_of_saving_never_leaves_a_partial_latest(trainer):
    out = Path(trainer.args.output_dir)
    started = time.perf_counter()
    trainer.state.global_step = 1
    trainer._save_checkpoint(trainer.model, trial=None)
    one_save = time.perf_counter() - started
    assert resolve_latest_checkpoint(out) == out / "checkpoint-1"

    rng = random.Random(0)
    context = multiprocessing.get_context("fork")  # the child inherits the built trainer: no start-up cost per kill
    interrupted, latest_step = 0, 1
    for _ in range(20):
        # Resume at the latest complete step, as a restarted run does: its first save replaces that checkpoint.
        child = context.Process(target=save_forever, args=(trainer, latest_step), daemon=True)
        child.start()
        time.sleep(rng.uniform(0.0, 3 * one_save))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        interrupted += any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir())

        latest = resolve_latest_checkpoint(out)
        assert latest is not None and checkpoint_step(latest) >= latest_step - 1
        assert_complete(latest)
        assert resume_target("latest", out) == str(latest)
        named = out / (out / LATEST_POINTER).read_text().strip()
        assert not named.exists() or named == latest  # the pointer never names a partial checkpoint
        # Every checkpoint-N on disk is complete (a partial one only ever exists under its staging name), and
        # rotation leaves at most one checkpoint beyond the limit (a kill between publishing and deleting).
        for path in out.glob("checkpoint-*"):
            assert (path / "trainer_state.json").is_file(), path
        assert len(list_checkpoints(out)) <= SAVE_TOTAL_LIMIT + 1
        latest_step = checkpoint_step(latest)
    assert interrupted >= 5, f"only {interrupted} of 20 kills landed inside a save"


class KilledHere(BaseException):
    """Stands for a SIGKILL at one exact point of a save (the random kills above hit this window only rarely)."""


def test_a_kill_while_replacing_a_step_keeps_a_complete_copy_of_that_step(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path / "out")
    out = Path(trainer.args.output_dir)
    trainer.state.global_step = 1
    trainer._save_checkpoint(trainer.model, trial=None)  # the run's only checkpoint

    real_rename = os.rename

    def rename_then_die_before_publishing(source, target):
        if Path(source).name.startswith(STAGING_PREFIX):
            raise KilledHere  # the old checkpoint-1 is already renamed away, the new one not yet in place
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename_then_die_before_publishing)
    with pytest.raises(KilledHere):
        trainer._save_checkpoint(trainer.model, trial=None)
    monkeypatch.setattr(os, "rename", real_rename)

    assert not (out / "checkpoint-1").exists()
    latest = resolve_latest_checkpoint(out)
    assert latest == out / f"{SUPERSEDED_PREFIX}checkpoint-1" and checkpoint_step(latest) == 1
    assert_complete(latest)
    assert resume_target("latest", out) == str(latest)

    assert sorted(p.name for p in clean_incomplete(out)) == [f"{STAGING_PREFIX}checkpoint-1"]
    assert resolve_latest_checkpoint(out) == out / "checkpoint-1"
    assert_complete(out / "checkpoint-1")
    trainer._save_checkpoint(trainer.model, trial=None)  # the replacing save, done again, completes
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_resume_latest_skips_partial_checkpoints_and_cleans_staging(tmp_path):
    trainer = make_trainer(tmp_path / "out")
    out = Path(trainer.args.output_dir)
    for step in (3, 4):
        trainer.state.global_step = step
        trainer._save_checkpoint(trainer.model, trial=None)
    (out / "checkpoint-9").mkdir()  # a partial checkpoint as plain transformers could leave it: no trainer_state.json
    (out / "checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    (out / f"{STAGING_PREFIX}checkpoint-5").mkdir()
    assert resolve_latest_checkpoint(out) == out / "checkpoint-4"

    (out / LATEST_POINTER).write_text("checkpoint-9\n")  # a pointer to something incomplete is not trusted
    assert resolve_latest_checkpoint(out) == out / "checkpoint-4"
    assert resume_target(True, out) == resume_target("latest", out) == str(out / "checkpoint-4")
    assert resume_target("false", out) is None and resume_target(None, out) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resume_target(str(out / "checkpoint-9"), out)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resume_target("latest", tmp_path / "empty")

    assert [p.name for p in clean_incomplete(out)] == [f"{STAGING_PREFIX}checkpoint-5"]
    assert not (out / f"{STAGING_PREFIX}checkpoint-5").exists()


def test_rotation_keeps_the_newest_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path / "out")
    out = Path(trainer.args.output_dir)
    for step in range(1, 6):
        trainer.state.global_step = step
        trainer._save_checkpoint(trainer.model, trial=None)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]
    assert (out / LATEST_POINTER).read_text().strip() == "checkpoint-5"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


class NotWriter(VideoSFTConfig):
    """A rank that does not own the disk (not world rank 0, or not local rank 0 with save_on_each_node)."""

    @property
    def should_save(self) -> bool:
        return False


def test_only_the_saving_rank_writes(tmp_path):
    trainer = make_trainer(tmp_path / "out", config_class=NotWriter)
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
