"""User mistakes at the command-line entry points end in one line that names the flag, key, file or line, before any
model is loaded: never a traceback, never a run that quietly does something else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from videollm.data.formats import DataValidationError, load_conversations, load_labelled, load_preferences
from videollm.train.config import DataArguments, ModelArguments, parse_config
from videollm.train.sft import VideoSFTConfig

SFT = [ModelArguments, DataArguments, VideoSFTConfig]
TINY = ["--tiny", "true", "--tune_llm", "full", "--report_to", "none"]


@pytest.fixture
def videollm_dir(tmp_path) -> Path:
    """Passes the cheap checkpoint check (a config.json of model_type videollm): the argument checks that follow are
    what these tests exercise, and none of them loads the model."""
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "videollm"}))
    return path


@pytest.fixture
def plain_hf_dir(tmp_path) -> Path:
    """A plain transformers LLM directory, not a videollm checkpoint."""
    path = tmp_path / "qwen"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    return path


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    # a label next to the conversation, as the synthetic SFT files have
    path.write_text('{"video": "a.mp4", "label": "up", "conversations": [{"from": "human", "value": "<video>\\nq"}, {"from": "gpt", "value": "up"}]}\n')
    return path


def parse_error(capsys, dataclass_types, args) -> str:
    """The one line `parse_config` prints for `args`, after checking it exits with code 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse_config(dataclass_types, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# recipes: parse_config -------------------------------------------------------------------------------------------


def test_a_typo_d_yaml_key_names_the_file_line_and_the_key_it_resembles(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("tiny: true\ntune_llm: full\nreport_to: none\nlerning_rate: 1.0e-3\n")
    err = parse_error(capsys, SFT, ["--config", str(config)])
    assert err == f"error: {config}:4: unknown key lerning_rate (did you mean learning_rate?)"


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("tiny: true\n  tune_llm: [full\n")
    err = parse_error(capsys, SFT, ["--config", str(config)])
    assert err == f"error: --config: {config}:2: not valid YAML (mapping values are not allowed here)"


def test_an_unknown_command_line_flag_suggests_the_flag_it_resembles(capsys):
    err = parse_error(capsys, SFT, [*TINY, "--lerning_rate", "3"])
    assert err == "error: --lerning_rate: unknown argument (did you mean --learning_rate?)"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--per_device_train_batch_size", "0", "error: per_device_train_batch_size: must be >= 1, got 0"),
        ("--gradient_accumulation_steps", "0", "error: gradient_accumulation_steps: must be >= 1, got 0"),
    ],
)
def test_a_zero_batch_size_or_accumulation_is_refused_before_the_model_is_built(flag, value, message, capsys):
    """The Trainer would fail on these only after the model is built: a sampler traceback, a ZeroDivisionError."""
    assert parse_error(capsys, SFT, [*TINY, flag, value]) == message


def test_max_steps_zero_is_refused_instead_of_training_for_num_train_epochs(capsys):
    err = parse_error(capsys, SFT, [*TINY, "--max_steps", "0"])
    assert err == "error: max_steps: must be >= 1 (or -1 to train for num_train_epochs), got 0"


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    err = parse_error(capsys, SFT, [*TINY, "--output_dir", str(existing)])
    assert err == f"error: output_dir: {existing} is a file, not a directory"
    assert existing.read_text() == "keep me"


def test_a_tune_value_typo_names_the_config_key(capsys):
    err = parse_error(capsys, SFT, [*TINY, "--tune_llm", "ful"])
    assert err == "error: tune_llm: 'ful' is not one of lora | full | frozen"


def test_lora_rank_zero_is_refused_at_parse_time(videollm_dir, capsys):
    err = parse_error(capsys, SFT, ["--model_name_or_path", str(videollm_dir), "--lora_r", "0", "--report_to", "none"])
    assert err == "error: lora_r: must be >= 1, got 0"


def test_a_plain_transformers_dir_is_not_taken_for_a_videollm_checkpoint(plain_hf_dir, capsys):
    err = parse_error(capsys, SFT, ["--model_name_or_path", str(plain_hf_dir), "--tune_llm", "full", "--report_to", "none"])
    assert err.startswith(
        f"error: model_name_or_path: {plain_hf_dir} is not a videollm checkpoint (config.json has model_type 'qwen2'"
    )


def test_a_non_positive_dpo_beta_is_refused(videollm_dir, capsys):
    from videollm.train.dpo import VideoDPOConfig

    args = ["--model_name_or_path", str(videollm_dir), "--beta", "-1", "--report_to", "none"]
    assert parse_error(capsys, [ModelArguments, DataArguments, VideoDPOConfig], args) == "error: beta: must be > 0, got -1.0"


def test_self_training_max_new_tokens_zero_is_refused_before_the_seed_model_is_loaded():
    from videollm.selftrain.star import StarArguments

    with pytest.raises(ValueError, match=r"^max_new_tokens: must be >= 1, got 0$"):
        StarArguments(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"^eval_max_new_tokens: must be >= 1, got 0$"):
        StarArguments(eval_max_new_tokens=0)


# data of another kind ---------------------------------------------------------------------------------------------


def test_labelled_records_given_to_sft_or_eval_are_named_as_labelled(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"video": "a.mp4", "question": "which way?", "label": "up"}\n')
    with pytest.raises(DataValidationError) as error:
        load_conversations(path)
    assert str(error.value).splitlines()[0] == (
        f"{path}:1: missing 'conversations' (LLaVA style) or 'messages' (this looks like a labelled record: "
        "question + label, for recipes/star.py and recipes/self_preference.py)"
    )


def test_conversation_records_given_to_star_are_named_as_conversations(data_file):
    with pytest.raises(DataValidationError) as error:
        load_labelled(data_file)
    assert str(error.value).splitlines()[0] == (
        f"{data_file}:1: question: missing (this looks like a conversation record: SFT data, for recipes/sft.py and "
        "videollm.eval)"
    )


def test_conversation_records_given_to_dpo_are_named_as_conversations(data_file):
    with pytest.raises(DataValidationError) as error:
        load_preferences(data_file)
    assert str(error.value).splitlines()[0] == (
        f"{data_file}:1: missing 'prompt', 'chosen' and 'rejected' (this looks like a conversation record: SFT data, "
        "for recipes/sft.py and videollm.eval)"
    )


# python -m videollm.eval --------------------------------------------------------------------------------------------


def run_eval(argv) -> str:
    from videollm.eval.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--device", "cpu"])
    return exit_info.value.code


def test_eval_refuses_a_plain_transformers_model(plain_hf_dir, data_file, tmp_path):
    code = run_eval(["--model", str(plain_hf_dir), "--data", str(data_file), "--output", str(tmp_path / "r.json")])
    assert code.startswith(f"error: --model: {plain_hf_dir} is not a videollm checkpoint (config.json has model_type")


def test_eval_refuses_an_empty_model_dir(tmp_path, data_file):
    (tmp_path / "empty").mkdir()
    code = run_eval(["--model", str(tmp_path / "empty"), "--data", str(data_file), "--output", str(tmp_path / "r.json")])
    assert code == f"error: --model: {tmp_path / 'empty'} is not a videollm checkpoint (no config.json)"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch_size", "0"], "error: --batch_size: must be >= 1, got 0"),
        (["--limit", "-1"], "error: --limit: must be >= 1, got -1"),
        (["--max_new_tokens", "0"], "error: --max_new_tokens: must be >= 1, got 0"),
    ],
)
def test_eval_refuses_bad_numbers_before_loading_the_model(extra, message, videollm_dir, data_file, tmp_path):
    assert run_eval(["--model", str(videollm_dir), "--data", str(data_file), "--output", str(tmp_path / "r.json"), *extra]) == message


def test_eval_refuses_an_output_that_is_a_directory_before_evaluating(videollm_dir, data_file, tmp_path):
    code = run_eval(["--model", str(videollm_dir), "--data", str(data_file), "--output", str(tmp_path)])
    assert code.startswith(f"error: --output: {tmp_path} is a directory; give the summary's file name")


# python -m videollm.infer.batch / chat / export -------------------------------------------------------------------


def run_batch(argv) -> str:
    from videollm.infer.batch import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--device", "cpu"])
    return exit_info.value.code


def test_batch_refuses_an_output_that_is_a_directory(videollm_dir, data_file, tmp_path):
    code = run_batch(["--model", str(videollm_dir), "--data", str(data_file), "--output", str(tmp_path)])
    assert code.startswith(f"error: --output: {tmp_path} is a directory; give the answers file")


def test_batch_refuses_the_data_file_as_output(videollm_dir, data_file):
    """Otherwise every record counts as already answered ("0 answered") and the data file is appended to."""
    before = data_file.read_text()
    code = run_batch(["--model", str(videollm_dir), "--data", str(data_file), "--output", str(data_file)])
    assert code == "error: --output: must not be the --data file"
    assert data_file.read_text() == before


def test_batch_refuses_a_negative_limit(videollm_dir, data_file, tmp_path):
    code = run_batch(["--model", str(videollm_dir), "--data", str(data_file), "--output", str(tmp_path / "a.jsonl"), "--limit", "-2"])
    assert code == "error: --limit: must be >= 1, got -2"


def test_batch_refuses_sampling_at_temperature_zero(videollm_dir, data_file, tmp_path):
    argv = ["--model", str(videollm_dir), "--data", str(data_file), "--output", str(tmp_path / "a.jsonl"),
            "--do_sample", "true", "--temperature", "0"]  # fmt: skip
    assert run_batch(argv).startswith("error: --temperature: must be > 0 when sampling, got 0.0")


def test_chat_refuses_max_new_tokens_zero(videollm_dir):
    from videollm.infer.chat import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(videollm_dir), "--prompt", "hi", "--max_new_tokens", "0", "--device", "cpu"])
    assert exit_info.value.code == "error: --max_new_tokens: must be >= 1, got 0"


def test_export_refuses_a_plain_transformers_model(plain_hf_dir, tmp_path):
    from videollm.export import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(plain_hf_dir), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code.startswith(f"error: --model: {plain_hf_dir} is not a videollm checkpoint")


def test_export_refuses_a_non_empty_output_dir_and_leaves_it_alone(videollm_dir, tmp_path):
    from videollm.export import main

    other = tmp_path / "other_ckpt"
    other.mkdir()
    (other / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(videollm_dir), "--output_dir", str(other)])
    assert exit_info.value.code == f"error: --output_dir: {other} is not empty; give a new directory"
    assert [p.name for p in other.iterdir()] == ["adapter_config.json"]


# data_tools -------------------------------------------------------------------------------------------------------


def test_make_synthetic_bad_setting_is_one_line(tmp_path, capsys):
    from data_tools.make_synthetic import main

    assert main(["--output_dir", str(tmp_path / "syn"), "--num_frames", "1"]) == 2
    assert capsys.readouterr().err.strip() == "error: num_frames must be >= 2 (direction needs motion)"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--limit", "-1"], "error: --limit: must be >= 1, got -1"),
        (["--batch_size", "0"], "error: --batch_size: must be >= 1, got 0"),
    ],
)
def test_make_preferences_refuses_bad_numbers(extra, message, videollm_dir, tmp_path, capsys):
    from data_tools.make_preferences import main

    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"video": "a.mp4", "question": "which way?", "label": "up"}\n')
    argv = ["--model", str(videollm_dir), "--input", str(labels), "--output", str(tmp_path / "p.jsonl"), "--device", "cpu"]
    assert main([*argv, *extra]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "p.jsonl.progress").exists()


def test_make_preferences_refuses_a_plain_transformers_model_before_writing_anything(plain_hf_dir, tmp_path, capsys):
    from data_tools.make_preferences import main

    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"video": "a.mp4", "question": "which way?", "label": "up"}\n')
    argv = ["--model", str(plain_hf_dir), "--input", str(labels), "--output", str(tmp_path / "p.jsonl"), "--device", "cpu"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: --model: {plain_hf_dir} is not a videollm checkpoint")
    assert not (tmp_path / "p.jsonl.progress").exists()
