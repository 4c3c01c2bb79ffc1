"""Video DPO on TRL's DPOTrainer (videollm.train.dpo, recipes/dpo.py) with a tiny model on tiny synthetic data."""

from __future__ import annotations

import copy
import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from data_tools.cache_features import main as cache_features
from videollm.data.feature_cache import FeatureCache, FeatureCacheError, FeatureCacheWriter, cache_identity
from videollm.data.formats import DataValidationError, load_preferences
from videollm.data.processor import VideoLLMProcessor
from videollm.data.robust import BadSamplePolicy
from videollm.data.sampling import SamplingSpec
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.data.video import write_video
from videollm.model.checkpoint import load_model, save_checkpoint
from videollm.model.modeling import VideoLLMForConditionalGeneration
from videollm.model.presets import build_tiny_model_and_processor
from videollm.model.trainable import TrainablePolicy, apply_trainable_policy, unwrap
from videollm.train.config import parse_config
from videollm.train.dpo import (
    TRL_LOSS_TYPES,
    PreferenceCollator,
    VideoDPOConfig,
    VideoDPOTrainer,
    build_preference_dataset,
    preference_rows,
    train_dpo,
)
from videollm.train.hardware import upcast_trainable_parameters
from videollm.train.losses import NO_PHRASE, gather_logprobs

from commands import REPO, run, two_cpu_processes

FRAMES = 4
LOGGED_EVERY_STEP = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(SyntheticConfig(output_dir=str(root), num_train=8, num_eval=4, num_test=4))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A full tiny checkpoint, like the SFT model DPO starts from (LoRA needs a saved base)."""
    path = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=FRAMES))
    save_checkpoint(model, processor, path)
    return path


@pytest.fixture(scope="module")
def base(checkpoint) -> VideoLLMForConditionalGeneration:
    return load_model(checkpoint)[0]


@pytest.fixture(scope="module")
def processor(checkpoint) -> VideoLLMProcessor:
    return VideoLLMProcessor.from_pretrained(checkpoint)  # one decode worker for the whole module


@pytest.fixture(scope="module")
def rows(synthetic):
    return preference_rows(load_preferences(synthetic / "preference_train.jsonl", video_root=synthetic))


@pytest.fixture(scope="module")
def dataset(rows, processor, tmp_path_factory):
    return build_preference_dataset(rows, processor, cache_dir=str(tmp_path_factory.mktemp("datasets")))


def lora(base, projector: str = "frozen"):
    policy = TrainablePolicy(llm="lora", projector=projector, lora_r=4, lora_dropout=0.0)
    return apply_trainable_policy(copy.deepcopy(base), policy)


def dpo_config(tmp_path: Path, **overrides) -> VideoDPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
        warmup_steps=0, use_cpu=True, bf16=False, gradient_checkpointing=False, logging_steps=1, report_to="none",
        save_strategy="no", dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    return VideoDPOConfig(**{**settings, **overrides})


def trainer_for(model, processor, dataset, args) -> VideoDPOTrainer:
    return VideoDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)


def move_off_reference(trainer: VideoDPOTrainer, seed: int = 0) -> None:
    """Give every trainable tensor a random offset, so that the policy differs from the reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def per_token_logps(model, batch) -> torch.Tensor:
    """Answer-token log-probs the plain way: full logits, every row with its own copy of its video's frames."""
    frames, counts = batch["pixel_values_videos"], batch["video_num_frames"]
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values_videos=torch.cat([frames, frames]),
            video_num_frames=torch.cat([counts, counts]),
        ).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    return gather_logprobs(logits[:, :-1], labels)[1]


def sequence_logps(model, batch) -> torch.Tensor:
    return per_token_logps(model, batch).sum(-1)


# ---- data -------------------------------------------------------------------------------------------------------------


def test_collator_encodes_each_video_once_with_chosen_rows_then_rejected_rows(processor, dataset, monkeypatch):
    examples = [dataset[0], dataset[1]]
    normalised = []
    pixel_values = processor.pixel_values
    monkeypatch.setattr(processor, "pixel_values", lambda video: normalised.append(video.path) or pixel_values(video))
    batch = PreferenceCollator(processor)(examples)
    assert normalised == [examples[0]["videos"][0], examples[1]["videos"][0]]  # once per pair, not per answer
    assert batch["input_ids"].shape[0] == 4
    assert batch["pixel_values_videos"].shape[0] == 2 * FRAMES and batch["video_num_frames"].tolist() == [FRAMES, FRAMES]
    tokenizer = processor.tokenizer
    expected = [(examples[0], "chosen"), (examples[1], "chosen"), (examples[0], "rejected"), (examples[1], "rejected")]
    for row, (example, side) in enumerate(expected):
        answer_ids = batch["input_ids"][row][batch["completion_mask"][row].bool()]
        assert tokenizer.decode(answer_ids).startswith(example[side])
    assert "labels" not in batch  # TRL builds labels from completion_mask; a second copy would reach the model


def test_marked_phrases_map_to_their_tokens(processor, rows):
    marked = dict(rows[0], chosen="the square moves left", rejected="the square moves right")
    marked.update(chosen_phrases=["left"], rejected_phrases=["right"])
    unmarked = dict(rows[1], chosen_phrases=[], rejected_phrases=[])
    batch = PreferenceCollator(processor, mark_phrases=True)([marked, unmarked])
    phrase_ids, completion = batch["phrase_ids"], batch["completion_mask"].bool()
    decode = processor.tokenizer.decode
    assert decode(batch["input_ids"][0][phrase_ids[0] == 0]).strip() == "left"
    assert decode(batch["input_ids"][2][phrase_ids[2] == 0]).strip() == "right"
    assert (phrase_ids[0][completion[0]] == NO_PHRASE).any()  # "the square moves" and the end of turn are outside
    for row in (1, 3):  # no marked phrases: the whole answer is one phrase
        assert (phrase_ids[row][completion[row]] == 0).all() and (phrase_ids[row][~completion[row]] == NO_PHRASE).all()


def test_phrases_missing_from_their_answer_are_reported_up_front(synthetic):
    records = load_preferences(synthetic / "preference_train.jsonl", video_root=synthetic)
    records[1].meta["chosen_phrases"] = ["sideways"]
    with pytest.raises(DataValidationError, match=r"preference_train.jsonl:2: chosen_phrases: \['sideways'\]"):
        preference_rows(records)


# ---- efficiency: encode once, no reference copy, cached reference ----------------------------------------------------


@pytest.fixture(scope="module")
def trained(base, processor, dataset, tmp_path_factory):
    """Two logged DPO steps of a LoRA model with the vision tower and projector frozen, counting encoder calls."""
    trainer = trainer_for(lora(base), processor, dataset, dpo_config(tmp_path_factory.mktemp("trained")))
    video_llm = unwrap(trainer.model).model
    frames_per_call, projector_calls = [], []
    video_llm.vision_tower.register_forward_hook(
        lambda module, args, kwargs, output: frames_per_call.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    video_llm.projector.register_forward_hook(lambda *args: projector_calls.append(1))
    trainer.train()
    return trainer, frames_per_call, projector_calls


def test_vision_tower_runs_once_per_video_per_step(trained):
    trainer, frames_per_call, projector_calls = trained
    # 2 steps x 2 pairs x 4 frames: one call a step for policy and reference, chosen and rejected together
    assert frames_per_call == [2 * FRAMES, 2 * FRAMES]
    assert len(projector_calls) == 2


def test_rewards_margins_accuracies_and_chosen_logps_logged_every_step(trained):
    trainer, _, _ = trained
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    for entry in logged:
        assert all(key in entry and isinstance(entry[key], float) for key in LOGGED_EVERY_STEP), entry


def test_reference_is_the_policy_with_lora_disabled_and_copies_no_weights(base, processor, dataset, tmp_path):
    model = lora(base)
    frozen_storage = {p.untyped_storage().data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainer = trainer_for(model, processor, dataset, dpo_config(tmp_path))
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    after = {p.untyped_storage().data_ptr() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert after == frozen_storage
    assert sum(p.numel() * p.element_size() for p in trainer.model.parameters()) == parameter_bytes

    move_off_reference(trainer)
    batch = trainer.data_collator([dataset[0], dataset[1]])
    reference = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    with trainer.model.disable_adapter():
        assert torch.allclose(reference, sequence_logps(trainer.model, batch), atol=1e-4)
    assert not torch.allclose(reference, sequence_logps(trainer.model, batch), atol=1e-2)


def test_full_fine_tuning_keeps_a_frozen_reference_copy_unless_precomputed(base, processor, dataset, tmp_path):
    full = apply_trainable_policy(copy.deepcopy(base), TrainablePolicy(llm="full", projector="frozen"))
    trainer = trainer_for(full, processor, dataset, dpo_config(tmp_path))
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    batch = trainer.data_collator([dataset[0], dataset[1]])
    with torch.no_grad():
        assert torch.allclose(trainer.compute_loss(trainer.model, batch), torch.log(torch.tensor(2.0)), atol=1e-6)

    cached = trainer_for(copy.deepcopy(full), processor, dataset, dpo_config(tmp_path, precompute_ref_log_probs=True))
    assert cached.ref_model is None and "ref_chosen_logps" in cached.train_dataset.column_names


def test_trained_projector_is_left_out_of_the_reference(base, processor, dataset, tmp_path):
    """A trained projector differs from the reference's: the reference encodes with the original one."""
    trainer = trainer_for(lora(base, projector="full"), processor, dataset, dpo_config(tmp_path))
    move_off_reference(trainer)  # also moves the trained projector copy
    batch = trainer.data_collator([dataset[0], dataset[1]])
    reference = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    with trainer.model.disable_adapter():
        assert torch.allclose(reference, sequence_logps(trainer.model, batch), atol=1e-4)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    projector = unwrap(trainer.model).model.projector
    assert all(p.grad is not None for p in projector.modules_to_save["default"].parameters())


def test_cached_reference_logps_give_the_loss_of_computed_ones(base, processor, dataset, tmp_path):
    args = dpo_config(tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=4)
    trainer = trainer_for(lora(base), processor, dataset, args)
    cached = trainer.train_dataset
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(cached.column_names)

    # the cache is a file next to the dataset: a second run with the same data and model does not run the model
    calls = []
    second = lora(base)
    unwrap(second).model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    again = trainer_for(second, processor, dataset, args)
    assert calls == [] and again.train_dataset["ref_chosen_logps"] == cached["ref_chosen_logps"]

    move_off_reference(trainer)
    with_cache = trainer.data_collator([cached[0], cached[1]])
    without = trainer.data_collator([dataset[0], dataset[1]])
    assert "ref_chosen_logps" in with_cache and "ref_chosen_logps" not in without
    with torch.no_grad():
        loss_cached = trainer.compute_loss(trainer.model, with_cache)
        loss_computed = trainer.compute_loss(trainer.model, without)
        computed = torch.cat(trainer.compute_ref_log_probs(trainer.model, without))
    assert torch.allclose(loss_cached, loss_computed, atol=1e-6)
    assert torch.allclose(torch.cat([with_cache["ref_chosen_logps"], with_cache["ref_rejected_logps"]]), computed, atol=1e-5)


# ---- loss types -------------------------------------------------------------------------------------------------------


def loss_from_cli(base, processor, dataset, tmp_path, *argv: str) -> torch.Tensor:
    """Parse the trainer config as the recipe does, build a trainer, and return the loss of a fixed batch."""
    cpu = ["--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none"]
    (args,) = parse_config([VideoDPOConfig], [*argv, "--output_dir", str(tmp_path / "out"), *cpu])
    trainer = trainer_for(lora(base), processor, dataset, args)
    move_off_reference(trainer)
    batch = trainer.data_collator([dataset[0], dataset[1]])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters() if p.requires_grad)
    return loss.detach()


@pytest.mark.parametrize("loss_type", [*TRL_LOSS_TYPES, "rrpo"])
def test_every_loss_type_trains_from_config(base, processor, dataset, tmp_path, loss_type):
    extra = ["--label_smoothing", "0.1"] if loss_type == "exo_pair" else []
    loss = loss_from_cli(base, processor, dataset, tmp_path, "--loss_type", loss_type, *extra)
    assert torch.isfinite(loss)


def test_weighted_loss_mix_is_the_weighted_sum(base, processor, dataset, tmp_path):
    mixed = loss_from_cli(base, processor, dataset, tmp_path, "--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.1")
    sigmoid = loss_from_cli(base, processor, dataset, tmp_path, "--loss_type", "sigmoid")
    sft = loss_from_cli(base, processor, dataset, tmp_path, "--loss_type", "sft")
    assert torch.allclose(mixed, sigmoid + 0.1 * sft, atol=1e-6)


def test_rrpo_without_marked_phrases_and_kl_is_sigmoid_dpo(base, processor, dataset, tmp_path):
    rrpo = loss_from_cli(base, processor, dataset, tmp_path, "--loss_type", "rrpo", "--rrpo_alpha", "0")
    sigmoid = loss_from_cli(base, processor, dataset, tmp_path, "--loss_type", "sigmoid")
    assert torch.allclose(rrpo, sigmoid, atol=1e-5)
    with_kl = loss_from_cli(base, processor, dataset, tmp_path, "--loss_type", "rrpo", "--rrpo_alpha", "1.0")
    assert with_kl > rrpo  # the policy was moved off the reference, so the KL term is positive


def test_rrpo_rewards_only_the_marked_phrases(base, processor, rows, tmp_path):
    marked = [
        dict(rows[0], chosen="the square moves left", rejected="the square moves right",
             chosen_phrases=["left"], rejected_phrases=["right"]),
        dict(rows[1], chosen="a red circle going up", rejected="a blue circle going down",
             chosen_phrases=["red", "up"], rejected_phrases=["blue", "down"]),
    ]  # fmt: skip
    dataset = build_preference_dataset(marked, processor, cache_dir=str(tmp_path / "datasets"))
    args = dpo_config(tmp_path, loss_type=["rrpo"], rrpo_alpha=0.0, beta=0.5)
    trainer = trainer_for(lora(base), processor, dataset, args)
    move_off_reference(trainer)
    batch = trainer.data_collator([dataset[0], dataset[1]])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        policy = per_token_logps(trainer.model, batch)
        with trainer.model.disable_adapter():
            reference = per_token_logps(trainer.model, batch)
    in_phrase = batch["phrase_ids"][:, 1:] >= 0
    rewards = 0.5 * ((policy - reference) * in_phrase).sum(1)
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(rewards[:2] - rewards[2:]).mean(), atol=1e-6)
    decode = processor.tokenizer.decode
    phrase = batch["phrase_ids"][:, 1:]
    words = [[decode(batch["input_ids"][row][1:][phrase[row] == k]).strip() for k in (0, 1)] for row in range(4)]
    assert words == [["left", ""], ["red", "up"], ["right", ""], ["blue", "down"]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss_type", "simgoid"], r"loss_type: \['simgoid'\] unknown"),
        (["--loss_type", "rrpo", "hinge"], r"rrpo combines only with sft"),
        (["--loss_type", "rrpo", "--precompute_ref_log_probs", "true"], r"precompute_ref_log_probs: false"),
        (["--loss_type", "sigmoid", "sft", "--loss_weights", "1.0"], r"loss_weights"),
    ],
)
def test_bad_loss_settings_fail_before_training(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_config([VideoDPOConfig], [*argv, "--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"])
    assert re.search(message, capsys.readouterr().err)


# ---- feature cache ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_caches(synthetic, checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Caches of every video of the preference file, written by the command-line tool from DPO keys: tower level
    (the projector trains) and projector level (both frozen)."""
    caches = {}
    for level, projector in (("tower", "full"), ("projector", "frozen")):
        cache_dir = tmp_path_factory.mktemp(f"{level}_cache")
        assert cache_features([
            "--recipe", "dpo", "--model_name_or_path", str(checkpoint), "--tune_vision", "frozen",
            "--tune_projector", projector, "--tune_llm", "lora", "--loss_type", "sigmoid", "sft",
            "--loss_weights", "1.0", "0.1", "--train_file", str(synthetic / "preference_train.jsonl"),
            "--video_root", str(synthetic), "--feature_cache_dir", str(cache_dir), "--output_dir", str(cache_dir / "unused"),
            "--use_cpu", "true", "--report_to", "none", "--dataloader_num_workers", "0",
        ]) == 0  # fmt: skip
        caches[level] = cache_dir
    return caches


def vision_calls(model) -> dict[str, list[int]]:
    """Counts the forwards of the vision tower and the projector (the trained copy and the reference's original)."""
    calls = {"vision_tower": [], "projector": []}
    for part, counted in calls.items():
        getattr(unwrap(model).model, part).register_forward_hook(lambda *args, counted=counted: counted.append(1))
    return calls


@pytest.mark.parametrize("level, projector", [("tower", "full"), ("projector", "frozen")])
def test_cached_features_give_the_dpo_loss_of_decoded_videos(base, processor, dataset, feature_caches, synthetic, tmp_path, level, projector):
    live = trainer_for(lora(base, projector), processor, dataset, dpo_config(tmp_path))
    model = lora(base, projector)
    cache = FeatureCache.open(feature_caches[level], model, processor, video_root=synthetic)
    assert cache.level == level
    unwrap(model).use_cached_vision(cache.level)
    cached = VideoDPOTrainer(
        model=model, args=dpo_config(tmp_path), train_dataset=dataset, processing_class=processor,
        data_collator=PreferenceCollator(processor, load_video=cache.get),
    )  # fmt: skip
    move_off_reference(live)
    move_off_reference(cached)  # the same offsets: the policies are equal and differ from their references
    examples = [dataset[0], dataset[3]]
    cached_batch = cached.data_collator(examples)
    assert "pixel_values_videos" not in cached_batch and {"tower": "video_frame_features", "projector": "video_embeds"}[level] in cached_batch
    live_batch = live.data_collator(examples)
    assert torch.equal(cached_batch["input_ids"], live_batch["input_ids"])

    calls = vision_calls(cached.model)
    cached_loss = cached.compute_loss(cached.model, cached_batch)
    live_loss = live.compute_loss(live.model, live_batch)
    assert calls["vision_tower"] == []  # the cache replaced the tower
    assert len(calls["projector"]) == (2 if level == "tower" else 0)  # policy and reference projections, or none
    assert torch.allclose(cached_loss, live_loss, atol=1e-5)
    cached_loss.backward()
    live_loss.backward()
    cached_grads = {n: p.grad for n, p in cached.model.named_parameters() if p.requires_grad}
    live_grads = {n: p.grad for n, p in live.model.named_parameters() if p.requires_grad}
    assert cached_grads.keys() == live_grads.keys()
    assert all(torch.allclose(cached_grads[n], live_grads[n], atol=1e-4) for n in live_grads)


@pytest.mark.parametrize("level, projector", [("tower", "full"), ("projector", "frozen")])
def test_text_only_pairs_in_a_cached_run_skip_what_video_pairs_skip(base, processor, feature_caches, synthetic, tmp_path, level, projector):
    model = lora(base, projector)
    cache = FeatureCache.open(feature_caches[level], model, processor, video_root=synthetic)
    unwrap(model).use_cached_vision(cache.level)
    trainer = VideoDPOTrainer(
        model=model, args=dpo_config(tmp_path), train_dataset=Dataset.from_list([TEXT_ONLY_PAIR]), processing_class=processor,
        data_collator=PreferenceCollator(processor, load_video=cache.get),
    )  # fmt: skip
    calls = vision_calls(trainer.model)
    loss = trainer.compute_loss(trainer.model, trainer.data_collator([TEXT_ONLY_PAIR]))
    loss.backward()
    assert calls["vision_tower"] == []
    if level == "tower":  # the trained projector still runs (on blank features) and gets a zero gradient
        projector_params = list(unwrap(trainer.model).model.projector.modules_to_save["default"].parameters())
        assert calls["projector"] and all(p.grad is not None and not p.grad.any() for p in projector_params)
    else:
        assert calls["projector"] == []


TEXT_ONLY_PAIR = {
    "id": "text", "prompt": [{"role": "user", "content": "Say yes."}], "chosen": "yes", "rejected": "no",
    "videos": [], "chosen_phrases": [], "rejected_phrases": [],
}  # fmt: skip


def test_rounds_train_from_the_cache_without_running_the_tower(base, processor, dataset, feature_caches, synthetic, tmp_path):
    tower_forwards = []

    def count_towers(module, args, output):
        if isinstance(module, type(base.model.vision_tower)):
            tower_forwards.append(1)

    policy = TrainablePolicy(llm="lora", projector="full", lora_r=4, lora_dropout=0.0)
    model = apply_trainable_policy(copy.deepcopy(base), policy)
    with torch.nn.modules.module.register_module_forward_hook(count_towers):
        trainer = train_dpo(
            model, processor, [dataset, dataset], None, dpo_config(tmp_path, max_steps=1), policy,
            feature_cache_dir=feature_caches["tower"], video_root=synthetic,
        )  # fmt: skip
    assert tower_forwards == []  # neither round, nor round 2's fresh model, ran the tower
    assert trainer.state.global_step == 1 and (tmp_path / "out" / "round_2" / "trainer_state.json").is_file()


def test_the_cache_tool_reads_every_round_file_of_a_dpo_config(synthetic, checkpoint, tmp_path, capsys):
    other = tmp_path / "other.mp4"
    write_video(other, np.zeros((8, 16, 16, 3), dtype=np.uint8))
    record = {"id": "o", "video": str(other), "prompt": "<video>\nWhat moves?", "chosen": "a", "rejected": "b"}
    second_round = tmp_path / "round_2.jsonl"
    second_round.write_text(json.dumps(record) + "\n")
    argv = [
        "--recipe", "dpo", "--model_name_or_path", str(checkpoint), "--tune_projector", "frozen", "--tune_llm", "lora",
        "--round_train_files", str(synthetic / "preference_train.jsonl"), str(second_round), "--video_root", str(synthetic),
        "--feature_cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "unused"), "--use_cpu", "true",
        "--report_to", "none", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    assert cache_features(argv) == 0
    assert "9 videos, 0 already cached" in capsys.readouterr().out  # the 8 of the first round's file and the other
    with pytest.raises(SystemExit, match=re.escape("recipe: 'ppo' is not one of sft | dpo | star | self_preference")):
        cache_features(["--recipe", "ppo", *argv[2:]])


def test_a_cache_missing_videos_of_the_run_fails_before_training(base, processor, rows, feature_caches, synthetic, tmp_path):
    other = tmp_path / "other.mp4"
    write_video(other, np.zeros((8, 16, 16, 3), dtype=np.uint8))
    uncached = build_preference_dataset([*rows[:2], {**rows[0], "id": "other", "videos": [str(other)]}], processor)
    policy = TrainablePolicy(llm="lora", projector="full", lora_r=4, lora_dropout=0.0)
    model = apply_trainable_policy(copy.deepcopy(base), policy)
    with pytest.raises(FeatureCacheError, match="1 videos are not cached.*other.mp4"):
        train_dpo(model, processor, [uncached], None, dpo_config(tmp_path), policy,
                  feature_cache_dir=feature_caches["tower"], video_root=synthetic)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_video_the_cache_builder_could_not_read_goes_to_the_bad_sample_policy(base, processor, rows, feature_caches, synthetic, tmp_path):
    cache_dir = tmp_path / "cache"
    shutil.copytree(feature_caches["tower"], cache_dir)
    policy = TrainablePolicy(llm="lora", projector="full", lora_r=4, lora_dropout=0.0)
    model = apply_trainable_policy(copy.deepcopy(base), policy)
    broken = rows[0]["videos"][0]
    assert [row["videos"][0] == broken for row in rows[:4]] == [True, True, True, False]
    writer = FeatureCacheWriter(cache_dir, cache_identity(model, processor, "tower"), video_root=synthetic)
    writer.add_unreadable(broken, "moov atom not found")
    writer.close()
    quarantine = tmp_path / "quarantine.jsonl"
    bad_samples = BadSamplePolicy(max_bad_fraction=1.0, quarantine_file=str(quarantine))
    trainer = train_dpo(
        model, processor, [build_preference_dataset(rows[:4], processor)], None, dpo_config(tmp_path), policy, bad_samples,
        feature_cache_dir=cache_dir, video_root=synthetic,
    )  # fmt: skip
    assert trainer.state.global_step == 2 and trainer.data_collator.guards["train"].bad == 3
    reasons = {json.loads(line)["reason"] for line in quarantine.read_text().splitlines()}
    assert reasons == {"moov atom not found (when the feature cache was built)"}


@pytest.mark.parametrize("level", ["tower", "projector"])
def test_dpo_recipe_reads_the_cache_or_says_why_not(synthetic, checkpoint, feature_caches, tmp_path, monkeypatch, capsys, level):
    """The recipe, training the projector, trains from the tower-level cache; the projector-level one holds outputs of
    the projector it would train, so it stops the run with one line before any step."""
    monkeypatch.setattr(sys, "argv", [
        "dpo.py", "--config", "recipes/configs/dpo_tiny.yaml", "--model_name_or_path", str(checkpoint),
        "--tune_projector", "full", "--train_file", str(synthetic / "preference_train.jsonl"), "--video_root", str(synthetic),
        "--feature_cache_dir", str(feature_caches[level]), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0",
    ])  # fmt: skip
    if level == "tower":
        runpy.run_path(str(REPO / "recipes" / "dpo.py"), run_name="__main__")
        assert "finished after 1 steps" in capsys.readouterr().out
        return
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "recipes" / "dpo.py"), run_name="__main__")
    assert str(stop.value.code).startswith("error: feature_cache_dir") and "no tower-level cache" in str(stop.value.code)
    assert not (tmp_path / "out" / "trainer_state.json").exists()


# ---- rounds (mrDPO) ---------------------------------------------------------------------------------------------------


def test_second_round_reference_is_the_first_rounds_merged_policy(base, processor, dataset, tmp_path):
    policy = TrainablePolicy(llm="lora", projector="frozen", lora_r=4, lora_dropout=0.0)
    model = apply_trainable_policy(copy.deepcopy(base), policy)
    trainer = train_dpo(model, processor, [dataset, dataset], None, dpo_config(tmp_path, learning_rate=5e-2), policy)
    out = tmp_path / "out"
    batch = trainer.data_collator([dataset[0], dataset[1]])

    round_1, _ = load_model(out / "round_1", merge=True)
    merged = VideoLLMForConditionalGeneration.from_pretrained(out / "round_1" / "merged").eval()
    round_1_logps = sequence_logps(round_1, batch)
    assert torch.allclose(sequence_logps(merged, batch), round_1_logps, atol=1e-5)
    assert not torch.allclose(sequence_logps(base.eval(), batch), round_1_logps, atol=1e-3)  # round 1 learned

    with trainer.model.disable_adapter():  # round 2's reference
        assert torch.allclose(sequence_logps(trainer.model.eval(), batch), round_1_logps, atol=1e-5)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert Path(adapter_config["base_model_name_or_path"]) == (out / "round_1" / "merged").resolve()
    final, _ = load_model(out)
    with final.disable_adapter():
        assert torch.allclose(sequence_logps(final, batch), round_1_logps, atol=1e-5)
    first_step = json.loads((out / "round_2" / "trainer_state.json").read_text())["log_history"][0]
    assert first_step["rewards/chosen"] == 0.0 and first_step["rewards/rejected"] == 0.0  # fresh LoRA == reference


def test_a_rounds_weights_are_released_before_the_next_round_loads(base, processor, dataset, tmp_path, monkeypatch):
    """Round 2's model (and its merged copy) must be gone when round 3's is loaded: kept alive, each transition holds
    two models at once, twice the weights in accelerator memory. (Round 1's is the caller's.)"""
    import gc
    import weakref

    import videollm.train.dpo as dpo

    loaded, alive_at_load = [], []
    fresh_lora = dpo._fresh_lora

    def loading(*args):
        gc.collect()
        alive_at_load.append([ref() is not None for ref in loaded])
        model = fresh_lora(*args)
        loaded.append(weakref.ref(unwrap(model)))
        return model

    monkeypatch.setattr(dpo, "_fresh_lora", loading)
    policy = TrainablePolicy(llm="lora", projector="frozen", lora_r=4, lora_dropout=0.0)
    model = apply_trainable_policy(copy.deepcopy(base), policy)
    train_dpo(model, processor, [dataset] * 3, None, dpo_config(tmp_path), policy)
    assert alive_at_load == [[], [False]]


def test_later_rounds_keep_the_first_rounds_dtypes_and_attention(checkpoint, processor, dataset, tmp_path):
    # a merged checkpoint alone would load in its widest stored dtype (fp32) with the default attention
    policy = TrainablePolicy(llm="lora", projector="frozen", lora_r=4, lora_dropout=0.0)
    model, _ = load_model(checkpoint, dtype=torch.bfloat16)
    model.set_attn_implementation({"vision_config": "eager", "text_config": "eager"})
    model = apply_trainable_policy(model, policy)
    upcast_trainable_parameters(model)
    trainer = train_dpo(model, processor, [dataset, dataset], None, dpo_config(tmp_path, bf16=True), policy)
    round_2 = trainer.model
    assert {p.dtype for p in round_2.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in round_2.parameters() if p.requires_grad} == {torch.float32}
    config = unwrap(round_2).config
    assert (config.vision_config._attn_implementation, config.text_config._attn_implementation) == ("eager", "eager")


# ---- the recipe ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [[], ["--rounds", "2", "--precompute_ref_log_probs", "true"], ["--feature_cache_dir", "projector"]],
    ids=["dpo", "mrdpo_cached", "dpo_feature_cache"],
)
def test_two_process_ddp_dpo_on_cpu(synthetic, checkpoint, feature_caches, tmp_path, extra):
    out = tmp_path / "out"
    extra = [str(feature_caches[a]) if a in feature_caches else a for a in extra]
    result = run([*two_cpu_processes(), "recipes/dpo.py", "--config", "recipes/configs/dpo_tiny.yaml",
                  "--model_name_or_path", str(checkpoint), "--train_file", str(synthetic / "preference_train.jsonl"),
                  "--video_root", str(synthetic), "--output_dir", str(out), "--max_steps", "3",
                  "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--learning_rate", "1e-2",
                  "--warmup_steps", "0", *extra], timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    finished = sorted(re.findall(r"rank (\d) of (\d) finished after (\d+) steps", result.stdout))
    assert finished == [("0", "2", "3"), ("1", "2", "3")], result.stdout[-2000:]
    rounds = "--rounds" in extra
    state = out / ("round_2" if rounds else ".") / "trainer_state.json"
    logged = [e for e in json.loads(state.read_text())["log_history"] if "loss" in e]
    assert len(logged) == 3 and all(key in e for e in logged for key in LOGGED_EVERY_STEP)
    model, _ = load_model(out)
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # the adapter trained
    if rounds:  # the reference log-probs cached for round 2 are those of round 1's merged model: a fresh LoRA scores 0
        # equal up to float noise: cache and policy forward see different padding under DDP
        assert abs(logged[0]["rewards/chosen"]) < 1e-5 and abs(logged[0]["rewards/rejected"]) < 1e-5
        assert model.peft_config["default"].base_model_name_or_path == str((out / "round_1" / "merged").resolve())
    else:
        assert model.peft_config["default"].base_model_name_or_path == str(checkpoint)
