"""The evaluator: answer scoring, the summary and predictions files, and the shuffled-frames control."""

from __future__ import annotations

import json

import pytest
import torch

import videollm  # noqa: F401  (registers the Auto classes)
from videollm.data.sampling import SamplingSpec
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.data.formats import ConversationRecord, LabelledRecord, Message
from videollm.data.processor import VideoLLMProcessor
from videollm.data.video import DecodedVideo, VideoDecodeError
from videollm.infer.generate import GenerationSettings
from videollm.infer.processes import Processes
from videollm.eval.__main__ import ScoringTarget
from videollm.eval.__main__ import main as eval_main
from videollm.eval.scoring import Question, score_answers, summarize
from videollm.selftrain.verifiers import RecordVerifiers
from videollm.model.checkpoint import save_checkpoint
from videollm.model.presets import build_tiny_model_and_processor

from commands import run, two_cpu_processes


DIRECTIONS = ["left", "right", "up", "down"]


def _target(reference: str, choices: list[str] | None = None, **meta) -> ScoringTarget:
    record = ConversationRecord(
        id="r",
        messages=[Message("user", "<video>\nWhich way?"), Message("assistant", reference)],
        videos=["clip.mp4"],
        source="test.jsonl:1",
        meta={"type": "direction", **({"choices": choices} if choices else {}), **meta},
    )
    return ScoringTarget.of(record, reference)


@pytest.mark.parametrize(
    ("prediction", "reference", "choices", "expected"),
    [
        ("Left.", "left", None, True),
        ("  LEFT ", "left", None, True),
        ("it moves left", "left", None, True),
        ("left, then right", "left", None, False),
        ("not left", "left", None, False),
        ("B", "B. right", DIRECTIONS, True),
        ("(b)", "B. right", DIRECTIONS, True),
        ("B. right", "B. right", DIRECTIONS, True),
        ("right", "B. right", DIRECTIONS, True),
        ("A", "B. right", DIRECTIONS, False),
        ("left", "B. right", DIRECTIONS, False),
        ("A. right", "B. right", DIRECTIONS, False),
    ],
)
def test_evaluation_scores_with_the_self_training_verifiers(prediction, reference, choices, expected):
    """The evaluator, the STaR filter and the DPO pair miner share one definition of a right answer."""
    targets = [_target(reference, choices)] + [_target(d) for d in DIRECTIONS]
    assert bool(RecordVerifiers(targets).check(targets[0], prediction)) is expected


def test_a_record_label_is_preferred_over_the_reference_text():
    target = _target("The square moves to the left.", label="left")
    assert target.label == "left" and target.label_type == "class"
    assert RecordVerifiers([target]).check(target, "left")


def still_video(path: str) -> DecodedVideo:
    return DecodedVideo(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), [0, 1], [0.0, 1.0], 2.0, path)


def when_questions(count: int, long_question: int | None = None) -> list[Question]:
    """Time-range questions on clip<i>.mp4; question `long_question` runs on for 300 words."""
    questions = []
    for i in range(count):
        text = "When?" + " Think about it." * (100 if i == long_question else 0)
        record = LabelledRecord(f"q{i}", text, [1.5, 3.0], "time_range", [f"clip{i}.mp4"], "l:1", {"type": "when"})
        messages = [{"role": "user", "content": f"<video>\n{text}"}]
        questions.append(Question(f"q{i}", messages, [f"clip{i}.mp4"], record, {"label": [1.5, 3.0]}))
    return questions


def test_a_wrong_answer_keeps_its_partial_score_and_reason_and_an_unreadable_video_its_error(monkeypatch, checkpoint):
    """The prediction rows of the evaluator and of self-training's evaluations (one loop, `score_answers`)."""
    import videollm.eval.scoring as scoring

    questions = when_questions(3)

    def load(path: str) -> DecodedVideo:
        if path == "clip1.mp4":
            raise VideoDecodeError(path, "truncated")
        return still_video(path)

    answers = iter([["from 0 to 2 s"], ["from 1.5 to 3 s"]])
    monkeypatch.setattr(scoring, "generate_answers", lambda model, processor, prompts, *_: [next(answers) for _ in prompts])
    processor = VideoLLMProcessor.from_pretrained(checkpoint)
    summary, rows = score_answers(lambda: None, processor, questions, RecordVerifiers([q.target for q in questions]),
                                  GenerationSettings(), load_video=load)  # fmt: skip
    assert [row["id"] for row in rows] == ["q0", "q1", "q2"]  # question order, the unreadable one in its place
    wrong, unreadable, right = rows
    assert (wrong["correct"], round(wrong["score"], 4), wrong["reason"]) == (False, 0.1667, "IoU 0.17 <= 0.5")
    assert (right["correct"], right["score"], right["label"]) == (True, 1.0, [1.5, 3.0])
    assert unreadable["prediction"] is None and "truncated" in unreadable["error"] and unreadable["reason"] is None
    assert summary["by_type"] == {"when": {"accuracy": 1 / 3, "correct": 1, "total": 3}} and summary["num_errors"] == 1


def test_a_prompt_over_max_length_gets_an_error_row_and_the_others_are_answered(monkeypatch, checkpoint):
    import videollm.eval.scoring as scoring

    questions = when_questions(3, long_question=1)
    answered = []

    def generate(model, processor, prompts, *_):
        answered.extend(prompt[0]["content"] for prompt in prompts)
        return [["from 1.5 to 3 s"] for _ in prompts]

    monkeypatch.setattr(scoring, "generate_answers", generate)
    processor = VideoLLMProcessor.from_pretrained(checkpoint)
    processor.max_length = 100  # the short questions' prompts fit, the 300-word one does not
    summary, rows = score_answers(lambda: None, processor, questions, RecordVerifiers([q.target for q in questions]),
                                  GenerationSettings(), load_video=still_video)  # fmt: skip
    assert [row["id"] for row in rows] == ["q0", "q1", "q2"] and answered == ["<video>\nWhen?"] * 2
    assert rows[1]["prediction"] is None and "max_length=100" in rows[1]["error"] and not rows[1]["correct"]
    assert [row["correct"] for row in rows[0::2]] == [True, True] and summary["num_errors"] == 1


def test_a_summary_of_mixed_question_types_names_each_as_text():
    rows = [{"type": t, "correct": c, "error": None} for t, c in [("when", True), (None, False), (3, True), (3, False)]]
    assert summarize(rows)["by_type"] == {
        "3": {"accuracy": 0.5, "correct": 1, "total": 2},
        "all": {"accuracy": 0.0, "correct": 0, "total": 1},
        "when": {"accuracy": 1.0, "correct": 1, "total": 1},
    }


def test_a_process_without_a_batch_loads_no_model(monkeypatch, checkpoint):
    """The second of 2 processes, with one batch to share: the first answers it, the second loads nothing (gathering
    outside a distributed launch returns this process's own rows)."""
    import videollm.eval.scoring as scoring

    question = Question("q", [{"role": "user", "content": "<video>\nWhich way?"}], ["clip.mp4"],
                        LabelledRecord("q", "Which way?", "left", "class", ["clip.mp4"], "l:1"), {})  # fmt: skip
    monkeypatch.setattr(scoring, "generate_answers", lambda model, processor, prompts, *_: [["left"] for _ in prompts])
    loads = []

    def load_model() -> None:
        loads.append("model")

    processor = VideoLLMProcessor.from_pretrained(checkpoint)
    for index, expected in [(1, []), (0, ["model"])]:
        loads.clear()
        _, rows = score_answers(load_model, processor, [question], RecordVerifiers([question.target]), GenerationSettings(),
                                load_video=still_video, processes=Processes(index, 2))  # fmt: skip
        assert loads == expected and len(rows) == 1 - index


@pytest.fixture(scope="module")
def checkpoint_and_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    generate_dataset(SyntheticConfig(output_dir=str(data), num_train=0, num_eval=0, num_test=3, multiple_choice_ratio=0.5))
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=8))
    checkpoint = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model, processor, checkpoint)
    return checkpoint, data


@pytest.mark.parametrize("shuffle", [False, True])
def test_eval_writes_summary_and_predictions(checkpoint_and_data, tmp_path, shuffle):
    checkpoint, data = checkpoint_and_data
    output = tmp_path / "eval.json"
    argv = ["--model", str(checkpoint), "--data", str(data / "test.jsonl"), "--video_root", str(data),
            "--output", str(output), "--max_new_tokens", "4", "--batch_size", "4"]  # fmt: skip
    eval_main(argv + (["--shuffle_frames"] if shuffle else []))

    summary = json.loads(output.read_text())
    predictions = [json.loads(line) for line in (tmp_path / "eval.predictions.jsonl").read_text().splitlines()]
    assert summary["num_samples"] == len(predictions) == 9
    assert set(summary["by_type"]) == {"direction", "color", "shape"}
    assert all(row["total"] == 3 for row in summary["by_type"].values())
    assert summary["accuracy"] == sum(p["correct"] for p in predictions) / 9
    assert summary["shuffle_frames"] is shuffle and summary["sampling"]["num_frames"] == 8
    for prediction in predictions:
        (indices,) = prediction["frame_indices"]
        assert sorted(indices) == list(range(8))
        assert (indices != sorted(indices)) is shuffle


def test_eval_on_two_processes_gives_what_one_process_gives(checkpoint_and_data, tmp_path):
    """`accelerate launch -m videollm.eval`: each process answers every other batch (5 batches: 3 and 2), the first
    writes the files once, and the predictions, frame permutations included, are those of one process."""
    checkpoint, data = checkpoint_and_data
    argv = ["--model", str(checkpoint), "--data", str(data / "test.jsonl"), "--video_root", str(data),
            "--max_new_tokens", "4", "--batch_size", "2", "--shuffle_frames"]  # fmt: skip
    eval_main([*argv, "--output", str(tmp_path / "one.json")])
    result = run([*two_cpu_processes(), "-m", "videollm.eval", *argv, "--output", str(tmp_path / "two.json")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("frames shuffled") == 1  # the table, printed by the first process only

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / f"{name}.predictions.jsonl").read_text().splitlines()]

    assert read("two") == read("one") and len(read("one")) == 9
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert {k: v for k, v in two.items() if k not in ("predictions_file",)} == {
        k: v for k, v in one.items() if k not in ("predictions_file",)
    }


def test_eval_runs_in_the_dtype_asked_for(checkpoint_and_data, tmp_path, monkeypatch):
    import videollm.eval.__main__ as eval_module

    checkpoint, data = checkpoint_and_data
    seen = []
    evaluate = eval_module.evaluate

    def spy(model, *args, **kwargs):
        seen.append({(p.device.type, p.dtype) for p in model.parameters()})
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(eval_module, "evaluate", spy)
    output = tmp_path / "eval.json"
    argv = ["--model", str(checkpoint), "--data", str(data / "test.jsonl"), "--video_root", str(data),
            "--output", str(output), "--max_new_tokens", "4", "--device", "cpu", "--dtype", "bfloat16"]  # fmt: skip
    eval_main(argv)
    assert seen == [{("cpu", torch.bfloat16)}]
    assert json.loads(output.read_text())["num_samples"] == 9


def test_eval_rejects_a_missing_model_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--model: .* does not exist"):
        eval_main(["--model", str(tmp_path / "none"), "--data", str(tmp_path), "--output", str(tmp_path / "o.json")])


def test_a_dataset_s_own_answer_wording_counts_for_its_label():
    """Labels "up"/"down" with answers "upwards"/"downwards" (another dataset's wording): the reference answer is a
    phrasing of the label, in its question type only, and naming another class is still wrong."""
    targets = [_target(f"{d}wards", label=d) for d in ("up", "down")] + [_target(f"to the {d}", label=d) for d in ("left", "right")]
    verifiers = RecordVerifiers(targets)
    assert verifiers.check(targets[0], "upwards") and verifiers.check(targets[0], "up")
    assert verifiers.check(targets[1], "downwards") and verifiers.check(targets[2], "to the left")
    assert not verifiers.check(targets[0], "downwards")
    assert not verifiers.check(targets[1], "upwards or downwards")
    other_type = _target("a circle", label="circle", type="shape")
    assert not RecordVerifiers([*targets, other_type]).check(other_type, "upwards")
