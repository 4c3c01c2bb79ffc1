"""Tests for videollm.data.formats: every record form from every source kind, and the validation."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.parquet
import pytest

from videollm.data.formats import (
    ConversationRecord,
    DataValidationError,
    LabelledRecord,
    Message,
    PreferenceRecord,
    iter_jsonl,
    load_conversations,
    load_labelled,
    load_preferences,
    write_jsonl,
)

SOURCE_KINDS = ["jsonl", "json", "parquet", "dataset"]


@pytest.fixture
def video_root(tmp_path: Path) -> Path:
    """A folder holding empty stand-in videos: only their existence matters to the loader."""
    root = tmp_path / "videos"
    (root / "clips").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "clips/c.mp4"):
        (root / name).touch()
    return root


def make_source(kind: str, records: list[dict[str, Any]], directory: Path, stem: str = "train") -> Any:
    """Write records as a .jsonl/.json/.parquet file, or build a datasets.Dataset from them."""
    if kind == "jsonl":
        path = directory / f"{stem}.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        return path
    if kind == "json":
        path = directory / f"{stem}.json"
        path.write_text(json.dumps(records, indent=2), encoding="utf-8")
        return path
    if kind == "parquet":
        path = directory / f"{stem}.parquet"
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
        return path
    return datasets.Dataset.from_list(records)


def write_lines(path: Path, lines: list[str | dict[str, Any]]) -> Path:
    """Write a JSONL file line by line; strings are written verbatim (for malformed lines)."""
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines), encoding="utf-8"
    )
    return path


def problems_of(excinfo: pytest.ExceptionInfo[DataValidationError]) -> list[str]:
    """The problem list, after checking that str() lists the same problems one per line."""
    assert str(excinfo.value).splitlines() == excinfo.value.problems
    return excinfo.value.problems


def location(kind: str, source: Any, number: int) -> str:
    """The expected source string for a record: file:line for JSONL, name[index] otherwise."""
    if kind == "jsonl":
        return f"{source}:{number + 1}"
    name = "dataset" if kind == "dataset" else str(source)
    return f"{name}[{number}]"


# Every record form from every source kind.


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_llava_conversations(kind: str, tmp_path: Path, video_root: Path) -> None:
    records = [
        {
            "id": "r1",
            "video": "a.mp4",
            "type": "caption",
            "system": "Be brief.",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat moves?"},
                {"from": "gpt", "value": "A red square."},
                {"from": "user", "value": "Where to?"},
                {"from": "assistant", "value": "Left."},
            ],
        },
        {
            "id": "r2",
            "video": "clips/c.mp4",
            "type": None,
            "system": None,
            "conversations": [{"from": "human", "value": "<video>\nColour?"}, {"from": "gpt", "value": "Red."}],
        },
    ]
    source = make_source(kind, records, tmp_path)
    loaded = load_conversations(source, video_root=video_root)
    assert loaded[0] == ConversationRecord(
        id="r1",
        messages=[
            Message("system", "Be brief."),
            Message("user", "<video>\nWhat moves?"),
            Message("assistant", "A red square."),
            Message("user", "Where to?"),
            Message("assistant", "Left."),
        ],
        videos=[str(video_root / "a.mp4")],
        source=location(kind, source, 0),
        meta={"type": "caption"},
    )
    assert loaded[1].videos == [str(video_root / "clips/c.mp4")]
    assert loaded[1].meta == {}
    assert [message.role for message in loaded[1].messages] == ["user", "assistant"]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_messages_conversations(kind: str, tmp_path: Path, video_root: Path) -> None:
    records = [
        {
            "messages": [
                {"role": "user", "content": "<video>\n<video>\nCompare."},
                {"role": "assistant", "content": "Same shape."},
            ],
            "videos": ["a.mp4", "b.mp4"],
        },
        {"messages": [{"role": "user", "content": "Text only?"}, {"role": "assistant", "content": "Yes."}], "videos": []},
    ]
    source = make_source(kind, records, tmp_path)
    loaded = load_conversations(source, video_root=video_root)
    stem_number = 1 if kind == "jsonl" else 0
    assert loaded[0].id == f"{'dataset' if kind == 'dataset' else 'train'}:{stem_number}"
    assert loaded[0].source == location(kind, source, 0)
    assert loaded[0].videos == [str(video_root / "a.mp4"), str(video_root / "b.mp4")]
    assert loaded[0].messages[0] == Message("user", "<video>\n<video>\nCompare.")
    assert loaded[1].videos == []
    assert loaded[1].messages == [Message("user", "Text only?"), Message("assistant", "Yes.")]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_content_parts(kind: str, tmp_path: Path, video_root: Path) -> None:
    records = [
        {
            "id": 7,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "video", "video": "a.mp4"}, {"type": "text", "text": "What is it?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
            ]
        }
    ]
    loaded = load_conversations(make_source(kind, records, tmp_path), video_root=video_root)
    assert loaded[0].id == "7"
    assert loaded[0].messages == [Message("user", "<video>\nWhat is it?"), Message("assistant", "A circle.")]
    assert loaded[0].videos == [str(video_root / "a.mp4")]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_preferences(kind: str, tmp_path: Path, video_root: Path) -> None:
    records = [
        {
            "id": "p1",
            "video": "a.mp4",
            "prompt": "<video>\nWhat colour?",
            "chosen": "Red.",
            "rejected": "Blue.",
            "chosen_phrases": ["Red"],
            "rejected_phrases": ["Blue"],
        },
        {
            "id": "p2",
            "video": "b.mp4",
            "prompt": "<video>\nHow many?",
            "chosen": "Two.",
            "rejected": "Three.",
            "chosen_phrases": None,
            "rejected_phrases": None,
        },
    ]
    source = make_source(kind, records, tmp_path)
    loaded = load_preferences(source, video_root=video_root)
    assert loaded[0] == PreferenceRecord(
        id="p1",
        prompt=[Message("user", "<video>\nWhat colour?")],
        chosen="Red.",
        rejected="Blue.",
        videos=[str(video_root / "a.mp4")],
        source=location(kind, source, 0),
        meta={"chosen_phrases": ["Red"], "rejected_phrases": ["Blue"]},
    )
    assert loaded[1].meta == {}


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_preferences_messages_form(kind: str, tmp_path: Path, video_root: Path) -> None:
    records = [
        {
            "videos": ["a.mp4"],
            "prompt": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "<video>\nShape?"},
                {"role": "assistant", "content": "Square."},
                {"role": "user", "content": "Colour?"},
            ],
            "chosen": [{"role": "assistant", "content": "Red."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        }
    ]
    loaded = load_preferences(make_source(kind, records, tmp_path), video_root=video_root)
    record = loaded[0]
    assert [message.role for message in record.prompt] == ["system", "user", "assistant", "user"]
    assert (record.chosen, record.rejected) == ("Red.", "Green.")
    assert record.videos == [str(video_root / "a.mp4")]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_labelled(kind: str, tmp_path: Path, video_root: Path) -> None:
    records = [
        {"id": "l1", "video": "a.mp4", "question": "How many shapes?", "label": "2", "label_type": "count", "split": "x"},
        {"id": "l2", "video": "b.mp4", "question": "Which colour?", "label": "red", "label_type": None, "split": None},
    ]
    source = make_source(kind, records, tmp_path)
    loaded = load_labelled(source, video_root=video_root)
    assert loaded[0] == LabelledRecord(
        id="l1",
        question="How many shapes?",
        label="2",
        label_type="count",
        videos=[str(video_root / "a.mp4")],
        source=location(kind, source, 0),
        meta={"split": "x"},
    )
    assert loaded[1].label_type is None
    assert loaded[1].meta == {}


# Paths and placeholders.


def test_absolute_and_relative_video_paths(tmp_path: Path, video_root: Path) -> None:
    elsewhere = tmp_path / "elsewhere.mp4"
    elsewhere.touch()
    source = write_lines(
        tmp_path / "train.jsonl",
        [
            {
                "video": [str(elsewhere), "a.mp4"],
                "conversations": [{"from": "human", "value": "<video><video>Q"}, {"from": "gpt", "value": "A"}],
            }
        ],
    )
    [record] = load_conversations(source, video_root=video_root)
    assert record.videos == [str(elsewhere), str(video_root / "a.mp4")]


def test_no_video_root_keeps_paths_as_given(tmp_path: Path, video_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(video_root)
    record = {"video": "a.mp4", "conversations": [{"from": "human", "value": "<video>Q"}, {"from": "gpt", "value": "A"}]}
    [loaded] = load_conversations(write_lines(tmp_path / "train.jsonl", [record]))
    assert loaded.videos == ["a.mp4"]


def test_missing_placeholder_is_prepended(tmp_path: Path, video_root: Path) -> None:
    records = [
        {"video": "a.mp4", "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A"}]},
        {
            "videos": ["a.mp4", "b.mp4"],
            "messages": [
                {"role": "system", "content": "Sys."},
                {"role": "user", "content": "Compare."},
                {"role": "assistant", "content": "Same."},
            ],
        },
    ]
    loaded = load_conversations(write_lines(tmp_path / "train.jsonl", records), video_root=video_root)
    assert loaded[0].messages[0] == Message("user", "<video>\nDescribe.")
    assert loaded[1].messages[:2] == [Message("system", "Sys."), Message("user", "<video>\n<video>\nCompare.")]

    preference = {"video": "a.mp4", "prompt": "Colour?", "chosen": "Red.", "rejected": "Blue."}
    [pair] = load_preferences(write_lines(tmp_path / "pref.jsonl", [preference]), video_root=video_root)
    assert pair.prompt == [Message("user", "<video>\nColour?")]


def test_custom_placeholder(tmp_path: Path, video_root: Path) -> None:
    record = {"video": "a.mp4", "conversations": [{"from": "human", "value": "<vid> Q"}, {"from": "gpt", "value": "A"}]}
    [loaded] = load_conversations(write_lines(tmp_path / "t.jsonl", [record]), video_root=video_root, placeholder="<vid>")
    assert loaded.messages[0].content == "<vid> Q"


def test_mixed_content_parts_and_top_level_videos_keep_text_order(tmp_path: Path, video_root: Path) -> None:
    record = {
        "videos": ["b.mp4"],
        "messages": [
            {"role": "user", "content": [{"type": "video", "video": "a.mp4"}, {"type": "text", "text": "First."}]},
            {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Second?"}]},
            {"role": "assistant", "content": "Done."},
        ],
    }
    [loaded] = load_conversations(write_lines(tmp_path / "t.jsonl", [record]), video_root=video_root)
    assert loaded.videos == [str(video_root / "a.mp4"), str(video_root / "b.mp4")]
    assert loaded.messages[2].content == "<video>\nSecond?"


def test_placeholder_count_mismatch_and_misplaced_placeholder(tmp_path: Path, video_root: Path) -> None:
    records = [
        {"video": "a.mp4", "conversations": [{"from": "human", "value": "<video><video>Q"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "<video>Q"}, {"from": "gpt", "value": "A"}]},
        {"video": "a.mp4", "conversations": [{"from": "human", "value": "<video>Q"}, {"from": "gpt", "value": "<video>"}]},
        {"video": "a.mp4", "prompt": "<video>Q", "chosen": "<video> yes", "rejected": "no"},
    ]
    path = write_lines(tmp_path / "mm.jsonl", records[:3])
    with pytest.raises(DataValidationError) as excinfo:
        load_conversations(path, video_root=video_root)
    problems = problems_of(excinfo)
    assert problems == [
        f"{path}:1: conversations: 2 '<video>' placeholder(s) without a path in the text but 1 video(s) in 'video'/'videos'",
        f"{path}:2: conversations: 1 '<video>' placeholder(s) without a path in the text but 0 video(s) in 'video'/'videos'",
        f"{path}:3: conversations[1].value: '<video>' may only appear in user turns",
    ]
    with pytest.raises(DataValidationError, match=r"mm2.jsonl:1: chosen: '<video>' may only appear in user turns"):
        load_preferences(write_lines(tmp_path / "mm2.jsonl", records[3:]), video_root=video_root)


# Validation: every problem, with file, line and field.


def test_every_bad_line_is_reported(tmp_path: Path, video_root: Path) -> None:
    good = {"id": "ok", "video": "a.mp4", "conversations": [{"from": "human", "value": "<video>Q"}, {"from": "gpt", "value": "A"}]}
    missing_video = str(video_root / "nope.mp4")
    lines: list[str | dict[str, Any]] = [
        good,
        '{"id": "broken", "conversations": [',
        {"conversations": [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}]},
        "[1, 2]",
        "",
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"}]},
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2"}]},
        {"video": "a.mp4"},
        {"video": "nope.mp4", "conversations": [{"from": "human", "value": "<video>Q"}, {"from": "gpt", "value": "A"}]},
        good,
        {"conversations": [{"from": "gpt", "value": "A"}, {"value": "Q"}]},
        {"conversations": [{"from": "human", "value": 42}, {"from": "gpt", "value": "A"}], "id": 1.5},
    ]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataValidationError) as excinfo:
        load_conversations(path, video_root=video_root)
    problems = problems_of(excinfo)
    expected = [
        "bad.jsonl:2: invalid JSON:",
        "bad.jsonl:3: conversations[0].from: unknown role 'robot'",
        "bad.jsonl:4: conversations[1].value: must be a non-empty string",
        "bad.jsonl:5: record must be a JSON object, got array",
        "bad.jsonl:7: conversations[1].from: expected role 'assistant' here, got 'user'",
        "bad.jsonl:8: conversations: must end with a turn of role 'assistant', got 'user'",
        "bad.jsonl:9: missing 'conversations' (LLaVA style) or 'messages'",
        f"bad.jsonl:10: video: video not found: {missing_video}",
        "bad.jsonl:11: id: duplicate id 'ok' (first at ",
        "bad.jsonl:12: conversations[1].from: missing; expected one of 'human', 'user', 'gpt', 'assistant', 'system'",
        "bad.jsonl:13: id: must be a string or an integer, got number",
        "bad.jsonl:13: conversations[0].value: must be a non-empty string or a list of content parts, got number",
    ]
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert start in problem
        assert problem.startswith(f"{path}:")
    assert problems[8].endswith(f"(first at {path}:1)")


def test_bad_records_in_index_sources_name_the_index(tmp_path: Path) -> None:
    records = [
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
    ]
    with pytest.raises(DataValidationError) as excinfo:
        load_conversations(make_source("json", records, tmp_path))
    assert problems_of(excinfo) == [
        f"{tmp_path / 'train.json'}[1]: conversations[0].from: expected role 'user' here, got 'assistant'"
    ]
    with pytest.raises(DataValidationError, match=r"^dataset\[1\]: conversations\[0\]\.from: expected role 'user'"):
        load_conversations(make_source("dataset", records, tmp_path))


def test_missing_video_names_resolved_path_and_check_can_be_disabled(tmp_path: Path, video_root: Path) -> None:
    record = {"id": "x", "videos": ["a.mp4", "gone/z.mp4"], "question": "Q?", "label": 3}
    path = write_lines(tmp_path / "labels.jsonl", [record])
    with pytest.raises(DataValidationError) as excinfo:
        load_labelled(path, video_root=video_root)
    assert problems_of(excinfo) == [f"{path}:1: videos[1]: video not found: {video_root / 'gone/z.mp4'}"]
    [loaded] = load_labelled(path, video_root=video_root, check_videos=False)
    assert loaded.videos == [str(video_root / "a.mp4"), str(video_root / "gone/z.mp4")]
    assert loaded.label == 3


def test_duplicate_ids(tmp_path: Path) -> None:
    records = [
        {"id": "same", "question": "Q1", "label": "a"},
        {"id": "other", "question": "Q2", "label": "b"},
        {"id": "same", "question": "Q3", "label": "c"},
        {"id": "same", "question": "Q4", "label": "d"},
    ]
    path = make_source("jsonl", records, tmp_path, stem="dups")
    with pytest.raises(DataValidationError) as excinfo:
        load_labelled(path)
    assert problems_of(excinfo) == [
        f"{path}:3: id: duplicate id 'same' (first at {path}:1)",
        f"{path}:4: id: duplicate id 'same' (first at {path}:1)",
    ]


def test_preference_problems(tmp_path: Path) -> None:
    records = [
        {"prompt": "Q", "chosen": "Same.", "rejected": "Same."},
        {"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "x", "rejected": "y"},
        {"prompt": "Q", "chosen": [{"role": "user", "content": "x"}], "rejected": [], "chosen_phrases": "x"},
        {"prompt": "", "chosen": "x"},
    ]
    path = write_lines(tmp_path / "pref.jsonl", records)
    with pytest.raises(DataValidationError) as excinfo:
        load_preferences(path)
    assert problems_of(excinfo) == [
        f"{path}:1: rejected: identical to 'chosen'",
        f"{path}:2: prompt: must end with a turn of role 'user', got 'assistant'",
        f"{path}:3: chosen[0].role: must be 'assistant', got 'user'",
        f"{path}:3: rejected: must be a string or exactly one assistant message, got 0 messages",
        f"{path}:3: chosen_phrases: must be a list, got string",
        f"{path}:4: prompt: must be a non-empty string",
        f"{path}:4: rejected: missing; must be a non-empty string or a list of content parts",
    ]


def test_labelled_problems(tmp_path: Path) -> None:
    records = [{"question": "Q"}, {"question": " ", "label": ""}, {"question": "Q", "label": 0, "label_type": 5}]
    path = write_lines(tmp_path / "labels.jsonl", records)
    with pytest.raises(DataValidationError) as excinfo:
        load_labelled(path)
    assert problems_of(excinfo) == [
        f"{path}:1: label: missing; must be a non-null value",
        f"{path}:2: question: must be a non-empty string",
        f"{path}:2: label: must not be empty",
        f"{path}:3: label_type: must be a non-empty string, got number",
    ]


def test_content_part_problems(tmp_path: Path) -> None:
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": ""}, "s"]},
            {"role": "assistant", "content": "A"},
        ]
    }
    path = write_lines(tmp_path / "parts.jsonl", [record])
    with pytest.raises(DataValidationError) as excinfo:
        load_conversations(path, check_videos=False)
    assert problems_of(excinfo) == [
        f"{path}:1: messages[0].content[0].type: unknown part type 'image'; expected 'text' or 'video'",
        f"{path}:1: messages[0].content[1].text: must be a non-empty string",
        f"{path}:1: messages[0].content[2]: must be a content part object, got string",
    ]


def test_wrong_loader_hint(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "pref.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataValidationError, match="use load_preferences"):
        load_conversations(path)


# Whole-source errors.


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataValidationError, match=r"train\.csv: unsupported file extension '\.csv'"):
        load_conversations(path)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_jsonl(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataValidationError, match="empty.jsonl: no records found"):
        load_conversations(path)


def test_empty_json_array_and_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="no records found"):
        load_labelled(make_source("json", [], tmp_path))
    with pytest.raises(DataValidationError, match="dataset: no records found"):
        load_labelled(datasets.Dataset.from_dict({"question": [], "label": []}))


def test_json_file_errors(tmp_path: Path) -> None:
    not_a_list = tmp_path / "obj.json"
    not_a_list.write_text('{"question": "Q"}')
    with pytest.raises(DataValidationError, match="must hold a list of records, got object"):
        load_labelled(not_a_list)
    jsonl_named_json = tmp_path / "lines.json"
    jsonl_named_json.write_text('{"question": "Q", "label": 1}\n{"question": "R", "label": 2}\n')
    with pytest.raises(DataValidationError, match=r"lines\.json:2: invalid JSON: Extra data .*name the file \.jsonl"):
        load_labelled(jsonl_named_json)


def test_missing_file_and_wrong_source_type(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(TypeError, match="pass one split"):
        load_labelled(datasets.DatasetDict({"train": datasets.Dataset.from_list([{"question": "Q", "label": 1}])}))
    with pytest.raises(TypeError, match="got list"):
        load_labelled([{"question": "Q", "label": 1}])


def test_error_survives_pickling() -> None:
    error = DataValidationError(["a.jsonl:1: x: bad", "a.jsonl:2: y: bad"])
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems
    assert str(copy) == "a.jsonl:1: x: bad\na.jsonl:2: y: bad"


# JSONL helpers.


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out" / "predictions.jsonl"
    records = [{"id": "1", "text": "héllo"}, {"id": "2", "score": 0.5, "tags": ["a"]}]
    write_jsonl(path, iter(records))
    assert [record for _, record in iter_jsonl(path)] == records
    assert "héllo" in path.read_text(encoding="utf-8")
    assert sorted(os.listdir(path.parent)) == ["predictions.jsonl"]


def test_write_jsonl_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    write_jsonl(path, [{"id": "old"}])
    with pytest.raises(TypeError):
        write_jsonl(path, [{"id": "new"}, {"id": "bad", "value": object()}])
    assert [record for _, record in iter_jsonl(path)] == [{"id": "old"}]
    assert os.listdir(tmp_path) == ["predictions.jsonl"]


def test_iter_jsonl_yields_errors_in_place(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "mixed.jsonl", [{"a": 1}, "not json", "", '"string"', {"b": 2}])
    items = list(iter_jsonl(path))
    assert [number for number, _ in items] == [1, 2, 4, 5]
    assert items[0][1] == {"a": 1} and items[3][1] == {"b": 2}
    assert isinstance(items[1][1], ValueError) and "invalid JSON" in str(items[1][1])
    assert isinstance(items[2][1], ValueError) and "got string" in str(items[2][1])
