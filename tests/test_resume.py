"""Exact resume: a recipe killed with SIGKILL and restarted with `resume_from_checkpoint: true` logs the same losses,
bit for bit, as a run that was never interrupted (SFT full fine-tune; DPO with LoRA, a trained projector and dropout);
batches consumed before the checkpoint are skipped by index, without decoding their videos."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from videollm.data.dataset import ConversationDataset, VideoCollator
from videollm.data.formats import load_conversations
from videollm.data.sampling import SamplingSpec
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.model.checkpoint import save_checkpoint
from videollm.model.presets import build_tiny_model_and_processor
from videollm.train.checkpointing import checkpoint_step, resolve_latest_checkpoint
from videollm.train.sft import VideoSFTConfig, VideoSFTTrainer

from commands import REPO, command_env

COMPARED_STEPS = 20
FRAMES = 2


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(SyntheticConfig(output_dir=str(root), num_train=8, num_eval=2, num_test=2))
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A full tiny checkpoint for DPO to start from (LoRA needs a saved base)."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=FRAMES))
    save_checkpoint(model, processor, path)
    return path


def launch(args: list[str], log: Path) -> subprocess.Popen:
    """Start a recipe; its output goes to `log` (a pipe nobody reads while we wait could fill up and stall it)."""
    with open(log, "w") as output:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=command_env(), stdout=output, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    process.wait(timeout=timeout)
    assert process.returncode == 0, log.read_text()[-3000:]


def kill_after_checkpoint(process: subprocess.Popen, log: Path, output_dir: Path, step: int) -> None:
    """SIGKILL the run as soon as its latest complete checkpoint is at `step` or later."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        latest = resolve_latest_checkpoint(output_dir)
        if latest is not None and checkpoint_step(latest) >= step:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"not killed (exit {process.returncode}): {log.read_text()[-2000:]}"


def losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def assert_exact_resume(command: list[str], tmp_path: Path, seed: int, max_steps: int) -> None:
    """Uninterrupted run vs. a run killed right after a checkpoint at a random step and resumed with the same command
    plus `--resume_from_checkpoint true`: every loss logged after the resume is identical."""
    kill_step = random.Random(seed).randint(3, 5)
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    logs = {name: tmp_path / f"{name}.log" for name in ("reference", "killed", "resumed")}
    # The uninterrupted run saves nothing (saving must not change training either) and runs alongside the other one.
    command = [*command, "--max_steps", str(max_steps)]
    reference = launch([*command, "--save_strategy", "no", "--output_dir", str(reference_dir)], logs["reference"])
    interrupted = [*command, "--output_dir", str(interrupted_dir),
                   "--save_strategy", "steps", "--save_steps", str(kill_step), "--save_total_limit", "2"]  # fmt: skip
    kill_after_checkpoint(launch(interrupted, logs["killed"]), logs["killed"], interrupted_dir, kill_step)
    resumed_from = checkpoint_step(resolve_latest_checkpoint(interrupted_dir))
    finish(launch([*interrupted, "--resume_from_checkpoint", "true"], logs["resumed"]), logs["resumed"])
    finish(reference, logs["reference"])

    expected, resumed = losses(reference_dir), losses(interrupted_dir)
    after = [step for step in sorted(resumed) if step > resumed_from]
    assert len(after) >= COMPARED_STEPS and after[-1] == max_steps, (resumed_from, after)
    assert [resumed[step] for step in after] == [expected[step] for step in after]  # ==, not allclose
    assert resumed == expected  # and the history up to the checkpoint came back with it


def test_sft_full_fine_tune_resumes_exactly_after_kill_9(synthetic, tmp_path):
    command = [
        "recipes/sft.py", "--config", "recipes/configs/sft_tiny.yaml",
        "--train_file", str(synthetic / "train.jsonl"), "--video_root", str(synthetic), "--num_frames", str(FRAMES),
        "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--logging_steps", "1",
    ]  # fmt: skip
    assert_exact_resume(command, tmp_path, seed=1, max_steps=40)


def test_dpo_lora_with_trained_projector_resumes_exactly_after_kill_9(synthetic, base, tmp_path):
    command = [
        "recipes/dpo.py", "--config", "recipes/configs/dpo_tiny.yaml", "--model_name_or_path", str(base),
        "--train_file", str(synthetic / "preference_train.jsonl"), "--video_root", str(synthetic),
        "--tune_projector", "full", "--lora_dropout", "0.1", "--learning_rate", "1e-2", "--warmup_steps", "0",
        "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--logging_steps", "1",
    ]  # fmt: skip
    assert_exact_resume(command, tmp_path, seed=2, max_steps=32)


def test_resume_skips_consumed_batches_without_decoding_them(synthetic, tmp_path):
    """The Trainer skips a resumed epoch's consumed batches in its batch sampler (accelerate's `SkipBatchSampler`):
    their indices are drawn, so the data order stays the same, but the dataset is never asked for them."""
    records = load_conversations(synthetic / "train.jsonl", video_root=synthetic)
    decoded: dict[str, list[str]] = {}

    def run(name: str, resume: str | None) -> None:
        torch.manual_seed(0)
        model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=FRAMES))
        processor.decode_timeout = None  # decode in this process: nothing to gain from a decode worker here
        calls = decoded.setdefault(name, [])
        load_video = processor.load_video
        processor.load_video = lambda source: calls.append(str(source)) or load_video(source)
        args = VideoSFTConfig(
            output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", per_device_train_batch_size=2,
            max_steps=16, save_strategy="steps", save_steps=5, logging_steps=1, dataloader_num_workers=0, seed=0,
        )  # fmt: skip
        trainer = VideoSFTTrainer(
            model=model, args=args, train_dataset=ConversationDataset(records, processor),
            data_collator=VideoCollator(processor), processing_class=processor,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)

    run("uninterrupted", None)
    run("resumed", str(tmp_path / "out" / "checkpoint-5"))
    per_step = 2  # one video per record, two records per batch
    # 16 steps cross an epoch (12 steps); the loader reads one batch ahead (accelerate's end-of-loader check).
    assert len(records) == 24 and len(decoded["uninterrupted"]) == (16 + 1) * per_step
    assert decoded["resumed"] == decoded["uninterrupted"][5 * per_step :]  # steps 6-16 only, in the same order
