"""Generate the synthetic moving-shape video QA set (videos, SFT/preference/label JSONL files).

Example::

    python data_tools/make_synthetic.py --output_dir data/synthetic --seed 0
    python data_tools/make_synthetic.py --output_dir data/synthetic_alt --seed 1 --wording alt \\
        --size 48 --shape_size 10 --shape_size_max 14 --speed 2.5 --speed_max 4

All settings are the fields of ``videollm.data.synthetic.SyntheticConfig`` (see ``--help``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from transformers import HfArgumentParser

from videollm.data.synthetic import SyntheticConfig, format_summary, generate_dataset


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the settings, write the dataset and print a short summary."""
    parser = HfArgumentParser(SyntheticConfig, description=__doc__.splitlines()[0])
    try:
        (config,) = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if Path(config.output_dir).exists() and not Path(config.output_dir).is_dir():
        print(f"error: --output_dir: {config.output_dir} is a file, not a directory", file=sys.stderr)
        return 2
    print(format_summary(generate_dataset(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
