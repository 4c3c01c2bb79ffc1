"""Supervised fine-tuning of a video LLM.

    accelerate launch recipes/sft.py --config recipes/configs/sft_tiny.yaml [--key value ...]

Reads LLaVA- or messages-style records, builds or loads the model, trains with the HF Trainer, and saves the final
model (adapter or full, with projector and processor) in `output_dir` itself.
"""

import sys

from videollm.data.dataset import ConversationDataset, VideoCollator
from videollm.data.feature_cache import CachedFeatureDataset, FeatureCache
from videollm.data.formats import DataValidationError, load_conversations
from videollm.data.packing import PackingCollator, dense_packing_warning
from videollm.data.robust import BadSamplePolicy, bad_sample_summaries, load_for_policy
from videollm.train.config import DataArguments, ModelArguments, parse_config
from videollm.train.setup import load_or_build, run_summary, training_failures_as_errors
from videollm.train.sft import VideoSFTConfig, VideoSFTTrainer


def main() -> None:
    model_args, data_args, training_args = parse_config([ModelArguments, DataArguments, VideoSFTConfig])
    if data_args.train_file is None:
        sys.exit("error: train_file is required")

    # Validate every record (schema, placeholders, video files) before any model is built; with bad_sample_policy: skip
    # a missing video is replaced and quarantined during training, like a corrupt one.
    bad_samples = BadSamplePolicy.from_args(data_args, training_args)
    try:
        train_records = load_for_policy(load_conversations, data_args.train_file, data_args.video_root, bad_samples)
        eval_records = (
            load_for_policy(load_conversations, data_args.eval_file, data_args.video_root, bad_samples)
            if data_args.eval_file
            else None
        )
    except DataValidationError as error:
        sys.exit(f"error: invalid data, nothing was trained:\n{error}")

    model, processor = load_or_build(model_args, data_args, seed=training_args.seed, training_args=training_args)
    collator = PackingCollator(sample_ids=True) if data_args.packing else VideoCollator(processor, sample_ids=True)
    if data_args.packing and (note := dense_packing_warning(model.config.text_config._attn_implementation)):
        print(f"warning: {note}", file=sys.stderr, flush=True)
    # Failures of the run (a feature cache of other weights or spec, non-finite steps, unreadable videos, out of
    # memory) end it with one line, not a traceback.
    with training_failures_as_errors(model_args, data_args, training_args):
        if data_args.feature_cache_dir:
            # Cached frozen-tower features replace decoding and the tower forward.
            cache = FeatureCache.open(data_args.feature_cache_dir, model, processor, video_root=data_args.video_root)
            model.use_cached_vision(cache.level)
            train_dataset = CachedFeatureDataset(train_records, processor, cache, bad_samples)
            eval_dataset = CachedFeatureDataset(eval_records, processor, cache, bad_samples, name="eval") if eval_records else None
        else:
            train_dataset = ConversationDataset(train_records, processor, bad_samples)
            eval_dataset = ConversationDataset(eval_records, processor, bad_samples, name="eval") if eval_records else None
        trainer = VideoSFTTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
            processing_class=processor,
        )
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    for line in bad_sample_summaries([train_dataset.guard, eval_dataset.guard if eval_dataset else None]):
        print(line, flush=True)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    print(run_summary(trainer), flush=True)
    if trainer.is_world_process_zero():
        print(f"saved model to {training_args.output_dir}")


if __name__ == "__main__":
    main()
