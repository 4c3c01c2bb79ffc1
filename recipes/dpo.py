"""Direct preference optimisation of a video LLM (TRL's loss types, RRPO, multi-round DPO, curricula).

    accelerate launch recipes/dpo.py --config recipes/configs/dpo_tiny.yaml [--key value ...]

Reads `{"video", "prompt", "chosen", "rejected"}` (or messages-style) preference records, loads the starting
checkpoint (`model_name_or_path`, e.g. an SFT model), trains with `VideoDPOTrainer`, and saves the final model
(adapter or full, with projector and processor) in `output_dir` itself.

    --loss_type sigmoid sft --loss_weights 1.0 0.1     DPO + NLL on the chosen answer (RPO / mrDPO / TEMPLE)
    --loss_type rrpo --loss_weights 1.0 --rrpo_alpha 0.01
                                                       RRPO (phrase rewards from chosen_phrases / rejected_phrases);
                                                       one weight per loss type (dpo_tiny.yaml sets two)
    --rounds 3                                         mrDPO: merge the LoRA after each round, it becomes the reference
    --round_train_files s1.jsonl s2.jsonl ...          one file per round: a curriculum (make_preferences.py writes it)
    --precompute_ref_log_probs true                    compute reference log-probs once, cached next to the dataset
    --feature_cache_dir cache/dpo                      read frozen vision features written by data_tools/cache_features.py
"""

import sys

from videollm.data.formats import DataValidationError, load_preferences
from videollm.data.robust import BadSamplePolicy, bad_sample_summaries, load_for_policy
from videollm.train.config import DataArguments, ModelArguments, parse_config
from videollm.train.dpo import VideoDPOConfig, build_preference_dataset, preference_rows, train_dpo
from videollm.train.setup import load_or_build, run_summary, training_failures_as_errors


def main() -> None:
    model_args, data_args, dpo_args = parse_config([ModelArguments, DataArguments, VideoDPOConfig])
    train_files = dpo_args.round_train_files or ([data_args.train_file] * dpo_args.rounds if data_args.train_file else [])
    if not train_files:
        sys.exit("error: train_file (or round_train_files) is required")

    # Validate every record (schema, placeholders, video files, marked phrases) before any model is built; with
    # bad_sample_policy: skip a missing video is replaced and quarantined during training, like a corrupt one.
    bad_samples = BadSamplePolicy.from_args(data_args, dpo_args)
    try:
        rows = {
            path: preference_rows(load_for_policy(load_preferences, path, data_args.video_root, bad_samples))
            for path in set(train_files)
        }
        eval_file = data_args.eval_file
        eval_rows = (
            preference_rows(load_for_policy(load_preferences, eval_file, data_args.video_root, bad_samples))
            if eval_file
            else None
        )
    except DataValidationError as error:
        sys.exit(f"error: invalid data, nothing was trained:\n{error}")

    model, processor = load_or_build(model_args, data_args, seed=dpo_args.seed, training_args=dpo_args)
    with dpo_args.main_process_first(desc="preference datasets"):
        datasets = {path: build_preference_dataset(file_rows, processor) for path, file_rows in rows.items()}
        eval_set = build_preference_dataset(eval_rows, processor) if eval_rows else None
    with training_failures_as_errors(model_args, data_args, dpo_args):
        trainer = train_dpo(
            model,
            processor,
            [datasets[path] for path in train_files],
            eval_set,
            dpo_args,
            model_args.policy(),
            bad_samples,
            feature_cache_dir=data_args.feature_cache_dir,
            video_root=data_args.video_root,
        )
    for line in bad_sample_summaries(trainer.data_collator.guards.values()):
        print(line, flush=True)
    print(run_summary(trainer), flush=True)
    if trainer.is_world_process_zero():
        print(f"saved model to {dpo_args.output_dir}")


if __name__ == "__main__":
    main()
