"""Supervised fine-tuning on video conversations.

transformers' Trainer does the loop; what video needs on top is only the checkpoint layout (adapter + projector +
processor + config together, in `output_dir` itself), which TRL's SFTTrainer would not write either.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer

from videollm.model.checkpoint import save_checkpoint


class VideoSFTTrainer(Trainer):
    """HF Trainer that saves every checkpoint in the videollm layout (loadable with `load_model`)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.model, self.processing_class, output_dir, state_dict=state_dict)
