"""Video-STaR self-training: labelled videos in, a better model out, with no answer text written by anyone.

    python recipes/star.py --config recipes/configs/star_tiny.yaml [--key value ...]

Reads labelled records (`{"video", "question", "label", "label_type"?}`) from `train_file` and, for up to `cycles`
cycles, generates answers with the latest model, keeps those its verifier accepts, rationalises the failures with the
label in the prompt, retrains (from the seed model by default), and evaluates on `eval_file`. Everything lands in
`output_dir`: one folder per cycle (samples with provenance, training data, checkpoint, evaluation) and a summary
table (printed, summary.md, summary.png). Rerunning the same command after an interruption resumes the run.

Keys: the SFT recipe's model, data and trainer keys (`model_name_or_path` is the seed model) plus
`videollm.selftrain.star.StarArguments` (see --help).
"""

import logging
import sys

from videollm.data.formats import DataValidationError
from videollm.selftrain.runs import RunSettingsMismatch
from videollm.selftrain.star import StarArguments, run_star
from videollm.train.config import DataArguments, ModelArguments, parse_config
from videollm.train.setup import training_failures_as_errors
from videollm.train.sft import VideoSFTConfig


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_args, data_args, star_args, training_args = parse_config(
        [ModelArguments, DataArguments, StarArguments, VideoSFTConfig]
    )
    if data_args.train_file is None:
        sys.exit("error: train_file is required (labelled records: video, question, label)")
    try:
        with training_failures_as_errors(model_args, data_args, training_args):
            rows = run_star(model_args, data_args, star_args, training_args)
    except DataValidationError as error:
        sys.exit(f"error: invalid data, nothing was trained:\n{error}")
    except RunSettingsMismatch as error:
        sys.exit(f"error: {error}")
    if training_args.process_index == 0:
        print(f"summary: {training_args.output_dir}/summary.md; best model: {max(rows, key=_accuracy)['model']}")


def _accuracy(row: dict) -> float:
    return row.get("metric", row.get("accuracy")) or 0.0


if __name__ == "__main__":
    main()
