"""End-to-end checks of the SFT recipe as users run it: a subprocess per run, tiny model, tiny synthetic data."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.model.checkpoint import load_model

from commands import REPO, accelerate_launch, run, two_cpu_processes

TINY_CONFIG = "recipes/configs/sft_tiny.yaml"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(SyntheticConfig(output_dir=str(root), num_train=16, num_eval=4, num_test=4))
    return root


def sft_args(data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "recipes/sft.py",
        "--config", TINY_CONFIG,
        "--train_file", str(data / "train.jsonl"),
        "--video_root", str(data),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--dataloader_num_workers", "0",
        "--logging_steps", "1",
        *extra,
    ]  # fmt: skip


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.mark.parametrize("projector_type", ["mlp", "pool", "qformer", "stc"])
def test_every_projector_trains_with_the_tiny_config(synthetic, tmp_path, projector_type):
    output_dir = tmp_path / "out"
    result = run([sys.executable, *sft_args(synthetic, output_dir, "--projector_type", projector_type, "--max_steps", "2")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(logged_losses(output_dir)) == 2
    model, processor = load_model(output_dir)
    assert model.config.projector_type == projector_type
    assert processor.spec.num_frames == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_records_are_all_reported_before_training(synthetic, tmp_path):
    lines = (synthetic / "train.jsonl").read_text().splitlines()
    broken = json.loads(lines[2])
    broken["video"] = "videos/train/missing.mp4"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], "{not json", json.dumps(broken), lines[3]]) + "\n")
    output_dir = tmp_path / "out"

    result = run([sys.executable, *sft_args(synthetic, output_dir)[:3], "--train_file", str(bad),
                  "--video_root", str(synthetic), "--output_dir", str(output_dir)])  # fmt: skip
    assert result.returncode != 0
    assert f"{bad}:2" in result.stderr and f"{bad}:3" in result.stderr
    assert "missing.mp4" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (output_dir / "config.json").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--no_such_key", "1"], r"no_such_key"),
        (["--max_steps", "many"], r"max_steps"),
        (["--train_file", "does/not/exist.jsonl"], r"train_file: does/not/exist.jsonl does not exist"),
        (["--projector_type", "transformer"], r"projector_type"),
    ],
)
def test_bad_cli_input_gives_one_clear_line(synthetic, tmp_path, override, expected):
    result = run([sys.executable, *sft_args(synthetic, tmp_path / "out"), *override])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and re.search(expected, error_lines[0]), result.stderr[-2000:]


def test_missing_config_file_gives_one_clear_line(tmp_path):
    result = run([sys.executable, "recipes/sft.py", "--config", str(tmp_path / "nope.yaml")])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: --config: file not found: {tmp_path / 'nope.yaml'}"


def test_a_checkpoint_on_the_command_line_replaces_the_configs_pretrained_parts(saved_model, caplog):
    """`--model_name_or_path outputs/sft_7b` over sft_siglip_qwen2.5_7b.yaml continues from the checkpoint, as the
    README says, instead of failing on "exactly one model source"."""
    from videollm.train.config import DataArguments, ModelArguments, parse_config
    from videollm.train.sft import VideoSFTConfig

    config = str(REPO / "recipes/configs/sft_siglip_qwen2.5_7b.yaml")
    with caplog.at_level("WARNING", logger="videollm.train.config"):
        model_args, *_ = parse_config([ModelArguments, DataArguments, VideoSFTConfig],
                                      ["--config", config, "--model_name_or_path", str(saved_model), "--report_to", "none"])  # fmt: skip
    assert model_args.model_name_or_path == str(saved_model)
    assert (model_args.vision_name_or_path, model_args.llm_name_or_path) == (None, None)
    assert "llm_name_or_path Qwen/Qwen2.5-7B-Instruct are ignored" in caplog.text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tune_llm", "lora"], "error: tune_llm: lora trains an adapter over pretrained weights, and tiny: true"),
        (["--report_to", "tensorboard"], "error: report_to: tensorboard is not installed: pip install tensorboard"),
    ],
)
def test_settings_that_would_fail_after_the_model_is_built_are_refused_at_parse_time(extra, message, capsys):
    from videollm.train.config import DataArguments, ModelArguments, parse_config
    from videollm.train.sft import VideoSFTConfig

    with pytest.raises(SystemExit):
        parse_config([ModelArguments, DataArguments, VideoSFTConfig], ["--tiny", "true", "--tune_llm", "full", *extra])
    assert capsys.readouterr().err.strip().startswith(message)


def test_max_frames_without_fps_is_refused_naming_it(capsys):
    """A frame cap without fps would leave the checkpoint's (or num_frames') spec in force and the cap unused."""
    from videollm.train.config import DataArguments, ModelArguments, parse_config
    from videollm.train.sft import VideoSFTConfig

    with pytest.raises(SystemExit):
        parse_config([ModelArguments, DataArguments, VideoSFTConfig], ["--tiny", "true", "--tune_llm", "full", "--max_frames", "16"])
    assert capsys.readouterr().err.strip() == "error: max_frames: 16 caps sampling by rate only; set fps too, or use num_frames"
    assert DataArguments(fps=2.0, max_frames=16).sampling_spec().max_frames == 16


def _two_rank_run(synthetic: Path, output_dir: Path, launcher: list[str]) -> str:
    result = run([*launcher, *sft_args(synthetic, output_dir, "--max_steps", "6", "--learning_rate", "3e-3",
                                       "--warmup_steps", "0", "--per_device_train_batch_size", "2")], timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    finished = sorted(re.findall(r"rank (\d) of (\d) finished after (\d+) steps", result.stdout))
    assert finished == [("0", "2", "6"), ("1", "2", "6")], result.stdout[-2000:]
    losses = logged_losses(output_dir)
    assert len(losses) == 6 and losses[-1] < losses[0]
    return result.stdout


def test_two_process_ddp_on_cpu(synthetic, tmp_path):
    launcher = two_cpu_processes()
    _two_rank_run(synthetic, tmp_path / "out", launcher)
    load_model(tmp_path / "out")


def test_two_process_deepspeed_zero2_on_cpu(synthetic, tmp_path):
    launcher = accelerate_launch("launch/cpu_2proc_zero2.yaml")
    stdout = _two_rank_run(synthetic, tmp_path / "out", launcher)
    assert "zero_stage=2" in stdout
    load_model(tmp_path / "out")


def test_two_process_deepspeed_zero3_from_pretrained_parts_on_cpu(synthetic, tmp_path):
    """ZeRO-3 partitions every weight as it is built: the model assembled from a pretrained tower and LLM (embeddings
    grown for the video token) trains with LoRA on 2 ranks, and the saved model holds the tower and the old
    embedding rows unchanged, the new row their mean."""
    from transformers import AutoModel, AutoModelForCausalLM

    from videollm.data.tokenizer import build_tiny_tokenizer
    from videollm.model.presets import tiny_text_config, tiny_vision_config

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    tower = AutoModel.from_config(tiny_vision_config("siglip", image_size=32))
    llm = AutoModelForCausalLM.from_config(tiny_text_config(len(tokenizer) - 1))  # no row for the video token yet
    tower.save_pretrained(tmp_path / "siglip")
    llm.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    launcher = accelerate_launch("launch/cpu_2proc_zero3.yaml")
    parts = ["--tiny", "false", "--vision_name_or_path", str(tmp_path / "siglip"), "--llm_name_or_path",
             str(tmp_path / "qwen"), "--tune_llm", "lora", "--lora_r", "8"]  # fmt: skip
    result = run([*launcher, *sft_args(synthetic, tmp_path / "out", "--max_steps", "6", "--learning_rate", "3e-3",
                                       "--warmup_steps", "0", "--per_device_train_batch_size", "2", *parts)], timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "zero_stage=3" in result.stdout
    assert sorted(re.findall(r"rank (\d) of (\d) finished after (\d+) steps", result.stdout)) == [("0", "2", "6"), ("1", "2", "6")]
    losses = logged_losses(tmp_path / "out")
    assert len(losses) == 6 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]

    trained, _ = load_model(tmp_path / "out", merge=True)
    pretrained_tower = tower.state_dict()
    for name, value in trained.model.vision_tower.state_dict().items():  # the layers kept (those up to the feature layer)
        assert torch.equal(value, pretrained_tower[name]), name
    embeddings = trained.get_input_embeddings().weight.detach()
    old = llm.get_input_embeddings().weight.detach()
    assert embeddings.shape[0] == len(tokenizer) and torch.equal(embeddings[:-1], old)
    assert torch.allclose(embeddings[-1], old.mean(0), atol=1e-6)


def test_star_cycle_on_two_deepspeed_zero3_processes_generates_with_whole_weights(synthetic, saved_model, tmp_path):
    """Under ZeRO-3 transformers partitions every model it loads, so sampling and evaluation load theirs with whole
    weights; the two processes then answer different numbers of batches (2 and 1 of 3) without waiting for each
    other's decoding steps (transformers' lockstep decoding under ZeRO-3 hung them), and train partitioned."""
    launcher = accelerate_launch("launch/cpu_2proc_zero3.yaml")
    result = run([*launcher, "recipes/star.py", "--config", "recipes/configs/star_tiny.yaml", "--model_name_or_path",
                  str(saved_model), "--train_file", str(synthetic / "labels_train.jsonl"), "--eval_file",
                  str(synthetic / "labels_eval.jsonl"), "--video_root", str(synthetic), "--output_dir", str(tmp_path / "run"),
                  "--cycles", "1", "--max_steps", "2", "--num_samples", "2", "--generation_batch_size", "16",
                  "--rationalize", "false", "--verifier", "operator:ne", "--per_device_train_batch_size", "2",
                  "--dataloader_num_workers", "0", "--stop_when_no_gain", "false"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    questions = len((synthetic / "labels_train.jsonl").read_text().splitlines())
    assert questions == 48  # 3 batches of 16
    shares = re.findall(r"cycle 1, answer: process (\d) of 2 answered (\d) of the 3 batches", result.stderr)
    assert sorted(shares) == [("0", "2"), ("1", "1")]
    samples = [json.loads(line) for line in (tmp_path / "run" / "cycle_1" / "samples.jsonl").read_text().splitlines()]
    assert len({s["prompt_id"] for s in samples}) == questions
    assert json.loads((tmp_path / "run" / "cycle_0" / "eval.json").read_text())["num_samples"] > 0
    # every answer other than the label verifies (operator:ne), so the cycle trains, partitioned, on both processes
    assert sorted(re.findall(r"rank (\d) of 2 finished after 2 steps \(deepspeed zero_stage=3", result.stderr)) == ["0", "1"]
    load_model(tmp_path / "run" / "cycle_1" / "checkpoint")
