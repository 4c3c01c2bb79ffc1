"""Unreadable media during training: quarantine and replace, or stop with a clear message; and no unsafe loading.

A bad-media corpus is generated here: files that cannot be decoded (empty, truncated, text renamed .mp4, missing,
a decoder that hangs) and unusual files that must decode (1 frame, variable frame rate, VP9 WebM, 4000x4000).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from videollm.data.dataset import SAMPLE_IDS, ConversationDataset, VideoCollator
from videollm.data.formats import DataValidationError, load_conversations, load_preferences
from videollm.data.robust import (
    MAX_REPLACEMENT_TRIES,
    QUARANTINE_FILE,
    BadSampleCollator,
    BadSampleError,
    BadSampleLimitExceeded,
    BadSamplePolicy,
    SampleInfo,
    exceeds_limit,
    failure_message,
    load_for_policy,
)
from videollm.data.sampling import SamplingSpec
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.data.video import DecodedVideo, VideoDecodeError, read_video, write_video
from videollm.model.checkpoint import load_model, save_checkpoint
from videollm.model.presets import build_tiny_model_and_processor
from videollm.model.trainable import TrainablePolicy, apply_trainable_policy
from videollm.train.dpo import VideoDPOConfig, build_preference_dataset, preference_rows, train_dpo

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "videollm"

# A decoding backend named by "module:function", as a recipe's `decode_backend` can name one: it never returns for
# files named hang*, and decodes other files sequentially with PyAV.
STUB_BACKEND = textwrap.dedent(
    '''
    import os
    import time

    import av
    import numpy as np


    def hang_or_decode(path, indices):
        if os.path.basename(path).startswith("hang"):
            while True:
                time.sleep(3600)
        with av.open(path) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        return np.stack(frames)[list(indices)]
    '''
)
BAD = ("empty.mp4", "truncated.mp4", "text.mp4", "missing.mp4", "hang.mp4")
ODD_BUT_GOOD = ("one_frame.mp4", "vfr.mp4", "huge.mp4") + (("vp9.webm",) if "libvpx-vp9" in av.codecs_available else ())


def _frames(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic good clips (videos/train/*.mp4, train.jsonl) plus media/ with the bad and the odd files."""
    root = tmp_path_factory.mktemp("bad_media")
    generate_dataset(SyntheticConfig(output_dir=str(root), num_train=4, num_eval=0, num_test=0))
    media = root / "media"
    media.mkdir()
    good = root / "videos" / "train" / "train_00000.mp4"

    (media / "empty.mp4").write_bytes(b"")
    whole = good.read_bytes()
    (media / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (media / "text.mp4").write_text("not a video, a text file renamed .mp4\n" * 20)
    (media / "hang.mp4").write_bytes(whole)  # a good clip; the stub backend hangs on its name

    write_video(media / "one_frame.mp4", _frames(1))
    write_video(media / "vfr.mp4", _frames(10), timestamps=[0, 0.1, 0.15, 0.4, 0.5, 0.9, 1.0, 1.05, 1.5, 2.0])
    if "libvpx-vp9" in av.codecs_available:
        write_video(media / "vp9.webm", _frames(8), codec="libvpx-vp9")
    write_video(media / "huge.mp4", np.full((2, 4000, 4000, 3), 90, dtype=np.uint8))
    (root / "bad_media_stub.py").write_text(STUB_BACKEND)
    return root


def _record(record_id: str, video: str) -> dict:
    return {
        "id": record_id,
        "video": video,
        "conversations": [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "a shape"}],
    }


def _write_records(path: Path, records: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _good_records(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]


def _run_sft(corpus: Path, train_file: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(corpus), os.environ.get("PYTHONPATH", "")]),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "recipes/sft.py",
        "--config", "recipes/configs/sft_tiny.yaml",
        "--train_file", str(train_file),
        "--video_root", str(corpus),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--train_sampling_strategy", "sequential",
        "--max_steps", "-1",
        "--num_train_epochs", "1",
        "--logging_steps", "1",
        *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("name", ODD_BUT_GOOD)
def test_odd_but_valid_media_decode(corpus: Path, name: str) -> None:
    decoded = read_video(corpus / "media" / name, SamplingSpec(num_frames=8, frame_size=32))
    assert tuple(decoded.frames.shape) == (8, 3, 32, 32)
    assert decoded.frames.dtype == torch.uint8


# ---------------------------------------------------------------------------------------- training, end to end


def test_training_over_bad_media_finishes_and_quarantines_exactly_the_bad_samples(corpus: Path, tmp_path: Path) -> None:
    good = _good_records(corpus)
    odd = [_record(f"odd_{name}", f"media/{name}") for name in ODD_BUT_GOOD]
    bad = [_record(f"bad_{name}", f"media/{name}") for name in BAD]
    # One bad sample in every four, read in order: the fraction seen stays under the limit.
    fine = iter(odd + good)
    records = []
    for item in bad:
        records.extend([next(fine), next(fine), next(fine), item])
    records.extend(fine)
    train_file = _write_records(tmp_path / "mixed.jsonl", records)
    output_dir = tmp_path / "out"

    result = _run_sft(
        corpus, train_file, output_dir,
        "--dataloader_num_workers", "1",
        "--decode_backend", "bad_media_stub:hang_or_decode",
        "--decode_timeout", "6",
        "--max_bad_fraction", "0.5",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-4000:]
    assert (output_dir / "config.json").is_file()
    lines = [json.loads(line) for line in (output_dir / QUARANTINE_FILE).read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(r["id"] for r in bad)
    by_id = {line["id"]: line for line in lines}
    line_numbers = {r["id"]: number for number, r in enumerate(records, start=1)}
    for name in BAD:
        line = by_id[f"bad_{name}"]
        assert line["video"] == str(corpus / "media" / name)
        assert (line["rank"], line["dataset"]) == (0, "train")
        assert line["source"] == f"{train_file}:{line_numbers[line['id']]}"
    assert "file is empty" in by_id["bad_empty.mp4"]["reason"]
    assert "file not found" in by_id["bad_missing.mp4"]["reason"]
    assert "not a readable media file" in by_id["bad_text.mp4"]["reason"]
    assert by_id["bad_hang.mp4"]["reason"] == "decoding timed out after 6s"
    assert f"5 of {len(records)} samples seen in the train set were unreadable" in result.stdout
    assert "unreadable sample 'bad_hang.mp4'" in result.stderr


def test_training_stops_when_bad_samples_pass_the_limit(corpus: Path, tmp_path: Path) -> None:
    good = _good_records(corpus)
    # 10 bad samples in 200 (5 %, over the default limit of 1 %), read in order, three of them early.
    bad_files = ("empty.mp4", "text.mp4", "truncated.mp4", "missing.mp4")
    bad_at = [1, 5, 9, 40, 60, 80, 100, 120, 140, 160]
    records = [good[i % len(good)] | {"id": f"good_{i}"} for i in range(200)]
    for n, i in enumerate(bad_at):
        records[i] = _record(f"bad_{i}", f"media/{bad_files[n % 4]}")
    train_file = _write_records(tmp_path / "five_percent.jsonl", records)
    output_dir = tmp_path / "out"

    result = _run_sft(corpus, train_file, output_dir, "--dataloader_num_workers", "0")

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr[-3000:]
    quarantine = output_dir / QUARANTINE_FILE
    # The 3rd bad sample passes 1 % of 200 (the data is certainly over the limit): the count, the fraction, the file.
    assert re.fullmatch(
        r"error: 3 unreadable samples of (\d+) seen on rank 0 \((\d+\.\d)%\) in the train set of 200, over "
        rf"max_bad_fraction=0\.01; stopped; they are listed in {re.escape(str(quarantine))}\. .*",
        error[0],
    ), error[0]
    # The 3 found first: read in order, or drawn as a replacement (bad too, and quarantined as well).
    quarantined = [json.loads(line)["id"] for line in quarantine.read_text().splitlines()]
    assert len(quarantined) == 3 and quarantined[0] == "bad_1"
    assert set(quarantined) <= {f"bad_{i}" for i in bad_at}
    assert not (output_dir / "config.json").exists()


# ------------------------------------------------------------------------------------------------ the policies


@pytest.fixture(scope="module")
def processor():
    """A tiny model's processor that decodes in-process (no time limit): cheap, for the policy tests."""
    _, processor = build_tiny_model_and_processor(projector_type="stc", sampling=SamplingSpec(num_frames=4))
    processor.decode_timeout = None
    return processor


def test_error_policy_raises_on_the_first_bad_sample_naming_the_file(corpus: Path, processor, tmp_path: Path) -> None:
    records = _good_records(corpus)[:2] + [_record("cut", "media/truncated.mp4")]
    train_file = _write_records(tmp_path / "train.jsonl", records)
    loaded = load_conversations(train_file, video_root=corpus)
    dataset = ConversationDataset(loaded, processor, BadSamplePolicy(action="error", quarantine_file=None))
    assert dataset[0]["input_ids"]
    # the record ids reach the batch for the non-finite guard, and only when asked for
    assert VideoCollator(processor, sample_ids=True)([dataset[1], dataset[0]])[SAMPLE_IDS] == [records[1]["id"], records[0]["id"]]
    assert SAMPLE_IDS not in VideoCollator(processor)([dataset[0]])
    with pytest.raises(BadSampleError) as info:
        dataset[2]
    message = failure_message(info.value)
    assert str(corpus / "media" / "truncated.mp4") in message
    assert message.startswith(f"sample 'cut' ({train_file}:3) of the train set: cannot read video")
    assert "truncated" in message


def test_skip_policy_replaces_logs_and_quarantines(corpus: Path, processor, tmp_path: Path, caplog) -> None:
    records = _good_records(corpus)[:3] + [_record("empty", "media/empty.mp4")]
    loaded = load_conversations(_write_records(tmp_path / "train.jsonl", records), video_root=corpus)
    policy = BadSamplePolicy(max_bad_fraction=1.0, quarantine_file=str(tmp_path / QUARANTINE_FILE))
    dataset = ConversationDataset(loaded, processor, policy)
    with caplog.at_level(logging.WARNING, logger="videollm.data.robust"):
        replaced = dataset[3]
        again = dataset[3]  # known bad: replaced again the same way, without decoding or counting it twice
    assert (dataset.guard.bad, dataset.guard.seen) == (1, 2)
    assert replaced["input_ids"] == again["input_ids"]
    assert replaced["input_ids"] in [dataset[i]["input_ids"] for i in range(3)]
    assert "unreadable sample 'empty'" in caplog.text
    lines = [json.loads(line) for line in (tmp_path / QUARANTINE_FILE).read_text().splitlines()]
    assert lines == [
        {
            "id": "empty",
            "video": str(corpus / "media" / "empty.mp4"),
            "reason": "file is empty (0 bytes)",
            "rank": 0,
            "source": f"{tmp_path / 'train.jsonl'}:4",
            "dataset": "train",
        }
    ]


class _FlakyMedia(Dataset):
    """`size` samples through a guard; the ones in `bad` raise VideoDecodeError (no video is decoded)."""

    def __init__(self, size: int, bad: set[int], policy: BadSamplePolicy):
        self.size, self.bad = size, bad
        self.guard = policy.guard(size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return self.guard.load(index, self._fetch, lambda i: SampleInfo(f"s{i}", [f"v{i}.mp4"], f"data.jsonl:{i + 1}"))

    def _fetch(self, index: int) -> int:
        if index in self.bad:
            raise VideoDecodeError(f"v{index}.mp4", "file is empty (0 bytes)")
        return index


def _error_from(loader: DataLoader) -> Exception:
    """The exception iterating `loader` ends with, without its traceback: the traceback would keep the iterator alive
    until a later garbage collection, whose shutdown of the worker processes then waits for their timeouts."""
    iterator = iter(loader)
    try:
        for _ in iterator:
            pass
    except Exception as error:
        return error.with_traceback(None)
    finally:
        del iterator
    raise AssertionError("the loader finished without an error")


def test_a_bad_sample_error_from_a_dataloader_worker_keeps_its_type_and_message() -> None:
    dataset = _FlakyMedia(20, {13}, BadSamplePolicy(action="error"))
    with pytest.raises(BadSampleError) as in_process:
        dataset[13]
    from_worker = _error_from(DataLoader(dataset, batch_size=4, num_workers=1))
    assert isinstance(from_worker, BadSampleError)
    assert "Original Traceback" in str(from_worker)
    assert failure_message(from_worker) == failure_message(in_process.value) == (
        "sample 's13' (data.jsonl:14) of the train set: cannot read video 'v13.mp4': file is empty (0 bytes); "
        "set bad_sample_policy: skip to replace unreadable samples instead"
    )


def test_one_bad_sample_in_200_finishes_and_is_counted_across_workers(tmp_path: Path) -> None:
    quarantine = tmp_path / QUARANTINE_FILE
    dataset = _FlakyMedia(200, {7}, BadSamplePolicy(quarantine_file=str(quarantine)))
    seen = [int(i) for batch in DataLoader(dataset, batch_size=10, num_workers=2) for i in batch]
    assert len(seen) == 200 and 7 not in seen
    assert (dataset.guard.bad, dataset.guard.seen) == (1, 200)  # the workers' counts, read in the parent
    assert [json.loads(line)["id"] for line in quarantine.read_text().splitlines()] == ["s7"]


def test_five_percent_bad_stops_with_the_count_the_fraction_and_the_file(tmp_path: Path) -> None:
    quarantine = tmp_path / QUARANTINE_FILE
    dataset = _FlakyMedia(200, set(range(0, 200, 20)), BadSamplePolicy(quarantine_file=str(quarantine)))
    error = _error_from(DataLoader(dataset, batch_size=10, num_workers=2))
    assert isinstance(error, BadSampleLimitExceeded)
    message = failure_message(error)
    assert re.fullmatch(
        r"\d+ unreadable samples of \d+ seen on rank 0 \(\d+\.\d%\) in the train set of 200, "
        r"over max_bad_fraction=0\.01; "
        rf"stopped; they are listed in {re.escape(str(quarantine))}\. .*",
        message,
    ), message


def test_abort_rule() -> None:
    # Never on the first bad sample of a short run over a large set; always once the set is certainly over the limit.
    assert not exceeds_limit(bad=1, seen=1, dataset_size=200, max_bad_fraction=0.01)
    assert not exceeds_limit(bad=1, seen=200, dataset_size=200, max_bad_fraction=0.01)
    assert not exceeds_limit(bad=2, seen=20, dataset_size=200, max_bad_fraction=0.01)
    assert exceeds_limit(bad=3, seen=20, dataset_size=200, max_bad_fraction=0.01)
    assert exceeds_limit(bad=2, seen=2, dataset_size=40, max_bad_fraction=0.01)
    # On a large set, the fraction seen decides once 1 / max_bad_fraction samples were seen.
    assert not exceeds_limit(bad=2, seen=99, dataset_size=100_000, max_bad_fraction=0.01)
    assert exceeds_limit(bad=2, seen=100, dataset_size=100_000, max_bad_fraction=0.01)
    assert not exceeds_limit(bad=10, seen=1000, dataset_size=100_000, max_bad_fraction=0.01)
    assert exceeds_limit(bad=1, seen=1, dataset_size=100, max_bad_fraction=0.0)
    assert not exceeds_limit(bad=99, seen=100, dataset_size=100, max_bad_fraction=1.0)


def test_replacements_are_deterministic_and_give_up_when_everything_is_bad(tmp_path: Path) -> None:
    policy = BadSamplePolicy(max_bad_fraction=1.0)
    first, second = _FlakyMedia(50, {3, 4}, policy), _FlakyMedia(50, {3, 4}, policy)
    assert first[3] == second[3] != 3 and first[4] == second[4] != 4
    hopeless = _FlakyMedia(50, set(range(50)), policy)
    expected = f"no readable replacement for sample 's0'.* in {MAX_REPLACEMENT_TRIES} tries"
    with pytest.raises(BadSampleLimitExceeded, match=expected):
        hopeless[0]


def test_missing_videos_are_fatal_up_front_only_under_the_error_policy(corpus: Path, tmp_path: Path) -> None:
    records = _good_records(corpus)[:2] + [_record("gone", "media/missing.mp4")]
    train_file = _write_records(tmp_path / "train.jsonl", records)
    skip, error = BadSamplePolicy(), BadSamplePolicy(action="error")
    assert [r.id for r in load_for_policy(load_conversations, train_file, corpus, skip)][-1] == "gone"
    with pytest.raises(DataValidationError, match=r"train.jsonl:3: video: video not found"):
        load_for_policy(load_conversations, train_file, corpus, error)
    # A schema problem stops every policy, and the report lists the missing video too.
    broken = _write_records(tmp_path / "broken.jsonl", records + [{"id": "no_turns", "video": "x.mp4"}])
    with pytest.raises(DataValidationError) as info:
        load_for_policy(load_conversations, broken, corpus, skip)
    assert [p.split(": ")[0] for p in info.value.problems] == [f"{broken}:3", f"{broken}:4"]
    assert "video not found" in info.value.problems[0] and "conversations" in info.value.problems[1]


def test_dpo_collator_replaces_unreadable_pairs_within_their_dataset(tmp_path: Path) -> None:
    def row(i: int, video: str) -> dict:
        return {"id": f"p{i}", "prompt": [{"role": "user", "content": "<video>\nq"}], "chosen": "a", "rejected": "b",
                "videos": [video]}  # fmt: skip

    def load_video(path: str) -> DecodedVideo:
        if "bad" in path:
            raise VideoDecodeError(path, "truncated")
        return DecodedVideo(torch.zeros((1, 3, 2, 2), dtype=torch.uint8), [0], [0.0], 1.0, path)

    train = [row(i, f"t{i}.mp4") for i in range(5)] + [row(5, "bad.mp4")]
    evaluation = [row(i, f"e{i}.mp4") for i in range(3)] + [row(3, "bad_eval.mp4")]  # same ids as train, other rows
    quarantine = tmp_path / QUARANTINE_FILE
    collator = BadSampleCollator(
        lambda rows: rows, load_video, {"train": train, "eval": evaluation},
        BadSamplePolicy(max_bad_fraction=1.0, quarantine_file=str(quarantine)),
    )  # fmt: skip
    batch = collator([train[0], train[5] | {"ref_chosen_logps": -1.0}])
    assert batch[0]["videos"][0].path == "t0.mp4"
    assert batch[1]["videos"][0].path in {f"t{i}.mp4" for i in range(5)}
    assert batch[1]["ref_chosen_logps"] == -1.0  # precomputed on this same replacement
    eval_batch = collator([evaluation[3]])
    assert eval_batch[0]["videos"][0].path in {f"e{i}.mp4" for i in range(3)}
    lines = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [(line["id"], line["video"], line["source"]) for line in lines] == [
        ("p5", "bad.mp4", "train[5]"),
        ("p3", "bad_eval.mp4", "eval[3]"),
    ]


def test_dpo_training_replaces_an_unreadable_pair_with_precomputed_reference(corpus: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "sft"
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=4))
    save_checkpoint(model, processor, checkpoint)
    model, processor = load_model(checkpoint)
    processor.decode_timeout = None  # decode in-process: this test is about the collator, not the time limit
    pairs = (corpus / "preference_train.jsonl").read_text().splitlines()
    broken = json.loads(pairs[0]) | {"id": "broken_pair", "video": "media/text.mp4"}
    train_file = _write_records(tmp_path / "pairs.jsonl", [json.loads(p) for p in pairs] + [broken])
    policy = BadSamplePolicy(max_bad_fraction=0.5, quarantine_file=str(tmp_path / QUARANTINE_FILE))
    rows = preference_rows(load_for_policy(load_preferences, train_file, corpus, policy))
    dataset = build_preference_dataset(rows, processor, cache_dir=str(tmp_path / "datasets"))
    args = VideoDPOConfig(
        output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
        use_cpu=True, bf16=False, gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no",
        dataloader_num_workers=0, precompute_ref_log_probs=True, seed=0,
    )  # fmt: skip
    lora = TrainablePolicy(llm="lora", projector="frozen", lora_r=4, lora_dropout=0.0)

    trainer = train_dpo(apply_trainable_policy(model, lora), processor, [dataset], None, args, lora, policy)

    assert trainer.state.global_step == 3
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    # Found once, in the reference pre-computation; training replaced it again (same guard) without a second line.
    lines = [json.loads(line) for line in (tmp_path / QUARANTINE_FILE).read_text().splitlines()]
    assert [(line["id"], line["video"]) for line in lines] == [("broken_pair", str(corpus / "media" / "text.mp4"))]
    # every pair once in the pre-computation (the good ones and the broken one), nothing counted twice in training
    assert (trainer.data_collator.guards["train"].bad, trainer.data_collator.guards["train"].seen) == (1, len(pairs) + 1)


# --------------------------------------------------------------------------------------------- safe defaults


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that can run code from data: pickle loading, torch.load without weights_only=True, numpy pickles,
    remote model code."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "dill", "cloudpickle"):
            for alias in node.names:
                if alias.name in ("load", "loads", "Unpickler"):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}

        def is_true(key: str) -> bool:
            return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True

        if re.fullmatch(r"(c?pickle|_pickle|dill|cloudpickle)\.(load|loads|Unpickler)", name):
            found.append((node.lineno, name))
        elif name == "torch.load" and not is_true("weights_only"):
            found.append((node.lineno, "torch.load without weights_only=True"))
        elif name in ("np.load", "numpy.load") and is_true("allow_pickle"):
            found.append((node.lineno, f"{name}(allow_pickle=True)"))
        if is_true("trust_remote_code"):
            found.append((node.lineno, f"{name}(trust_remote_code=True)"))
    return sorted(found)


def test_the_package_never_unpickles_or_runs_remote_code() -> None:
    offenders = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(REPO / "recipes").glob("*.py"), *(REPO / "data_tools").glob("*.py")]):
        for line, what in _unsafe_calls(ast.parse(path.read_text(), filename=str(path))):
            offenders.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert offenders == []


def test_the_unsafe_call_check_finds_what_it_looks_for() -> None:
    source = textwrap.dedent(
        """
        import pickle, torch
        from pickle import loads
        pickle.loads(b"")
        torch.load("x.pt")
        torch.load("x.pt", weights_only=False)
        torch.load("x.pt", weights_only=True)
        np.load("x.npy", allow_pickle=True)
        AutoModel.from_pretrained("m", trust_remote_code=True)
        AutoModel.from_pretrained("m", trust_remote_code=False)
        """
    )
    assert [line for line, _ in _unsafe_calls(ast.parse(source))] == [3, 4, 5, 6, 8, 9]


def test_a_resumed_run_does_not_list_a_bad_sample_twice(tmp_path):
    """A sample quarantined after the last checkpoint is met again after a resume; its line is written once."""
    from videollm.data.robust import _append_once

    path = tmp_path / "quarantine.jsonl"
    first = {"id": "a", "dataset": "train", "video": "a.mp4", "reason": "truncated", "rank": 0}
    _append_once(str(path), first, key=("id", "dataset"))
    _append_once(str(path), {**first, "rank": 1}, key=("id", "dataset"))
    _append_once(str(path), {**first, "dataset": "eval"}, key=("id", "dataset"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["id"], line["dataset"], line["rank"]) for line in lines] == [("a", "train", 0), ("a", "eval", 0)]
