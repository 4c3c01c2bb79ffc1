"""Self-training runs (videollm.selftrain.star / self_preference / runs): provenance, resumption, pairs, recipes.

A tiny random model cannot answer the synthetic questions, so these tests check the mechanics with a verifier that
accepts some of its answers (`even_length`, by dotted path: the plug-in route users take).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import videollm.eval.scoring as scoring
import videollm.selftrain.runs as runs
from data_tools.cache_features import main as cache_features
from videollm.data.formats import LabelledRecord, load_conversations, load_preferences
from videollm.data.sampling import SamplingSpec
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.data.feature_cache import encode_videos
from videollm.data.video import CachedVideo, DecodedVideo
from videollm.model.checkpoint import is_adapter_checkpoint, load_model, save_checkpoint
from videollm.model.presets import build_tiny_model_and_processor
from videollm.selftrain.runs import Prompt, RunSettingsMismatch, SampleLog
from videollm.selftrain.self_preference import (
    ModelJudge,
    SelfPreferenceArguments,
    best_worst_pairs,
    borrowed_rejected_pairs,
    run_self_preference,
)
from videollm.selftrain.star import StarArguments, run_star, should_stop
from videollm.selftrain.verifiers import RecordVerifiers
from videollm.train.config import DataArguments, ModelArguments, parse_config
from videollm.train.dpo import VideoDPOConfig
from videollm.train.sft import VideoSFTConfig

from commands import REPO, command_env, run, two_cpu_processes

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
FRAMES = 4
PROVENANCE = {"cycle", "stage", "prompt_id", "sampler", "frame_indices", "verdict", "score", "rationalized", "answer",
              "label", "question", "prompt", "videos", "sample_index"}  # fmt: skip


def even_length(answer: str, label) -> bool:
    """A stand-in verifier that accepts about half of a random model's answers."""
    return len(answer) % 2 == 0


def answer_length(answer: str, label) -> float:
    """A stand-in score: longer answers rank higher (true at >= 0.5, i.e. 8+ characters)."""
    return min(len(answer) / 16, 1.0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(SyntheticConfig(output_dir=str(root), num_train=2, num_eval=1, num_test=0))
    return root


@pytest.fixture(scope="module")
def seed_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seed")
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=FRAMES))
    save_checkpoint(model, processor, path)
    return path


def star_config(synthetic: Path, seed_model: Path, output_dir: Path, *extra: str):
    """The recipe's four config dataclasses, parsed from the tiny YAML plus overrides, as recipes/star.py does."""
    config = parse_config([ModelArguments, DataArguments, StarArguments, VideoSFTConfig], star_argv(synthetic, seed_model, output_dir, *extra))
    config[1].decode_timeout = None  # decode in this process: a decode worker takes seconds to start, per run
    return config


def star_argv(synthetic: Path, seed_model: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "recipes/configs/star_tiny.yaml"), "--model_name_or_path", str(seed_model),
        "--train_file", str(synthetic / "labels_train.jsonl"), "--eval_file", str(synthetic / "labels_eval.jsonl"),
        "--video_root", str(synthetic), "--output_dir", str(output_dir), "--verifier", f"{__name__}:even_length",
        "--num_samples", "2", "--temperature", "1.0", "--max_new_tokens", "6", "--generation_batch_size", "2",
        "--eval_max_new_tokens", "4", "--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1",
        "--stop_when_no_gain", "false", "--tune_projector", "frozen", "--dataloader_num_workers", "0", *extra,
    ]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- one cycle: what it records -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_cycle(synthetic, seed_model, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("star") / "run"
    config = star_config(synthetic, seed_model, output_dir, "--cycles", "1")
    return output_dir, config, run_star(*config)


def test_samples_record_cycle_prompt_sampler_frames_verdict_and_rationalisation(one_cycle, synthetic):
    output_dir, (_, _, star_args, _), rows = one_cycle
    samples = read_jsonl(output_dir / "cycle_1" / "samples.jsonl")
    assert all(PROVENANCE <= set(s) for s in samples)
    answers = [s for s in samples if s["stage"] == "answer"]
    prompt_ids = [r["id"] for r in read_jsonl(synthetic / "labels_train.jsonl")]
    assert Counter(s["prompt_id"] for s in answers) == {p: 2 for p in prompt_ids}  # k=2 answers per question
    for sample in samples:
        assert sample["cycle"] == 1 and len(sample["frame_indices"]) == 1 and len(sample["frame_indices"][0]) == FRAMES
        assert sample["sampler"]["temperature"] == 1.0 and sample["sampler"]["num_return_sequences"] == 2
        assert isinstance(sample["sampler"]["seed"], int) and sample["verdict"] == even_length(sample["answer"], None)
        assert sample["rationalized"] is (sample["stage"] == "rationalize")
    failed = {p for p in prompt_ids if not any(s["verdict"] for s in answers if s["prompt_id"] == p)}
    hinted = [s for s in samples if s["stage"] == "rationalize"]
    assert failed and {s["prompt_id"] for s in hinted} == failed  # only failures are rationalised ...
    assert all(f"The correct answer is {s['label']}." in s["prompt"] for s in hinted)  # ... with the label shown


def test_training_data_pairs_the_original_question_with_verified_answers(one_cycle):
    output_dir, _, rows = one_cycle
    samples = read_jsonl(output_dir / "cycle_1" / "samples.jsonl")
    train = read_jsonl(output_dir / "cycle_1" / "train.jsonl")
    verified = {(s["prompt_id"], s["answer"]): s for s in samples if s["verdict"]}
    assert train and len({t["prompt_id"] for t in train}) == len(train)  # at most one kept answer per question
    for row in train:
        sample = verified[(row["prompt_id"], row["messages"][1]["content"])]
        assert row["rationalized"] is sample["rationalized"]
        assert row["messages"][0]["content"] == f"<video>\n{sample['question']}"  # never the label hint
    assert len(load_conversations(output_dir / "cycle_1" / "train.jsonl")) == len(train)
    row = rows[1]
    assert row["kept"] == len(train) == row["right"] + row["rationalized"]
    assert row["train_steps"] == 2 and row["kept_rate"] == pytest.approx(len(train) / row["prompts"])


def test_checkpoint_evaluation_and_summary_are_saved(one_cycle):
    output_dir, _, rows = one_cycle
    load_model(output_dir / "cycle_1" / "checkpoint")
    for cycle in (0, 1):
        summary = json.loads((output_dir / f"cycle_{cycle}" / "eval.json").read_text())
        assert summary["num_samples"] == 3 and set(summary["by_type"]) == {"direction", "color", "shape"}
        assert rows[cycle]["accuracy"] == summary["accuracy"]
    assert [r["cycle"] for r in json.loads((output_dir / "summary.json").read_text())["rows"]] == [0, 1]
    assert "kept_rate" in (output_dir / "summary.md").read_text()
    if HAS_MATPLOTLIB:  # the plot extra; without it the table is still printed and saved
        assert (output_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_with_other_settings_is_refused(one_cycle, synthetic, seed_model):
    output_dir, _, _ = one_cycle
    with pytest.raises(RunSettingsMismatch, match="temperature: 1.0 -> 0.5"):
        run_star(*star_config(synthetic, seed_model, output_dir, "--cycles", "1", "--temperature", "0.5"))


def count_tower_forwards(seed_model: Path) -> tuple[list[int], object]:
    """A hook on every vision tower of the tiny model's class, in every model loaded from now until the handle is
    removed (use it as a context manager); returns (calls, handle)."""
    tower_type = type(load_model(seed_model)[0].model.vision_tower)
    calls = []

    def hook(module, args, output):
        if isinstance(module, tower_type):
            calls.append(1)

    return calls, torch.nn.modules.module.register_module_forward_hook(hook)


def test_a_cycle_from_the_feature_cache_never_runs_the_tower_and_keeps_what_decoding_keeps(one_cycle, synthetic, seed_model, tmp_path):
    decoded_dir, _, decoded_rows = one_cycle
    cache_dir = tmp_path / "cache"
    argv = star_argv(synthetic, seed_model, tmp_path / "unused", "--cycles", "1")
    assert cache_features(["--recipe", "star", *argv, "--feature_cache_dir", str(cache_dir)]) == 0
    calls, handle = count_tower_forwards(seed_model)
    with handle:
        rows = run_star(*star_config(synthetic, seed_model, tmp_path / "run", "--cycles", "1", "--feature_cache_dir", str(cache_dir)))
    assert calls == []  # sampling, rationalising, training and evaluation all read the cache

    def outcome(summary: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k not in ("model", "minutes")} for row in summary]

    assert outcome(rows) == outcome(decoded_rows)
    for name in ("samples.jsonl", "train.jsonl"):
        ours = read_jsonl(tmp_path / "run" / "cycle_1" / name)
        assert [r.get("answer", r.get("messages")) for r in ours] == [
            r.get("answer", r.get("messages")) for r in read_jsonl(decoded_dir / "cycle_1" / name)
        ]


# ---- kill and resume -----------------------------------------------------------------------------------------------


class Interrupted(RuntimeError):
    pass


class StopTrainingAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"killed at training step {self.step}")


def counting_generate(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Count generate calls of the run, sampling and evaluation; raise on call `fail_after + 1` (a run killed after
    that many batches)."""
    calls: list[int] = []
    real = runs.generate_answers

    def generate(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted(f"killed after {fail_after} batches")
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "generate_answers", generate)
    monkeypatch.setattr(scoring, "generate_answers", generate)
    return calls


def test_killed_during_generation_and_training_resumes_to_the_same_kept_data(synthetic, seed_model, tmp_path, monkeypatch):
    extra = ("--cycles", "2", "--eval_file", str(synthetic / "labels_train.jsonl"), "--eval_limit", "2")
    reference = tmp_path / "uninterrupted"
    run_star(*star_config(synthetic, seed_model, reference, *extra))

    resumed = tmp_path / "resumed"
    config = star_config(synthetic, seed_model, resumed, *extra)
    counting_generate(monkeypatch, fail_after=2)  # cycle 0 eval (1 batch), then 1 of 3 answer batches of cycle 1
    with pytest.raises(Interrupted):
        run_star(*config)
    partial = read_jsonl(resumed / "cycle_1" / "samples.jsonl")
    assert len(partial) == 4  # one batch: 2 prompts x 2 samples
    with open(resumed / "cycle_1" / "samples.jsonl", "a") as handle:
        handle.write('{"cycle": 1, "stage": "answer", "prompt_id": "train_0')  # a write cut short by the kill

    monkeypatch.undo()
    calls = counting_generate(monkeypatch)
    with pytest.raises(Interrupted):
        run_star(*config, callbacks=[StopTrainingAt(1)])  # killed in the middle of cycle 1's training
    assert calls[:2] == [2, 2]  # the 2 answer batches left (the first one and the eval were not redone), ...
    assert not (resumed / "cycle_1" / "checkpoint" / "train_done.json").exists()

    rows = run_star(*config)
    for cycle in (1, 2):
        for name in ("train.jsonl", "samples.jsonl"):
            assert read_jsonl(resumed / f"cycle_{cycle}" / name) == read_jsonl(reference / f"cycle_{cycle}" / name), name
    assert rows[2]["kept"] == len(read_jsonl(reference / "cycle_2" / "train.jsonl"))

    calls.clear()
    again = run_star(*config)  # finished cycles are skipped: nothing is generated, trained or evaluated again
    assert calls == [] and [r["cycle"] for r in again] == [0, 1, 2]
    assert [r.get("accuracy") for r in again] == [r.get("accuracy") for r in rows]


def test_sample_log_drops_a_torn_last_line_and_prompts_missing_answers(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [{"stage": "answer", "prompt_id": p} for p in ("a", "a", "b", "c")] + [{"stage": "hint", "prompt_id": "a"}]
    rows.append({"stage": "answer", "prompt_id": "d", "error": "video decode failed"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "answer", "prom')
    log = SampleLog(path)
    assert log.resume("answer", expected=2) == {"a", "d"}  # b and c have 1 of their 2 answers; d failed to decode
    log.append([{"stage": "answer", "prompt_id": "b"}])
    assert [json.loads(line)["prompt_id"] for line in path.read_text().splitlines()] == ["a", "a", "a", "d", "b"]


def test_batches_keep_their_seeds_when_the_subset_to_answer_changes(tmp_path, monkeypatch):
    """Rationalisation answers a subset: one prompt more or less changes its own batch only, not every later one."""
    from videollm.infer.generate import GenerationSettings
    from videollm.selftrain.runs import Sampler
    from videollm.selftrain.verifiers import RecordVerifiers

    class Frames:
        max_length = None

        def load_video(self, path):
            return DecodedVideo(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), [0], [0.0], 1.0, path)

    def draw(model, processor, conversations, videos, settings):  # a "model" that reads only the random state
        return [[f"{torch.rand(1).item():.6f}" for _ in range(settings.num_return_sequences)] for _ in conversations]

    monkeypatch.setattr(runs, "generate_answers", draw)
    records = [labelled(i) for i in range(6)]
    prompts = [Prompt(r, r.question) for r in records]
    sampler = Sampler(Frames(), RecordVerifiers(records), GenerationSettings(num_return_sequences=2), batch_size=2)

    def answers(only, name):
        rows = sampler.run(lambda: None, prompts, "rationalize", 1, SampleLog(tmp_path / name), only=only)
        return {p: [r["answer"] for r in v] for p, v in rows.items()}

    everything = answers(None, "all.jsonl")
    subset = answers({"q0", "q1", "q3", "q4", "q5"}, "subset.jsonl")
    fewer = answers({"q0", "q1", "q4", "q5"}, "fewer.jsonl")  # q3 left out: only batch 1 (q2, q3) changes
    assert set(subset) == {"q0", "q1", "q3", "q4", "q5"}
    assert [subset[p] for p in ("q0", "q1", "q4", "q5")] == [everything[p] for p in ("q0", "q1", "q4", "q5")]
    assert fewer == {p: subset[p] for p in ("q0", "q1", "q4", "q5")}
    assert subset["q3"] != everything["q3"]  # its batch lost q2, so its draws moved


def test_a_prompt_too_long_to_answer_gets_an_error_row_and_its_batch_is_answered(seed_model, tmp_path, monkeypatch):
    from videollm.infer.generate import GenerationSettings
    from videollm.selftrain.runs import Sampler

    _, processor = load_model(seed_model)
    processor.max_length = 100  # "Which way?" fits, the 300-word rationalisation prompt does not
    sent = []

    def answer(model, processor, conversations, videos, settings):
        sent.extend(conversation[0]["content"] for conversation in conversations)
        return [["left"] for _ in conversations]

    monkeypatch.setattr(runs, "generate_answers", answer)
    records = [labelled(i) for i in range(3)]
    prompts = [Prompt(r, "Which way?" + " Think it through." * (100 if r.id == "q1" else 0)) for r in records]
    still = lambda path: DecodedVideo(torch.zeros(FRAMES, 3, 32, 32, dtype=torch.uint8), list(range(FRAMES)),  # noqa: E731
                                      [0.0] * FRAMES, 1.0, path)  # fmt: skip
    sampler = Sampler(processor, RecordVerifiers(records), GenerationSettings(), batch_size=3, load_video=still)
    rows = sampler.run(lambda: None, prompts, "answer", 1, SampleLog(tmp_path / "samples.jsonl"))
    assert sent == ["<video>\nWhich way?"] * 2
    (too_long,) = rows["q1"]
    assert too_long["answer"] is None and too_long["reason"] == "prompt too long" and "max_length=100" in too_long["error"]
    assert [row["answer"] for row in rows["q0"] + rows["q2"]] == ["left", "left"]


def test_stopping_when_accuracy_stops_rising():
    args = StarArguments(min_gain=0.01)
    assert not should_stop([0.2], args)
    assert not should_stop([0.2, 0.3], args)
    assert should_stop([0.2, 0.3, 0.305], args)  # a rise within min_gain is no rise
    assert should_stop([0.2, 0.3, 0.25], args)
    assert not should_stop([None, None], args)  # no evaluation: run every cycle
    assert not should_stop([0.2, 0.1], StarArguments(stop_when_no_gain=False))


# ---- self-preference ------------------------------------------------------------------------------------------------


def labelled(i: int) -> LabelledRecord:
    return LabelledRecord(id=f"q{i}", question="Which way?", label="left", label_type="class", videos=[f"/v/{i}.mp4"],
                          source="t", meta={"type": "direction"})  # fmt: skip


def test_best_and_worst_distinct_answers_become_the_pair():
    prompts = [Prompt(labelled(i), "Which way?") for i in range(4)]

    def sample(answer, score, verdict=True):
        return {"answer": answer, "score": score, "verdict": verdict}

    samples = {
        "q0": [sample("left", 1.0), sample("right", 0.0, False), sample("up", 0.0, False), sample("Left.", 1.0)],
        "q1": [sample("left", 1.0), sample("left", 1.0)],  # one distinct answer
        "q2": [sample("right", 0.0, False), sample("up", 0.0, False)],  # no score gap
        "q3": [sample("near", 0.6, False), sample("far", 0.2, False)],  # the best is not right
    }
    pairs, dropped = best_worst_pairs(prompts, samples, "score", 0.0, True, "/v", 1)
    assert [(p["chosen"], p["rejected"], p["question_id"]) for p in pairs] == [("left", "right", "q0")]
    assert pairs[0]["videos"] == ["0.mp4"] and pairs[0]["chosen_score"] == 1.0 and pairs[0]["round"] == 1
    assert dropped == {"one_distinct_answer": 1, "no_score_gap": 1, "best_is_wrong": 1}
    pairs, _ = best_worst_pairs(prompts, samples, "score", 0.0, False, None, 1)
    assert [p["question_id"] for p in pairs] == ["q0", "q3"]


def test_prompts_the_policy_always_gets_right_borrow_a_wrong_answer_of_their_group():
    def record(i, label, qtype):
        return LabelledRecord(id=f"q{i}", question="?", label=label, label_type="class", videos=[f"/v/{i}.mp4"],
                              source="t", meta={"type": qtype})  # fmt: skip

    records = [record(0, "red", "color"), record(1, "blue", "color"), record(2, "green", "color"),
               record(3, "left", "direction"), record(4, "right", "direction"), record(5, "up", "direction")]  # fmt: skip
    verifiers = RecordVerifiers(records)
    prompts = [Prompt(r, r.question) for r in records]

    def answers(r, *texts):
        return [{"answer": t, "score": float(bool(verifiers(r)(t, r.label))), "verdict": bool(verifiers(r)(t, r.label))}
                for t in texts]  # fmt: skip

    samples = {
        "q0": answers(records[0], "red", "Red."),  # all right (two phrasings)
        "q1": answers(records[1], "blue", "blue"),  # all right
        "q2": answers(records[2], "red", "red", "red", "green"),  # one wrong: best-vs-worst pairs it
        "q3": answers(records[3], "left", "left"),  # all right, and nothing wrong was ever said for it
        "q4": answers(records[4], "left", "right"),  # already paired
        "q5": answers(records[5], "down", "down"),  # all wrong: nothing to choose
    }
    pairs, unpaired = borrowed_rejected_pairs(prompts, samples, verifiers, "type", 0, "/v", 2, paired={"q4"})
    by_prompt = {p["question_id"]: p for p in pairs}
    assert sorted(by_prompt) == ["q0", "q1", "q3"]
    assert by_prompt["q0"]["chosen"] == "red" and by_prompt["q0"]["rejected"] in {"blue", "green"}
    assert by_prompt["q1"]["chosen"] == "blue" and by_prompt["q1"]["rejected"] in {"red", "Red.", "green"}
    assert by_prompt["q3"]["rejected"] in {"right", "down"}  # another prompt's answer, wrong for this label
    assert all(p["rejected_from"] == "another prompt" and p["round"] == 2 for p in pairs)
    assert by_prompt["q0"]["videos"] == ["0.mp4"]
    assert not unpaired
    # drawn as often as the policy said it: "red" was sampled 4 times, "Red." once and "green" once among blue's
    # wrong answers; the draw is seeded by (seed, round, prompt), so it repeats exactly
    draws = Counter(
        borrowed_rejected_pairs(prompts, samples, verifiers, "type", seed, None, 1)[0][1]["rejected"] for seed in range(300)
    )
    assert set(draws) == {"red", "Red.", "green"} and draws["red"] > 2 * draws["green"]
    again, _ = borrowed_rejected_pairs(prompts, samples, verifiers, "type", 0, "/v", 2, paired={"q4"})
    assert again == pairs
    # a group where no sample is ever wrong for the prompt: nothing to borrow, counted
    lonely = {"q3": answers(records[3], "left")}
    none, unpaired = borrowed_rejected_pairs([prompts[3]], lonely, verifiers, "type", 0, None, 1)
    assert none == [] and unpaired == {"no_wrong_answer_to_borrow": 1}
    with pytest.raises(ValueError, match="borrow_rejected: needs scorer: verifier"):
        SelfPreferenceArguments(scorer="judge", borrow_rejected=True)


def test_model_judge_scores_k_answers_with_one_vision_encode(seed_model):
    model, processor = load_model(seed_model)
    frames_per_call = []
    model.model.vision_tower.register_forward_hook(
        lambda module, args, kwargs, output: frames_per_call.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    video = DecodedVideo(torch.zeros(FRAMES, 3, 32, 32, dtype=torch.uint8), list(range(FRAMES)), [0.0] * FRAMES, 1.0, "v")
    judge = ModelJudge(SelfPreferenceArguments().judge_template, processor)
    scores = judge(model, Prompt(labelled(0), "Which way?"), [video], ["left", "it goes right", "up"])
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores) and len(set(scores)) == 3
    assert frames_per_call == [FRAMES]


def test_model_judge_gives_no_score_to_an_answer_too_long_to_judge_and_pairs_skip_it(seed_model):
    model, processor = load_model(seed_model)
    video = DecodedVideo(torch.zeros(FRAMES, 3, 32, 32, dtype=torch.uint8), list(range(FRAMES)), [0.0] * FRAMES, 1.0, "v")
    template = SelfPreferenceArguments().judge_template
    judge, prompt = ModelJudge(template, processor), Prompt(labelled(0), "Which way?")
    fitting = judge(model, prompt, [video], ["left", "up"])
    judged = [{"role": "user", "content": "<video>\n" + runs.fill(template, prompt.record, answer="left")}]
    processor.max_length = len(processor.encode(judged, [video], add_generation_prompt=True).input_ids) + 8
    answers = ["left", "it goes " + "very " * 200 + "far right", "up"]
    scores = judge(model, prompt, [video], answers)
    assert scores[1] is None and scores[0::2] == pytest.approx(fitting, abs=1e-6)
    rows = [{"answer": a, "score": 0.0, "verdict": False, "judge_score": s} for a, s in zip(answers, scores)]
    pairs, dropped = best_worst_pairs([prompt], {prompt.id: rows}, "judge_score", 0.0, False, None, 1)
    assert dropped == {"unscored_answers": 1}
    assert {pairs[0]["chosen"], pairs[0]["rejected"]} == {"left", "up"}


@pytest.mark.parametrize("level", ["tower", "projector"])
def test_model_judge_scores_cached_videos_as_decoded_ones(seed_model, level):
    model, processor = load_model(seed_model)
    frames = torch.randint(0, 256, (FRAMES, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    video = DecodedVideo(frames, list(range(FRAMES)), [0.0] * FRAMES, 1.0, "v")
    features = encode_videos(model, processor.pixel_values(video), [FRAMES], level)[0]
    cached = CachedVideo(frames[:0], video.indices, video.timestamps, video.duration, "v", features=features, level=level)
    judge = ModelJudge(SelfPreferenceArguments().judge_template, processor)
    answers = ["left", "it goes right", "up"]
    decoded_scores = judge(model, Prompt(labelled(0), "Which way?"), [video], answers)
    assert judge(model, Prompt(labelled(0), "Which way?"), [cached], answers) == pytest.approx(decoded_scores, abs=1e-6)


@pytest.mark.parametrize("cached", [False, True], ids=["decoded", "feature_cache"])
def test_self_preference_round_mines_pairs_and_trains_a_dpo_round(synthetic, seed_model, tmp_path, cached):
    argv = [
        "--config", str(REPO / "recipes/configs/self_preference_tiny.yaml"), "--model_name_or_path", str(seed_model),
        "--train_file", str(synthetic / "labels_train.jsonl"), "--eval_file", str(synthetic / "labels_eval.jsonl"),
        "--video_root", str(synthetic), "--output_dir", str(tmp_path / "run"), "--rounds", "1",
        "--verifier", f"{__name__}:answer_length", "--num_samples", "3", "--temperature", "1.5",
        "--max_new_tokens", "10", "--generation_batch_size", "4", "--eval_max_new_tokens", "4", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--logging_steps", "1", "--tune_llm", "lora", "--lora_r", "4",
        "--tune_projector", "frozen", "--dataloader_num_workers", "0",
    ]  # fmt: skip
    if cached:
        assert cache_features(["--recipe", "self_preference", *argv, "--feature_cache_dir", str(tmp_path / "cache")]) == 0
        argv += ["--feature_cache_dir", str(tmp_path / "cache")]
    calls, handle = count_tower_forwards(seed_model)
    config = parse_config([ModelArguments, DataArguments, SelfPreferenceArguments, VideoDPOConfig], argv)
    config[1].decode_timeout = None
    with handle:
        rows = run_self_preference(*config)
    assert (calls == []) is cached  # with the cache, sampling, DPO and evaluation never run the tower
    round_dir = tmp_path / "run" / "round_1"
    samples = read_jsonl(round_dir / "samples.jsonl")
    assert all(s["round"] == 1 and s["stage"] == "sample" for s in samples) and len(samples) == 3 * 6
    pairs = load_preferences(round_dir / "pairs.jsonl", video_root=synthetic)
    assert pairs and rows[1]["pairs"] == len(pairs)
    for pair in pairs:
        assert pair.meta["chosen_score"] > pair.meta["rejected_score"]
        assert pair.meta["chosen_score"] == answer_length(pair.chosen, None)
    borrowed = [pair for pair in pairs if pair.meta.get("rejected_from") == "another prompt"]
    assert rows[1]["borrowed"] == len(borrowed)
    for pair in borrowed:  # the config borrows: a question whose answers all verify is paired with a wrong answer
        question = pair.meta["question_id"]
        assert all(s["verdict"] for s in samples if s["prompt_id"] == question)
        assert pair.rejected in {s["answer"].strip() for s in samples if s["prompt_id"] != question}
        assert answer_length(pair.rejected, None) < 0.5
    assert rows[1]["train_steps"] == 2 and is_adapter_checkpoint(round_dir / "checkpoint")
    assert not is_adapter_checkpoint(round_dir / "model") and rows[1]["model"] == str((round_dir / "model").resolve())
    assert (tmp_path / "run" / "summary.png").is_file() is HAS_MATPLOTLIB


# ---- the recipes as users run them ----------------------------------------------------------------------------------


def recipe_argv(recipe: str, synthetic: Path, seed_model: Path, output_dir: Path, *extra: str) -> list[str]:
    """A self-training recipe's command line on the tiny task: 6 questions answered one per batch, 3 evaluated, one
    cycle (or round) of 2 training steps."""
    config = "star_tiny.yaml" if recipe == "star" else "self_preference_tiny.yaml"
    steps = ["--cycles", "1", "--verifier", "tests.test_star:even_length"] if recipe == "star" else ["--rounds", "1"]
    return [
        f"recipes/{recipe}.py", "--config", f"recipes/configs/{config}", "--model_name_or_path", str(seed_model),
        "--train_file", str(synthetic / "labels_train.jsonl"), "--eval_file", str(synthetic / "labels_eval.jsonl"),
        "--video_root", str(synthetic), "--output_dir", str(output_dir), "--num_samples", "2", "--temperature", "1.5",
        "--max_new_tokens", "4", "--generation_batch_size", "1", "--eval_batch_size", "1", "--eval_max_new_tokens", "4",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--dataloader_num_workers", "0",
        "--stop_when_no_gain", "false", "--tune_projector", "frozen", *steps, *extra,
    ]  # fmt: skip


# the policy judges its own answers (continuous scores, so pairs form), trained with LoRA and merged after the round
SELF_JUDGED_LORA = ["--scorer", "judge", "--borrow_rejected", "false", "--tune_llm", "lora", "--lora_r", "4"]


@pytest.fixture(scope="module")
def star_on_one_process(synthetic, seed_model, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """recipes/star.py run as users run it, in one process: its run directory and its output."""
    output_dir = tmp_path_factory.mktemp("star_recipe") / "run"
    return output_dir, run([sys.executable, *recipe_argv("star", synthetic, seed_model, output_dir)])


def test_star_recipe_killed_mid_generation_resumes_and_skips_finished_cycles(star_on_one_process, synthetic, seed_model, tmp_path):
    finished, first = star_on_one_process
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Video-STaR" in first.stdout and "kept_rate" in first.stdout and "summary:" in first.stdout

    # SIGKILL as soon as the first batch of answers is on disk, then the same command again
    argv = [sys.executable, *recipe_argv("star", synthetic, seed_model, tmp_path / "b")]
    killed = subprocess.Popen(argv, cwd=REPO, env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = tmp_path / "b" / "cycle_1" / "samples.jsonl"
    deadline = time.monotonic() + 240
    while killed.poll() is None and time.monotonic() < deadline and not (samples.is_file() and samples.stat().st_size):
        time.sleep(0.01)
    killed.kill()
    killed.wait()
    assert not (tmp_path / "b" / "cycle_1" / "done.json").exists()
    resumed = run(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("samples.jsonl", "train.jsonl"):
        assert read_jsonl(tmp_path / "b" / "cycle_1" / name) == read_jsonl(finished / "cycle_1" / name), name
    again = run(argv)
    assert again.returncode == 0 and "cycle 1 already finished; skipped" in again.stderr


@pytest.mark.parametrize("recipe", ["star", "self_preference"])
def test_self_training_on_two_processes_shares_the_sampling_and_draws_what_one_process_draws(
    star_on_one_process, synthetic, seed_model, tmp_path, recipe
):
    """Launched on two processes, each answers half of the batches (batch b on process b mod 2) and evaluates half of
    the questions; the run's files, written by one process, hold the answers one process draws; training runs on both
    processes; a rerun resumes, and one with other settings stops with one line on both processes."""
    extra = [] if recipe == "star" else SELF_JUDGED_LORA
    if recipe == "star":
        one = star_on_one_process[0]
    else:
        one = tmp_path / "one"
        single = run([sys.executable, *recipe_argv(recipe, synthetic, seed_model, one, *extra)])
        assert single.returncode == 0, single.stderr[-3000:]
    two = run([*two_cpu_processes(), *recipe_argv(recipe, synthetic, seed_model, tmp_path / "two", *extra)], timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("summary:") == 1  # printed by the main process only

    step_name = "cycle" if recipe == "star" else "round"
    step = f"{step_name}_1"
    first_stage = "answer" if recipe == "star" else "sample"
    questions = len((synthetic / "labels_train.jsonl").read_text().splitlines())
    shares = re.findall(rf"{step_name} 1, {first_stage}: process (\d) of 2 answered (\d+) of the (\d+) batches", two.stderr)
    assert sorted(shares) == [("0", str(questions // 2), str(questions)), ("1", str(questions // 2), str(questions))]

    for name in (f"{step_name}_0/eval_predictions.jsonl", f"{step}/samples.jsonl", f"{step}/{'train' if recipe == 'star' else 'pairs'}.jsonl"):
        assert read_jsonl(tmp_path / "two" / name) == read_jsonl(one / name), name
    samples = read_jsonl(tmp_path / "two" / step / "samples.jsonl")
    assert Counter(s["prompt_id"] for s in samples if s["stage"] == first_stage) == {q: 2 for q in {s["prompt_id"] for s in samples}}
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())["rows"][1]
    assert summary["train_steps"] == 2 and summary["model"] == str((tmp_path / "two" / step / ("checkpoint" if recipe == "star" else "model")).resolve())
    load_model(summary["model"])
    assert sorted(re.findall(r"rank (\d) of 2 finished after 2 steps \(ddp", two.stderr)) == ["0", "1"]
    if recipe != "star":
        return  # resumption is the run directory's, the same for both recipes

    again = run([*two_cpu_processes(), *recipe_argv(recipe, synthetic, seed_model, tmp_path / "two")], timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("summary:") == 1
    assert "answered" not in again.stderr and "finished after" not in again.stderr  # nothing generated or trained again
    other = run([*two_cpu_processes(), *recipe_argv(recipe, synthetic, seed_model, tmp_path / "two", "--num_samples", "3")])
    assert other.returncode != 0
    # one line from each process (the two may interleave in the shared stderr)
    assert other.stderr.count("error: output_dir") == other.stderr.count("(num_samples: 2 -> 3)") == 2, other.stderr[-3000:]


def test_bad_star_settings_give_one_clear_line(synthetic, seed_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        star_config(synthetic, seed_model, tmp_path, "--retrain_from", "scratch")
    assert capsys.readouterr().err.strip() == "error: retrain_from: 'scratch' is not one of initial | previous"
    with pytest.raises(SystemExit):
        star_config(synthetic, seed_model, tmp_path, "--rationalize_template", "{question} Why?")
    assert "must contain {label}" in capsys.readouterr().err
