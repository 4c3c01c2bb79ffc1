"""The non-finite guard (videollm.train.guards) on a tiny model: a NaN step is skipped (parameters and optimizer state
unchanged) and counted; too many in a row stop the run with the samples named; counts survive a resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from videollm.data.sampling import SamplingSpec
from videollm.data.video import DecodedVideo
from videollm.model.presets import build_tiny_model_and_processor
from videollm.data.dataset import SAMPLE_ID, SAMPLE_IDS, VideoCollator
from videollm.train.guards import NonFiniteTrainingError
from videollm.train.sft import VideoSFTConfig, VideoSFTTrainer

FRAMES = 2


def clip(seed: int) -> DecodedVideo:
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (FRAMES, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return DecodedVideo(frames, indices=list(range(FRAMES)), timestamps=[0.0, 0.5], duration=1.0, path=f"clip{seed}")


class Samples(torch.utils.data.Dataset):
    """Encoded samples in memory, by id; an id starting with "nan" gets NaN frames (a corrupt video)."""

    def __init__(self, processor, ids: list[str]):
        self.items = []
        for seed, sample_id in enumerate(ids):
            messages = [{"role": "user", "content": "<video>\nWhat color?"}, {"role": "assistant", "content": "red"}]
            features = processor.encode(messages, [clip(seed)], sample_id=sample_id).as_features()
            if sample_id.startswith("nan"):
                features["pixel_values_videos"] = torch.full_like(features["pixel_values_videos"], float("nan"))
            self.items.append({**features, SAMPLE_ID: sample_id})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class Snapshots(TrainerCallback):
    """The trainable parameters after every optimizer step."""

    def __init__(self):
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def make_trainer(tmp_path: Path, ids: list[str], **overrides) -> VideoSFTTrainer:
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=FRAMES))
    settings = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", per_device_train_batch_size=1,
        max_steps=len(ids), learning_rate=1e-2, warmup_steps=0, logging_steps=1, save_strategy="no",
        train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    args = VideoSFTConfig(**{**settings, **overrides})
    return VideoSFTTrainer(
        model=model, args=args, train_dataset=Samples(processor, ids), data_collator=VideoCollator(processor, sample_ids=True),
        processing_class=processor,
    )  # fmt: skip


def test_a_nan_step_is_skipped_counted_and_named(tmp_path, caplog):
    trainer = make_trainer(tmp_path, ["a", "nan-b", "c", "d"])
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    with caplog.at_level(logging.WARNING, logger="videollm.train.guards"):
        trainer.train()

    one, two, three, four = snapshots.after_step
    assert all(not torch.equal(initial[n], one[n]) for n in initial if "lm_head" in n)  # step 1 trained
    assert all(torch.equal(one[n], two[n]) for n in one)  # step 2 (NaN frames) changed nothing
    assert any(not torch.equal(two[n], three[n]) for n in two)  # and training went on
    assert all(torch.isfinite(p).all() for p in four.values())
    assert trainer.nonfinite_guard.skipped == 1 and trainer.state.global_step == 4
    # No optimizer update for the skipped step: AdamW counted 3 steps for every parameter.
    assert {int(state["step"]) for state in trainer.optimizer.state.values()} == {3}
    assert [e["nonfinite_steps"] for e in trainer.state.log_history if "loss" in e] == [0, 1, 1, 1]
    assert "step 2: non-finite loss or gradient, update skipped" in caplog.text and "nan-b" in caplog.text


def test_too_many_nonfinite_steps_in_a_row_stop_the_run_naming_the_samples(tmp_path):
    trainer = make_trainer(tmp_path, ["a", "nan-b", "c", "nan-d", "nan-e", "f"], max_nonfinite_steps=2)
    with pytest.raises(NonFiniteTrainingError, match=r"2 optimizer steps in a row .*max_nonfinite_steps=2") as error:
        trainer.train()
    assert "nan-d" in str(error.value) and "nan-e" in str(error.value) and "nan-b" not in str(error.value)
    assert trainer.state.global_step == 4  # stopped at step 5, before its (skipped) update was counted


def test_the_counts_survive_a_resume(tmp_path):
    trainer = make_trainer(tmp_path, ["a", "nan-b", "c"], save_strategy="steps", save_steps=2)
    trainer.train()
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["NonFiniteGuard"]["attributes"] == {"skipped": 1, "consecutive": 1}

    resumed = make_trainer(tmp_path, ["a", "nan-b", "c", "nan-d"], save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint="latest")
    assert resumed.nonfinite_guard.skipped == 2  # 1 restored from the checkpoint + nan-d


# ---- distributed guard rails: a rank whose batch has no video runs the same modules as one whose batch has ----------


def module_calls(model: torch.nn.Module, names: tuple[str, ...] = ("vision_tower", "projector", "language_model")):
    """Hooks that record, in order, which of the model's parts run their forward (what ZeRO-3/FSDP gather)."""
    calls: list[str] = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hooks = [getattr(base.model, name).register_forward_hook(lambda *_, n=name: calls.append(n)) for name in names]
    return calls, hooks


def preference_example(sample_id: str, video: bool) -> dict:
    prompt = [{"role": "user", "content": ("<video>\n" if video else "") + "Which way does it move?"}]
    return {
        "id": sample_id, "prompt": prompt, "chosen": "left", "rejected": "right", "videos": [clip(0)] if video else [],
        "chosen_phrases": [], "rejected_phrases": [],
    }  # fmt: skip


def test_dpo_text_only_batch_runs_the_vision_path_as_a_video_batch_does(tmp_path):
    from videollm.model.checkpoint import load_model, save_checkpoint
    from videollm.model.trainable import TrainablePolicy, apply_trainable_policy
    from videollm.train.dpo import PreferenceCollator, VideoDPOConfig, VideoDPOTrainer, build_preference_dataset

    torch.manual_seed(0)
    save_checkpoint(*build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=FRAMES)), tmp_path / "base")
    base, processor = load_model(tmp_path / "base")
    model = apply_trainable_policy(base, TrainablePolicy(llm="lora", projector="full", lora_r=4, lora_dropout=0.0))
    rows = [preference_example("p", video=False)]
    args = VideoDPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
        per_device_train_batch_size=1,
    )  # fmt: skip
    dataset = build_preference_dataset(rows, processor, cache_dir=str(tmp_path / "datasets"))
    trainer = VideoDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    collate = PreferenceCollator(processor)
    trainer.model.train()
    sequences = {}
    for name, video in (("video", True), ("text", False)):
        calls, hooks = module_calls(trainer.model)
        batch = collate([preference_example(name, video)])
        assert batch[SAMPLE_IDS] == [name] and ("pixel_values_videos" in batch) == video
        trainer.model.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, batch).backward()
        sequences[name] = calls
        for hook in hooks:
            hook.remove()
        projector_grads = [p.grad for n, p in trainer.model.named_parameters() if "projector" in n and p.requires_grad]
        assert projector_grads and all(g is not None and torch.isfinite(g).all() for g in projector_grads)
        if not video:  # the blank frame reaches the projector's weights with a zero gradient, and nothing else
            assert all(not g.any() for g in projector_grads)
    assert sequences["text"] == sequences["video"]
    assert sequences["video"][:3] == ["vision_tower", "projector", "projector"]  # tower once, policy + reference


def test_sharded_vision_weights_run_the_blank_frame_without_gradients_too():
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=FRAMES))
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    batch = processor.collate([processor.encode(messages).as_features()])
    model.eval()

    def tower_runs() -> int:
        calls, hooks = module_calls(model, ("vision_tower",))
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for hook in hooks:
            hook.remove()
        return len(calls)

    assert tower_runs() == 0  # one process, or DDP: no collective in a no-grad forward, nothing to keep in step
    next(model.model.vision_tower.parameters()).ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert tower_runs() == 1  # an evaluation forward on a text-only rank gathers the tower like the video ranks
    calls, _ = module_calls(model, ("vision_tower",))
    prompt = processor([messages[:1]])
    generated = model.generate(**prompt, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3
    assert calls == ["vision_tower"]  # in the prefill only: no rank has video in a decoding step
