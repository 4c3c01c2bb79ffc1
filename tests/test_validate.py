"""data_tools/validate.py: every bad record reported with its line, the good lines kept byte for byte, exit codes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from videollm.data.processor import SampleTooLongError
from videollm.data.sampling import SamplingSpec
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.data.validation import validate_file
from videollm.data.video import DecodedVideo
from videollm.model.presets import build_tiny_model_and_processor

from commands import REPO, command_env

SCRIPT = REPO / "data_tools" / "validate.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("validate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic clips (six records in train.jsonl) and a truncated copy of one clip."""
    root = tmp_path_factory.mktemp("validate")
    generate_dataset(SyntheticConfig(output_dir=str(root), num_train=2, num_eval=0, num_test=0))
    whole = (root / "videos" / "train" / "train_00000.mp4").read_bytes()
    (root / "videos" / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    return root


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny processor (8 frames of 32x32 -> 16 visual tokens with the stc projector)."""
    folder = tmp_path_factory.mktemp("processor")
    _, processor = build_tiny_model_and_processor(projector_type="stc", sampling=SamplingSpec(num_frames=8))
    processor.save_pretrained(folder)
    return folder


def _conversation(record_id: str, video: str, question: str = "<video>\nWhat moves?", answer: str = "a shape") -> str:
    record = {"id": record_id, "video": video, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}  # fmt: skip
    return json.dumps(record, ensure_ascii=False)


def test_validate_reports_every_bad_record_and_keeps_the_good_lines_byte_for_byte(
    data: Path, processor_dir: Path, tmp_path: Path
) -> None:
    synthetic = (data / "train.jsonl").read_text().splitlines()
    clip = "videos/train/train_00001.mp4"
    lines = [
        (synthetic[0] + "\n", None),
        ("{not json\n", "invalid JSON"),
        ("\n", None),  # blank: not a record, not kept
        (synthetic[1].replace('", "', '",   "') + "\r\n", None),  # odd spacing and CRLF, kept as they are
        (json.dumps({"id": "no_turns", "video": clip}) + "\n", "no turns"),
        (_conversation("two_placeholders", clip, "<video>\n<video>\nSame?") + "\n", "placeholders"),
        (_conversation("missing_video", "videos/nope.mp4") + "\n", "missing video"),
        (_conversation("truncated_video", "videos/cut.mp4") + "\n", "truncated video"),
        (_conversation(json.loads(synthetic[0])["id"], clip) + "\n", "duplicate id"),
        (_conversation("too_long", clip, "<video>\n" + "why " * 300) + "\n", "too long"),
        (_conversation("video_in_answer", clip, answer="<video> here") + "\n", "placeholder in answer"),
        (_conversation("café ünïcode", clip, "<video>\nQu'est-ce qui bouge ?") + "\n", None),
        (synthetic[2], None),  # the last line, without a newline
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_bytes("".join(text for text, _ in lines).encode("utf-8"))
    report, clean = tmp_path / "report.json", tmp_path / "clean.jsonl"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(source), "--video_root", str(data), "--processor", str(processor_dir),
         "--max_length", "64", "--num_workers", "1", "--report", str(report), "--output", str(clean), "--no_progress"],
        cwd=REPO, env=command_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    assert result.returncode == 1, result.stderr[-3000:]
    found = json.loads(report.read_text())
    bad_lines = [number for number, (_, bad) in enumerate(lines, start=1) if bad is not None]
    assert found["bad_lines"] == bad_lines == [2, 5, 6, 7, 8, 9, 10, 11]
    assert (found["records"], found["good"], found["bad"]) == (12, 4, 8)
    problems = [(p["line"], p["id"], p["field"]) for p in found["problems"]]
    assert problems == [
        (2, None, None),
        (5, "no_turns", None),
        (6, "two_placeholders", "conversations"),
        (7, "missing_video", "video"),
        (8, "truncated_video", "video"),
        (9, json.loads(synthetic[0])["id"], "id"),
        (10, "too_long", None),
        (11, "video_in_answer", "conversations[1].value"),
    ]
    reasons = {p["line"]: p["reason"] for p in found["problems"]}
    assert reasons[2].startswith("invalid JSON")
    assert "missing 'conversations'" in reasons[5]
    assert "2 '<video>' placeholder(s)" in reasons[6]
    assert reasons[7] == f"cannot read video {str(data / 'videos' / 'nope.mp4')!r}: file not found"
    assert "cut.mp4" in reasons[8] and "truncated" in reasons[8]
    assert reasons[9].startswith("duplicate id")
    assert "max_length=64" in reasons[10]
    assert all(p["location"] == f"{source}:{p['line']}" for p in found["problems"])
    for number in bad_lines:
        assert f"{source}:{number}: " in result.stdout
    good = [text for text, bad in lines if bad is None and text.strip()]
    assert clean.read_bytes() == "".join(good).encode("utf-8")


def test_a_clean_file_exits_0_and_is_copied_unchanged(tmp_path: Path, capsys) -> None:
    source = tmp_path / "text_only.jsonl"
    records = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"What is {i} + {i}?"},
                                                 {"from": "gpt", "value": str(2 * i)}]} for i in range(3)]  # fmt: skip
    source.write_text("".join(json.dumps(r) + "\n" for r in records))

    code = _load_script().main([str(source), "--num_workers", "1", "--no_progress"])

    assert code == 0
    assert (tmp_path / "text_only.clean.jsonl").read_bytes() == source.read_bytes()
    report = json.loads((tmp_path / "text_only.report.json").read_text())
    assert (report["records"], report["good"], report["bad"], report["problems"]) == (3, 3, 0, [])
    assert "3 of 3 records are good" in capsys.readouterr().out


def test_usage_errors_exit_with_code_2(data: Path, processor_dir: Path, tmp_path: Path, capsys) -> None:
    script = _load_script()
    json_array = tmp_path / "records.json"
    json_array.write_text("[]")
    records = tmp_path / "records.jsonl"
    records.write_text((data / "train.jsonl").read_text())
    assert script.main([str(tmp_path / "nope.jsonl")]) == 2
    assert script.main([str(json_array)]) == 2
    assert script.main([str(records), "--num_workers", "0"]) == 2
    assert script.main([str(records), "--video_root", str(tmp_path / "nowhere")]) == 2
    assert script.main([str(records), "--processor", str(tmp_path)]) == 2  # a folder without a processor
    assert script.main([str(records), "--output", str(records)]) == 2
    assert script.main([str(records), "--report", str(records)]) == 2  # would overwrite the data with the report
    assert script.main([str(records), "--max_length", "64"]) == 2  # no budget is checked without a processor
    assert script.main([str(records), "--processor", str(processor_dir), "--max_length", "0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 9
    assert errors[7].startswith("error: --max_length needs --processor")
    with pytest.raises(SystemExit) as info:
        script.main([])
    assert info.value.code == 2


def test_a_file_of_only_bad_records_lists_them_and_nothing_else(tmp_path: Path) -> None:
    source = tmp_path / "all_bad.jsonl"
    source.write_text('{"id": "a"}\n\n{"id": "b", "conversations": "hello"}\n')

    report = validate_file(source, num_workers=1, progress=False)

    assert [(p.location, p.id, p.field) for p in report.problems] == [
        (f"{source}:1", "a", None),
        (f"{source}:3", "b", "conversations"),
    ]  # and no "no records found": the file has records, all of them bad
    assert (report.records, report.good_lines, report.bad_lines) == (2, [], [1, 3])


# The processor's token budget, which the validation above applies to training samples; generation prompts differ.


def _tiny_video(num_frames: int = 8) -> DecodedVideo:
    frames = torch.zeros((num_frames, 3, 32, 32), dtype=torch.uint8)
    return DecodedVideo(frames, list(range(num_frames)), [i / 8 for i in range(num_frames)], num_frames / 8, "clip.mp4")


def test_a_generation_prompt_over_max_length_is_refused_not_cut() -> None:
    _, processor = build_tiny_model_and_processor(projector_type="stc", sampling=SamplingSpec(num_frames=8))
    question = [{"role": "user", "content": "<video>\nWhat is going on?"}]
    longer = [{"role": "user", "content": "<video>\nWhat is going on in this clip, in many words please?"}]
    fits = processor.encode(question, [_tiny_video()], add_generation_prompt=True).input_ids
    too_long = len(processor.encode(longer, [_tiny_video()], add_generation_prompt=True).input_ids)
    processor.max_length = len(fits) + 5
    assert too_long > processor.max_length

    assert processor.encode(question, [_tiny_video()], add_generation_prompt=True).input_ids == fits
    with pytest.raises(SampleTooLongError, match=rf"prompt is {too_long} tokens .* max_length={len(fits) + 5}"):
        processor.encode(longer, [_tiny_video()], add_generation_prompt=True)
    with pytest.raises(SampleTooLongError):
        processor([longer], [[_tiny_video()]])
    # A training sample still loses the end of its text (its answer), never its visual tokens.
    sample = processor.encode([*question, {"role": "assistant", "content": "a shape " * 20}], [_tiny_video()])
    assert len(sample.input_ids) == len(fits) + 5


def test_a_batch_needs_one_list_of_videos_per_conversation() -> None:
    _, processor = build_tiny_model_and_processor(projector_type="stc", sampling=SamplingSpec(num_frames=8))
    question = [{"role": "user", "content": "<video>\nWhat moves?"}]
    with pytest.raises(ValueError, match="2 conversations but 1 lists of videos"):
        processor([question, question], [[_tiny_video()]])
