"""Supervised fine-tuning of a video LLM.

    accelerate launch recipes/sft.py --config recipes/configs/sft_tiny.yaml [--key value ...]

Reads LLaVA- or messages-style records, builds or loads the model, trains with the HF Trainer, and saves the final
model (adapter or full, with projector and processor) in `output_dir` itself.
"""

import sys

from transformers import TrainingArguments

from videollm.data.dataset import ConversationDataset, VideoCollator
from videollm.data.formats import DataValidationError, load_conversations
from videollm.train.config import DataArguments, ModelArguments, parse_config
from videollm.train.setup import load_or_build, run_summary
from videollm.train.sft import VideoSFTTrainer


def main() -> None:
    model_args, data_args, training_args = parse_config([ModelArguments, DataArguments, TrainingArguments])
    if data_args.train_file is None:
        sys.exit("error: train_file is required")

    # Validate every record (schema, placeholders, video files) before any model is built.
    try:
        train_records = load_conversations(data_args.train_file, video_root=data_args.video_root)
        eval_records = load_conversations(data_args.eval_file, video_root=data_args.video_root) if data_args.eval_file else None
    except DataValidationError as error:
        sys.exit(f"error: invalid data, nothing was trained:\n{error}")

    model, processor = load_or_build(model_args, data_args)
    trainer = VideoSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=ConversationDataset(train_records, processor),
        eval_dataset=ConversationDataset(eval_records, processor) if eval_records else None,
        data_collator=VideoCollator(processor),
        processing_class=processor,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    print(run_summary(trainer), flush=True)
    if trainer.is_world_process_zero():
        print(f"saved model to {training_args.output_dir}")


if __name__ == "__main__":
    main()
