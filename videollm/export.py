"""Merge a LoRA checkpoint into a standalone model that the Auto classes load without PEFT.

    python -m videollm.export --model outputs/sft --output_dir outputs/sft_merged
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from videollm.model.checkpoint import export_merged, is_adapter_checkpoint


@dataclass
class ExportArguments:
    model: str = field(metadata={"help": "videollm checkpoint directory (adapter or full)"})
    output_dir: str = field(metadata={"help": "where the merged model, its config and processor are written"})


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv)
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"error: --model: {args.model} is not a videollm checkpoint (no config.json)")
    export_merged(args.model, args.output_dir)
    kind = "LoRA adapter merged" if is_adapter_checkpoint(args.model) else "full model copied"
    print(f"{kind}: {args.model} -> {args.output_dir}")


if __name__ == "__main__":
    main()
