"""Self-preference rounds (LLaVA-OneVision-Chat iterative DPO, VideoSAVi): the model's own answers, scored, become DPO
pairs; each round trains from the last one.

    python recipes/self_preference.py --config recipes/configs/self_preference_tiny.yaml [--key value ...]

Each of `rounds` rounds samples `num_samples` answers per question of `train_file`, scores them with the record's
verifier (`scorer: verifier`) or a judge model (`scorer: judge`), pairs the best with the worst, trains one DPO round
(every key of recipes/dpo.py: loss_type, beta, LoRA, ...) and evaluates on `eval_file`. Everything lands in
`output_dir`, one folder per round, with a summary table; rerunning the same command resumes the run.

Keys: the DPO recipe's model, data and trainer keys plus `videollm.selftrain.self_preference.SelfPreferenceArguments`.
"""

import logging
import sys

from videollm.data.formats import DataValidationError
from videollm.selftrain.runs import RunSettingsMismatch
from videollm.selftrain.self_preference import SelfPreferenceArguments, run_self_preference
from videollm.train.config import DataArguments, ModelArguments, parse_config
from videollm.train.dpo import VideoDPOConfig
from videollm.train.setup import training_failures_as_errors


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_args, data_args, pref_args, dpo_args = parse_config(
        [ModelArguments, DataArguments, SelfPreferenceArguments, VideoDPOConfig]
    )
    if data_args.train_file is None:
        sys.exit("error: train_file is required (labelled records: video, question, label)")
    if dpo_args.round_train_files:
        sys.exit("error: round_train_files: self-preference rounds make their own pairs; set rounds instead")
    try:
        with training_failures_as_errors(model_args, data_args, dpo_args):
            rows = run_self_preference(model_args, data_args, pref_args, dpo_args)
    except DataValidationError as error:
        sys.exit(f"error: invalid data, nothing was trained:\n{error}")
    except RunSettingsMismatch as error:
        sys.exit(f"error: {error}")
    best = max(rows, key=lambda row: row.get("metric", row.get("accuracy")) or 0.0)
    if dpo_args.process_index == 0:
        print(f"summary: {dpo_args.output_dir}/summary.md; best model: {best['model']}")


if __name__ == "__main__":
    main()
