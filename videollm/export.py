"""Merge a LoRA checkpoint into a standalone model that the Auto classes load without PEFT.

    python -m videollm.export --model outputs/sft --output_dir outputs/sft_merged
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from videollm.model.checkpoint import checkpoint_problem, export_merged, is_adapter_checkpoint


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "videollm checkpoint directory (adapter or full)"})
    output_dir: str = field(metadata={"help": "where the merged model, its config and processor are written"})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv)
    if problem := checkpoint_problem(args.model):
        sys.exit(f"error: --model: {problem}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        sys.exit(f"error: --output_dir: {args.output_dir} is a file, not a directory")
    if Path(args.output_dir).is_dir() and any(Path(args.output_dir).iterdir()):
        # Writing into another checkpoint would overwrite some of its files and keep others (an adapter_config.json
        # next to merged weights loads as an adapter): a mix that is neither model.
        sys.exit(f"error: --output_dir: {args.output_dir} is not empty; give a new directory")
    export_merged(args.model, args.output_dir)
    kind = "LoRA adapter merged" if is_adapter_checkpoint(args.model) else "full model copied"
    print(f"{kind}: {args.model} -> {args.output_dir}")


if __name__ == "__main__":
    main()
