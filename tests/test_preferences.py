"""Preference-data builders (videollm.selftrain): perturbations, TEMPLE filters, verifiers, pairs, curricula."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from videollm.data.formats import load_preferences
from videollm.data.processor import VideoLLMProcessor
from videollm.data.sampling import SamplingSpec
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.data.video import DecodedVideo, VideoDecodeError
from videollm.model.checkpoint import save_checkpoint
from videollm.model.presets import build_tiny_model_and_processor
from videollm.selftrain import (
    PairFilter,
    Prompt,
    curriculum_stages,
    differing_phrases,
    exclusive_class_verifiers,
    perturb_video,
    temporal_pairs,
    verified_pairs,
    write_curriculum,
)
from videollm.selftrain.runs import RunSettingsMismatch, SampleLog
from videollm.selftrain.verifiers import ClassVerifier, get_verifier
from videollm.train.dpo import VideoDPOConfig, preference_rows

from commands import REPO, run, two_cpu_processes


def ramp_video(num_frames: int = 8, path: str = "ramp.mp4") -> DecodedVideo:
    """Frame i is filled with the value i: frame order can be read back from the pixels."""
    frames = torch.arange(num_frames, dtype=torch.uint8).view(-1, 1, 1, 1).expand(num_frames, 3, 2, 2).clone()
    return DecodedVideo(frames=frames, indices=list(range(num_frames)), timestamps=[i / 4 for i in range(num_frames)],
                        duration=num_frames / 4, path=path)  # fmt: skip


def order(video: DecodedVideo) -> list[int]:
    return video.frames[:, 0, 0, 0].tolist()


# ---- perturbations ----------------------------------------------------------------------------------------------------


def test_reversing_the_whole_clip_plays_it_backwards_at_the_same_times():
    video = ramp_video()
    reversed_video = perturb_video(video, "reverse", magnitude=8)
    assert order(reversed_video) == list(range(7, -1, -1))
    assert reversed_video.indices == list(range(7, -1, -1))
    assert reversed_video.timestamps == video.timestamps  # the stated frame times do not give the perturbation away
    assert order(perturb_video(video, "reverse", magnitude=16)) == list(range(7, -1, -1))  # capped to the clip


@pytest.mark.parametrize("kind", ["reverse", "shuffle"])
@pytest.mark.parametrize("magnitude", [2, 3, 5])
def test_reorderings_touch_exactly_a_window_of_magnitude_frames(kind, magnitude):
    for seed in range(5):
        changed = order(perturb_video(ramp_video(), kind, magnitude, seed=seed))
        moved = [i for i, value in enumerate(changed) if value != i]
        assert sorted(changed) == list(range(8)) and moved
        assert moved[-1] - moved[0] < magnitude
        assert order(perturb_video(ramp_video(), kind, magnitude, seed=seed)) == changed  # seeded


def test_drop_removes_a_window_of_magnitude_frames_with_their_times():
    video = ramp_video()
    dropped = perturb_video(video, "drop", magnitude=3, seed=1)
    kept = order(dropped)
    assert len(kept) == 5 and kept == sorted(kept)
    missing = sorted(set(range(8)) - set(kept))
    assert missing == list(range(missing[0], missing[0] + 3))
    assert dropped.timestamps == [video.timestamps[i] for i in kept]
    assert len(order(perturb_video(video, "drop", magnitude=99))) == 1


def test_unknown_perturbation_is_refused():
    with pytest.raises(ValueError, match="choose from shuffle, reverse, drop"):
        perturb_video(ramp_video(), "blur", 2)


# ---- filters, phrases, verifiers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        ("It moves left.", "it moves LEFT", "identical"),
        ("left", "first left then right", "chosen_in_rejected"),
        ("it moves left", "no", "length_ratio"),
        ("left", "it moves to the right side of the frame", "length_ratio"),
        ("left", "  ", "empty"),
        ("it moves left", "it moves right", None),
    ],
)
def test_temple_pair_filter(chosen, rejected, reason):
    assert PairFilter().reason(chosen, rejected) == reason


def test_differing_phrases_are_exact_substrings_of_each_answer():
    chosen, rejected = "The red  square moves left, then stops.", "The red square moves right, then stops at once."
    chosen_phrases, rejected_phrases = differing_phrases(chosen, rejected)
    assert chosen_phrases == ["left,", "stops."]
    assert rejected_phrases == ["right,", "stops at once."]
    assert all(p in chosen for p in chosen_phrases) and all(p in rejected for p in rejected_phrases)


def test_verifiers_per_label_type():
    exclusive = ClassVerifier(["left", "right", "up", "down"])
    assert exclusive("It moves LEFT.", "left") and not exclusive("left or right", "left") and not exclusive("up", "left")
    assert get_verifier("class")("B. left", "left")
    assert get_verifier("time_range")("from 1.0 s to 3 s", [1.5, 3.0])  # IoU 0.75
    assert not get_verifier("time_range")("from 0 to 1", [1.5, 3.0])
    assert get_verifier("box")("[10, 10, 50, 50]", [12, 10, 50, 52])
    assert not get_verifier("box")("[0, 0, 10, 10]", [12, 10, 50, 52])
    assert get_verifier("number")("about 10.5 people", 10) and not get_verifier("number")("12", 10)
    with pytest.raises(ValueError, match="no verifier"):
        get_verifier("sentence")


# ---- builders ---------------------------------------------------------------------------------------------------------


def prompts(labels: list[str]) -> list[Prompt]:
    return [
        Prompt(id=f"q{i}", messages=[{"role": "user", "content": "<video>\nWhich way does it move?"}],
               videos=[f"/videos/clip{i}.mp4"], label=label, label_type="class", meta={"type": "direction"})
        for i, label in enumerate(labels)
    ]  # fmt: skip


def order_answerer(conversations, videos):
    """A model that reads direction from the first and last frame."""
    return [["the shape moves right" if order(v[0])[0] < order(v[0])[-1] else "the shape moves left"] for v in videos]


def test_temporal_pairs_keep_answers_the_perturbation_changed(tmp_path):
    items = prompts(["right"] * 3)
    rows, report = temporal_pairs(
        items, order_answerer, load_video=lambda path: ramp_video(path=path),
        perturbations=[("reverse", 8), ("reverse", 2)], video_root="/videos", batch_size=2,
    )  # fmt: skip
    # reversing the whole clip flips the answer; reversing 2 inner frames does not (dropped as identical)
    assert report.kept == 3 and report.dropped == {"identical": 3}
    assert {(r["chosen"], r["rejected"], r["magnitude"]) for r in rows} == {("the shape moves right", "the shape moves left", 8)}
    assert rows[0]["chosen_phrases"] == ["right"] and rows[0]["rejected_phrases"] == ["left"]
    assert rows[0]["videos"] == ["clip0.mp4"]

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_preferences(path, video_root="/videos", check_videos=False)
    assert [r.videos for r in records] == [[f"/videos/clip{i}.mp4"] for i in range(3)]
    assert preference_rows(records)[0]["chosen_phrases"] == ["right"]  # valid for RRPO


def test_verified_pairs_prefer_answers_that_match_the_label():
    # the label space seen in the data is {left, right}: "left or right" names two classes, "up" none
    samples = {"q0": ["right", "left or right", "it goes right", "up"], "q1": ["right", "down"], "q2": ["right", "right"]}
    items = prompts(["right", "left", "right"])

    def sampler(conversations, videos):  # the three prompts come in one batch, in order
        return [samples[f"q{i}"] for i in range(len(conversations))]

    rows, report = verified_pairs(items, sampler, load_video=lambda path: ramp_video(path=path),
                                  verifier_for=exclusive_class_verifiers(items), max_pairs_per_prompt=10)  # fmt: skip
    assert report.dropped == {"all_wrong": 1, "all_right": 1}
    pairs = {(r["chosen"], r["rejected"]) for r in rows}
    assert pairs == {(c, r) for c in ("right", "it goes right") for r in ("left or right", "up")}
    assert all(r["question_id"] == "q0" for r in rows) and len({r["id"] for r in rows}) == len(rows)


def test_a_question_whose_video_does_not_decode_is_dropped_and_named():
    items = prompts(["right"] * 3)

    def load(path: str) -> DecodedVideo:
        if path.endswith("clip1.mp4"):
            raise VideoDecodeError(path, "truncated")
        return ramp_video(path=path)

    rows, report = temporal_pairs(items, order_answerer, load_video=load, perturbations=[("reverse", 8)], batch_size=2)
    assert [r["question_id"] for r in rows] == ["q0", "q2"]
    assert report.kept == 2 and report.dropped == {"unreadable_video": 1}
    assert len(report.unreadable) == 1 and report.unreadable[0].startswith("q1: ") and "clip1.mp4" in report.unreadable[0]


def test_a_question_whose_prompt_is_over_max_length_is_dropped_and_named(checkpoint):
    items = prompts(["right"] * 3)
    items[1].messages[0]["content"] += " Think it through." * 100
    processor = VideoLLMProcessor.from_pretrained(checkpoint)
    processor.max_length = 150  # the short prompts fit, the 300-word one does not
    rows, report = temporal_pairs(items, order_answerer, load_video=lambda path: ramp_video(path=path),
                                  perturbations=[("reverse", 8)], batch_size=2, processor=processor)  # fmt: skip
    assert [r["question_id"] for r in rows] == ["q0", "q2"]
    assert report.kept == 2 and report.dropped == {"prompt_too_long": 1} and report.unreadable == []
    assert len(report.too_long) == 1 and report.too_long[0].startswith("q1: ") and "max_length=150" in report.too_long[0]


def test_each_batch_samples_from_its_own_seed():
    """A batch draws the same answers whatever ran before it in this process (so N processes draw what one does)."""
    items = prompts(["right", "left", "right", "left"])
    drawn: list[list[str]] = []

    def sampler(conversations, videos):
        answers = [[f"{torch.randint(100, ()).item()}" for _ in range(3)] for _ in conversations]
        drawn.append(answers)
        return answers

    build = dict(load_video=lambda path: ramp_video(path=path), batch_size=2, seed=7)
    verified_pairs(items, sampler, **build)
    torch.rand(5)  # the global generator moves on between the runs
    verified_pairs(items[:2], sampler, **build)
    verified_pairs(items, sampler, **{**build, "seed": 8})
    assert drawn[0] != drawn[1] and drawn[2] == drawn[0] and drawn[3:5] != drawn[:2]


def test_a_build_log_cut_from_other_questions_is_refused(tmp_path):
    build = dict(load_video=lambda path: ramp_video(path=path), perturbations=[("reverse", 8)], batch_size=2)
    log = SampleLog(tmp_path / "batches.jsonl")
    first, _ = temporal_pairs(prompts(["right"] * 3), order_answerer, log=log, **build)
    again, _ = temporal_pairs(prompts(["right"] * 3), lambda *_: pytest.fail("nothing is left to answer"),
                              log=SampleLog(tmp_path / "batches.jsonl"), **build)  # fmt: skip
    assert again == first and len(first) == 3
    other = prompts(["right"] * 4)[1:]
    with pytest.raises(RunSettingsMismatch, match="batch 0 was cut from other questions .* the input changed"):
        temporal_pairs(other, order_answerer, log=SampleLog(tmp_path / "batches.jsonl"), **build)


def test_curriculum_orders_stages_from_coarse_to_fine(tmp_path):
    rows = [{"id": str(i), "prompt": "<video>\nq", "video": "a.mp4", "chosen": "a", "rejected": "b", "magnitude": m}
            for i, m in enumerate([2, 8, 4, 8, 2])]  # fmt: skip
    assert [m for m, _ in curriculum_stages(rows)] == [8, 4, 2]
    assert [m for m, _ in curriculum_stages(rows, easy_first=False)] == [2, 4, 8]
    paths = write_curriculum(rows, tmp_path)
    assert [p.name for p in paths] == ["stage_1_magnitude_8.jsonl", "stage_2_magnitude_4.jsonl", "stage_3_magnitude_2.jsonl"]
    assert [len(load_preferences(p, check_videos=False)) for p in paths] == [2, 1, 2]
    args = VideoDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, round_train_files=[str(p) for p in paths])
    assert args.rounds == 3  # one DPO round per stage


@pytest.mark.parametrize(
    ("perturbation", "message"),
    [("shufle:8", "the kind must be one of shuffle | reverse | drop"), ("reverse:1", "at least 2 frames"),
     ("drop:0", "at least 1 frames")],
)  # fmt: skip
def test_make_preferences_refuses_a_bad_perturbation_before_loading_a_model(perturbation, message, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "data_tools"))
    from make_preferences import main

    argv = ["--model", str(tmp_path / "no_model"), "--input", str(tmp_path / "no_input.jsonl"),
            "--output", str(tmp_path / "prefs.jsonl"), "--perturbations", "reverse:4", perturbation]  # fmt: skip
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "prefs.jsonl.progress").exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """`data_tools/make_preferences.py` run once, in this process, on 4 direction questions (one of them with a
    corrupt video) answered one per batch by a tiny model that samples: its command line, output and inputs."""
    sys.path.insert(0, str(REPO / "data_tools"))
    from make_preferences import main

    root = tmp_path_factory.mktemp("make_preferences")
    data = root / "synthetic"
    generate_dataset(SyntheticConfig(output_dir=str(data), num_train=4, num_eval=1, num_test=1))
    labels = [json.loads(line) for line in (data / "labels_train.jsonl").read_text().splitlines()]
    corrupt = next(r for r in labels if r["type"] == "direction")
    (data / corrupt["video"]).write_bytes(b"not a video")
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=4))
    save_checkpoint(model, processor, root / "model")
    argv = ["--model", str(root / "model"), "--input", str(data / "labels_train.jsonl"), "--video_root", str(data),
            "--types", "direction", "--perturbations", "reverse:4", "shuffle:2", "--do_sample", "true",
            "--temperature", "2.0", "--max_new_tokens", "3", "--batch_size", "1"]  # fmt: skip
    output = root / "prefs" / "temporal.jsonl"
    code = main([*argv, "--output", str(output), "--curriculum_dir", str(root / "stages")])
    return {"code": code, "main": main, "argv": argv, "output": output, "data": data, "corrupt": corrupt, "root": root}


def test_make_preferences_writes_pairs_and_curriculum_stages_on_one_or_two_processes(built, tmp_path):
    """One process (the fixture), then `accelerate launch` on 2: each answers every other one-question batch (2 of
    4), drawing from the batch's own seed, so the sampled pairs are the same; the question whose video is corrupt is
    skipped and named once."""
    output, data, corrupt = built["output"], built["data"], built["corrupt"]
    assert built["code"] == 0 and not Path(f"{output}.progress").exists()  # the progress is gone once the output is written

    two = run([*two_cpu_processes(), "data_tools/make_preferences.py", *built["argv"], "--output", str(tmp_path / "two.jsonl")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count(f"warning: skipped {corrupt['id']}: ") == 1 and corrupt["video"] in two.stderr
    assert two.stdout.count("unreadable_video=1") == 1 and "from 4 questions" in two.stdout
    assert (tmp_path / "two.jsonl").read_text() == output.read_text()

    records = load_preferences(output, video_root=data)
    assert records and {r.meta["perturbation"] for r in records} <= {"reverse", "shuffle"}
    assert all(r.meta["question_id"].endswith("_direction") for r in records)
    assert corrupt["id"] not in {r.meta["question_id"] for r in records}
    assert {r.id for r in records} == {f"{r.meta['question_id']}_{r.meta['perturbation']}_{r.meta['magnitude']}" for r in records}
    preference_rows(records)  # marked phrases are valid
    stages = sorted((built["root"] / "stages").iterdir())
    assert [int(p.stem.split("_")[-1]) for p in stages] == sorted({r.meta["magnitude"] for r in records}, reverse=True)


def test_a_killed_build_resumes_with_the_batches_left_and_refuses_other_settings(built, tmp_path, monkeypatch, capsys):
    import make_preferences

    answered: list[int] = []
    real = make_preferences.model_answerer

    def answerer(*args):
        answer = real(*args)

        def counted(conversations, videos):  # 3 calls a batch: the clean video, then the 2 perturbations
            if len(answered) == kill_after:
                raise Interrupted("killed")
            answered.append(len(conversations))
            return answer(conversations, videos)

        return counted

    monkeypatch.setattr(make_preferences, "model_answerer", answerer)
    output = tmp_path / "pairs.jsonl"
    kill_after = 4  # in the second readable batch
    with pytest.raises(Interrupted):
        built["main"]([*built["argv"], "--output", str(output)])
    assert not output.exists() and len((tmp_path / "pairs.jsonl.progress" / "batches.jsonl").read_text().splitlines()) >= 1

    assert built["main"]([*built["argv"], "--output", str(output), "--seed", "1"]) == 2
    assert "seed: 0 -> 1" in capsys.readouterr().err and not output.exists()

    answered.clear()
    kill_after = None
    assert built["main"]([*built["argv"], "--output", str(output)]) == 0
    assert len(answered) == 6  # the 2 readable batches left, not the 3 of the uninterrupted run
    assert output.read_text() == built["output"].read_text() and not (tmp_path / "pairs.jsonl.progress").exists()


class Interrupted(RuntimeError):
    """Stands for the process being killed."""
