"""Tests of the synthetic moving-shape generator (tiny sets, CPU, deterministic)."""

from __future__ import annotations

import json
from collections import Counter
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from videollm.data.sampling import SamplingSpec
from videollm.data.synthetic import (
    CLASSES,
    DIRECTIONS,
    OPPOSITE,
    SyntheticConfig,
    answer_text,
    estimate_direction,
    generate_dataset,
    label_from_answer,
    render_clip,
    sample_clip_params,
    split_clip_params,
)
from videollm.data.video import read_video

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_train=6, num_eval=4, num_test=4)
JSONL_FILES = (
    "train.jsonl",
    "eval.jsonl",
    "test.jsonl",
    "preference_train.jsonl",
    "preference_eval.jsonl",
    "labels_train.jsonl",
    "labels_eval.jsonl",
)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _video_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "videos").rglob("*.mp4"))}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn_a")
    summary = generate_dataset(SyntheticConfig(output_dir=str(out), seed=0, multiple_choice_ratio=0.5, **TINY))
    return out, summary


def test_same_seed_identical_records_and_bytes(tiny_set, tmp_path):
    out_a, _ = tiny_set
    generate_dataset(SyntheticConfig(output_dir=str(tmp_path), seed=0, multiple_choice_ratio=0.5, **TINY))
    for name in JSONL_FILES:
        assert (out_a / name).read_bytes() == (tmp_path / name).read_bytes(), name
    a, b = _video_bytes(out_a), _video_bytes(tmp_path)
    assert len(a) == 14 and a == b


def test_different_seed_differs(tiny_set, tmp_path):
    out_a, _ = tiny_set
    generate_dataset(SyntheticConfig(output_dir=str(tmp_path), seed=1, multiple_choice_ratio=0.5, **TINY))
    assert (out_a / "train.jsonl").read_bytes() != (tmp_path / "train.jsonl").read_bytes()
    a, b = _video_bytes(out_a), _video_bytes(tmp_path)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_clip_params_depend_only_on_seed_split_index():
    small = SyntheticConfig(num_train=3)
    large = SyntheticConfig(num_train=500, num_test=7)
    assert sample_clip_params(small, "train", 2) == sample_clip_params(large, "train", 2)
    assert sample_clip_params(small, "train", 2) != sample_clip_params(small, "eval", 2)
    assert sample_clip_params(small, "train", 2) != sample_clip_params(SyntheticConfig(seed=5), "train", 2)


def test_no_held_out_clip_repeats_a_training_clip():
    """At the default settings test clip 56, drawn on its own, has the very pixels of train clip 125 (same shape,
    colour, direction, start within a pixel): it is redrawn, with its direction kept; nothing else changes."""
    config = SyntheticConfig()
    drawn = {split: [sample_clip_params(config, split, i) for i in range(n)] for split, n in config.split_sizes().items()}
    assert np.array_equal(render_clip(drawn["test"][56], config), render_clip(drawn["train"][125], config))
    clips = split_clip_params(config)
    train = {render_clip(p, config).tobytes() for p in clips["train"]}
    held_out = [render_clip(p, config).tobytes() for split in ("eval", "test") for p in clips[split]]
    assert not train & set(held_out) and len(set(held_out)) == len(held_out)
    assert clips["train"] == drawn["train"]
    changed = [p.video_id for split in ("eval", "test") for p, q in zip(clips[split], drawn[split], strict=True) if p != q]
    assert changed == ["test_00056"] and clips["test"][56].direction == drawn["test"][56].direction


def test_decoded_centroid_moves_in_labelled_direction(tiny_set):
    out, _ = tiny_set
    records = _read_jsonl(out / "train.jsonl") + _read_jsonl(out / "test.jsonl")
    checked = 0
    for r in records:
        if r["type"] != "direction":
            continue
        decoded = read_video(str(out / r["video"]), SamplingSpec(num_frames=8))
        frames = np.asarray(decoded.frames)
        assert frames.shape == (8, 3, 64, 64) and frames.dtype == np.uint8
        assert estimate_direction(frames, channels_last=False) == r["label"]
        assert label_from_answer(r["conversations"][1]["value"], "direction") == r["label"]
        checked += 1
    assert checked == 10


def test_shape_stays_inside_frame_and_moves_at_speed():
    config = SyntheticConfig(speed=2.0, speed_max=5.0, shape_size=8, shape_size_max=20, size=64)
    for i in range(40):
        p = sample_clip_params(config, "train", i)
        frames = render_clip(p, config)
        fg = np.abs(frames.astype(int) - frames[0, 0, 0].astype(int)).sum(-1) > 0
        area = fg.sum((1, 2))
        assert area.min() > 0
        assert not fg[:, [0, -1], :].any() and not fg[:, :, [0, -1]].any()
        ys, xs = np.arange(64), np.arange(64)
        cx = (fg.sum(1) * xs).sum(-1) / area
        cy = (fg.sum(2) * ys).sum(-1) / area
        step = np.hypot(np.diff(cx), np.diff(cy)).mean()
        assert abs(step - p.speed) < 0.5, (p, step)


def test_reversed_frames_show_opposite_direction(tiny_set):
    out, _ = tiny_set
    config = SyntheticConfig(**TINY)
    for i in range(TINY["num_train"]):
        p = sample_clip_params(config, "train", i)
        frames = render_clip(p, config)
        assert estimate_direction(frames) == p.direction
        assert estimate_direction(frames[::-1]) == OPPOSITE[p.direction]
        decoded = np.asarray(read_video(str(out / f"videos/train/{p.video_id}.mp4"), SamplingSpec(num_frames=8)).frames)
        assert estimate_direction(decoded[::-1], channels_last=False) == OPPOSITE[p.direction]
    # The set of frames is symmetric under reversal: a reversed clip is itself a valid clip.
    assert {OPPOSITE[d] for d in DIRECTIONS} == set(DIRECTIONS)


def test_jsonl_fields(tiny_set):
    out, summary = tiny_set
    for split, n in (("train", 6), ("eval", 4), ("test", 4)):
        records = _read_jsonl(out / f"{split}.jsonl")
        assert len(records) == 3 * n
        assert {r["type"] for r in records} == set(CLASSES)
        for r in records:
            assert {"id", "video", "type", "conversations", "label"} <= r.keys()
            assert r["video"].startswith(f"videos/{split}/") and (out / r["video"]).is_file()
            human, gpt = r["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<video>\n")
            assert human["value"].count("<video>") == 1
            assert gpt["from"] == "gpt" and gpt["value"]
            assert r["label"] in CLASSES[r["type"]]
            if "choices" in r:
                letter = r["answer_letter"]
                assert gpt["value"] == f"{letter}. {answer_text(r['label'], r['type'])}"
                assert f"\n{letter}. {answer_text(r['label'], r['type'])}" in human["value"]
                assert sorted(r["choices"]) == sorted(CLASSES[r["type"]])
            else:
                assert gpt["value"] == r["label"]
        assert len({r["id"] for r in records}) == len(records)
    assert any("choices" in r for r in _read_jsonl(out / "train.jsonl"))
    for split, n in (("train", 6), ("eval", 4)):
        labels = _read_jsonl(out / f"labels_{split}.jsonl")
        assert len(labels) == 3 * n
        for r in labels:
            assert {"id", "video", "question", "label", "label_type"} <= r.keys()
            assert r["label_type"] == "class" and r["label"] in CLASSES[r["type"]]
            assert "conversations" not in r and "answer" not in r
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["config"]["seed"] == 0 and info["counts"]["train"]["videos"] == 6
    assert summary["counts"] == info["counts"]


def test_preference_pairs(tiny_set):
    """One pair per clip and question type; the chosen answer is the SFT answer, the rejected one another class of
    the same type (the opposite direction for direction pairs), and the clip really moves the chosen way."""
    out, _ = tiny_set
    sft = {(r["video"], r["type"]): r["label"] for r in _read_jsonl(out / "train.jsonl")}
    for split, n in (("train", 6), ("eval", 4)):
        prefs = _read_jsonl(out / f"preference_{split}.jsonl")
        assert sorted(Counter(r["type"] for r in prefs).items()) == [("color", n), ("direction", n), ("shape", n)]
        for r in prefs:
            assert {"id", "video", "type", "prompt", "chosen", "rejected"} <= r.keys()
            assert r["prompt"].startswith("<video>\n")
            assert r["chosen"] != r["rejected"] and r["rejected"] in CLASSES[r["type"]]
            if split == "train":
                assert r["chosen"] == sft[(r["video"], r["type"])]
            if r["type"] == "direction":
                assert r["rejected"] == OPPOSITE[r["chosen"]]
                frames = np.asarray(read_video(str(out / r["video"]), SamplingSpec(num_frames=8)).frames)
                assert estimate_direction(frames, channels_last=False) == r["chosen"]


def test_alt_wording_changes_surface(tmp_path):
    base = SyntheticConfig(output_dir=str(tmp_path / "d"), **TINY)
    alt = SyntheticConfig(
        output_dir=str(tmp_path / "a"), wording="alt", size=48, shape_size=10, shape_size_max=14,
        speed=2.5, speed_max=4.0, rejected="random", **TINY,
    )
    generate_dataset(base)
    generate_dataset(alt)
    q_default = {r["conversations"][0]["value"] for r in _read_jsonl(tmp_path / "d" / "train.jsonl")}
    alt_records = _read_jsonl(tmp_path / "a" / "train.jsonl")
    q_alt = {r["conversations"][0]["value"] for r in alt_records}
    assert q_default.isdisjoint(q_alt)
    for r in alt_records:
        answer = r["conversations"][1]["value"]
        assert answer == answer_text(r["label"], r["type"], "alt") != r["label"]
        assert label_from_answer(answer, r["type"]) == r["label"]
    for r in _read_jsonl(tmp_path / "a" / "preference_train.jsonl"):
        assert r["chosen"] != r["rejected"]
        assert label_from_answer(r["rejected"], r["type"]) in CLASSES[r["type"]]
    r = alt_records[0]
    decoded = np.asarray(read_video(str(tmp_path / "a" / r["video"]), SamplingSpec(num_frames=8)).frames)
    assert decoded.shape[-2:] == (48, 48)


def test_invalid_settings_rejected():
    with pytest.raises(ValueError):
        SyntheticConfig(size=32, speed=5.0, shape_size=16)
    with pytest.raises(ValueError):
        SyntheticConfig(question_types=["direction", "count"])
    with pytest.raises(ValueError):
        SyntheticConfig(wording="fancy")


def test_cli_writes_set(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "data_tools" / "make_synthetic.py"), "--output_dir", str(tmp_path),
         "--seed", "3", "--num_train", "2", "--num_eval", "1", "--num_test", "1",
         "--question_types", "direction", "color"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    assert "train" in proc.stdout and "direction=2" in proc.stdout
    records = _read_jsonl(tmp_path / "train.jsonl")
    assert [r["type"] for r in records] == ["direction", "color", "direction", "color"]
