"""Batch generation: a dataset in, one JSONL answer line per record out, resumable by record id."""

from __future__ import annotations

import json

import pytest
import torch

from videollm.data.formats import load_conversations
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.infer.batch import generate_dataset_answers
from videollm.infer.batch import main as batch_main
from videollm.infer.generate import GenerationSettings
from videollm.infer.session import InferenceEngine

from commands import run, two_cpu_processes

SETTINGS = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_dataset(SyntheticConfig(output_dir=str(root), num_train=0, num_eval=0, num_test=3))
    return root  # test.jsonl: 9 records (3 clips x 3 question types)


@pytest.fixture
def records(data):
    return load_conversations(data / "test.jsonl", video_root=data)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Killed(Exception):
    """Stands for the process being killed in the middle of a run."""


def count_generated(engine, monkeypatch, fail_after: int | None = None) -> list[int]:
    """Counts the prompts sent to the model; with `fail_after`, the call after that many batches raises (a crash)."""
    sizes = []
    generate = InferenceEngine.generate.__get__(engine)  # the real one, also when a test patches twice

    def counting(conversations, videos, settings, seed=None):
        if fail_after is not None and len(sizes) == fail_after:
            raise Killed
        sizes.append(len(conversations))
        return generate(conversations, videos, settings, seed)

    monkeypatch.setattr(engine, "generate", counting)
    return sizes


def test_cli_writes_one_line_per_record_with_frames_from_the_saved_spec(checkpoint, data, tmp_path):
    output = tmp_path / "answers.jsonl"
    batch_main(["--model", str(checkpoint), "--data", str(data / "test.jsonl"), "--video_root", str(data),
                "--output", str(output), "--max_new_tokens", "4", "--batch_size", "4"])  # fmt: skip

    rows = read_lines(output)
    records = load_conversations(data / "test.jsonl", video_root=data)
    assert [r["id"] for r in rows] == [r.id for r in records]
    for row, record in zip(rows, records):
        assert row["error"] is None and isinstance(row["answer"], str)
        assert row["reference"] == record.messages[-1].content
        assert row["frame_indices"] == [[1, 4, 7]]  # 3 uniform frames of 8 (the default spec would take all 8)


def test_two_processes_resume_a_partial_file_into_the_one_process_file(checkpoint, data, tmp_path):
    """`accelerate launch -m videollm.infer.batch` on 2 processes: the 6 records left after a partial run go out as 3
    batches (2 to the first process, 1 to the second) and the first appends them in order: the one-process file."""
    argv = ["--model", str(checkpoint), "--data", str(data / "test.jsonl"), "--video_root", str(data),
            "--max_new_tokens", "4", "--batch_size", "2"]  # fmt: skip
    batch_main([*argv, "--output", str(tmp_path / "one.jsonl")])
    one = (tmp_path / "one.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "two.jsonl").write_text("".join(one[:3]))
    result = run([*two_cpu_processes(), "-m", "videollm.infer.batch", *argv, "--output", str(tmp_path / "two.jsonl")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"6 answered, 3 already in {tmp_path / 'two.jsonl'}"
    assert result.stdout.count("answered") == 1
    assert (tmp_path / "two.jsonl").read_text() == "".join(one) and len(one) == 9


def test_a_killed_run_resumes_with_only_the_missing_ids(engine, records, tmp_path, monkeypatch):
    output = tmp_path / "answers.jsonl"
    sizes = count_generated(engine, monkeypatch, fail_after=2)
    with pytest.raises(Killed):
        generate_dataset_answers(engine, records, output, SETTINGS, batch_size=2)
    assert [r["id"] for r in read_lines(output)] == [r.id for r in records[:4]] and sizes == [2, 2]

    # The kill also cut the last line in half.
    output.write_text(output.read_text() + '{"id": "half-writ')
    sizes = count_generated(engine, monkeypatch)
    assert generate_dataset_answers(engine, records, output, SETTINGS, batch_size=2) == 5
    assert sizes == [2, 2, 1]
    assert sorted(r["id"] for r in read_lines(output)) == sorted(r.id for r in records)

    sizes = count_generated(engine, monkeypatch)
    assert generate_dataset_answers(engine, records, output, SETTINGS, batch_size=2) == 0 and sizes == []


def test_existing_partial_output_is_kept_and_completed(engine, records, tmp_path, monkeypatch):
    output = tmp_path / "answers.jsonl"
    kept = [{"id": records[i].id, "answer": "from an earlier run", "error": None} for i in (0, 5, 8)]
    output.write_text("".join(json.dumps(row) + "\n" for row in kept))
    sizes = count_generated(engine, monkeypatch)

    assert generate_dataset_answers(engine, records, output, SETTINGS, batch_size=4) == 6 and sum(sizes) == 6
    rows = read_lines(output)
    assert rows[:3] == kept and len(rows) == 9
    assert sorted(r["id"] for r in rows[3:]) == sorted(r.id for i, r in enumerate(records) if i not in (0, 5, 8))


def test_undecodable_videos_get_an_error_line_and_are_retried_on_request(engine, records, tmp_path, monkeypatch):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    records[1].videos = [str(broken)]
    output = tmp_path / "answers.jsonl"
    generate_dataset_answers(engine, records, output, SETTINGS, batch_size=4)
    rows = {r["id"]: r for r in read_lines(output)}
    assert len(rows) == 9 and rows[records[1].id]["answer"] is None
    assert "cannot read video" in rows[records[1].id]["error"]

    sizes = count_generated(engine, monkeypatch)
    assert generate_dataset_answers(engine, records, output, SETTINGS) == 0
    assert generate_dataset_answers(engine, records, output, SETTINGS, retry_errors=True) == 1 and sizes == []
    assert len(read_lines(output)) == 9


def test_a_prompt_over_max_length_gets_an_error_line_and_its_batch_is_answered(engine, records, tmp_path, monkeypatch):
    records[1].messages[0].content += " Think it through." * 100
    monkeypatch.setattr(engine.processor, "max_length", 120)  # the synthetic questions fit, the 300-word one does not
    sizes = count_generated(engine, monkeypatch)
    generate_dataset_answers(engine, records, tmp_path / "answers.jsonl", SETTINGS, batch_size=3)
    rows = {r["id"]: r for r in read_lines(tmp_path / "answers.jsonl")}
    assert rows[records[1].id]["answer"] is None and "max_length=120" in rows[records[1].id]["error"]
    assert all(row["error"] is None for id_, row in rows.items() if id_ != records[1].id) and sizes == [2, 3, 3]


def test_sampled_answers_come_from_the_seed_and_the_batch(engine, records, tmp_path):
    sampled = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=5.0)

    def answers(name: str, seed: int, first: int = 0) -> list[str]:
        generate_dataset_answers(engine, records[first:], tmp_path / name, sampled, batch_size=3, seed=seed)
        return [row["answer"] for row in read_lines(tmp_path / name)]

    everything = answers("everything.jsonl", seed=0)
    torch.manual_seed(123)  # the global generator's state does not matter
    assert answers("again.jsonl", seed=0) == everything
    assert answers("other_seed.jsonl", seed=1) != everything
    # a batch's answers depend on its records only (so N processes write what one does): records 3-5 and 6-8 are
    # batches of both runs
    assert answers("last_six.jsonl", seed=0, first=3) == everything[3:]


def test_duplicate_ids_are_refused(engine, records, tmp_path):
    records[1].id = records[0].id
    with pytest.raises(ValueError, match="unique"):
        generate_dataset_answers(engine, records, tmp_path / "answers.jsonl", SETTINGS)
