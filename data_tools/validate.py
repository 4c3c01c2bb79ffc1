"""Check every record of a JSONL data file before training: schema, placeholders, videos, token budget.

Example::

    python data_tools/validate.py data/my_videos/train.jsonl --video_root data/my_videos \\
        --processor outputs/sft_7b --num_workers 8

Writes a JSON report (per bad record: file:line, id, field, reason) and a copy of the file holding only the good
records, their lines unchanged byte for byte. Exit code: 0 if every record is good, 1 if any is bad, 2 on a usage
error. The checks are `videollm.data.validation.validate_file` (see its docstring).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from videollm.data.validation import RECORD_KINDS, validate_file, write_clean_file

EXIT_OK, EXIT_BAD_RECORDS, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The command line (argparse itself exits with code 2 on a usage error)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the .jsonl data file")
    parser.add_argument("--video_root", help="directory that relative video paths start from")
    parser.add_argument(
        "--processor",
        help="a saved videollm checkpoint (or processor) directory: decode with its sampling spec and backend, "
        "and check the token budget (max_length)",
    )
    parser.add_argument(
        "--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="videos decoded in parallel"
    )
    parser.add_argument("--kind", default="auto", choices=["auto", *RECORD_KINDS], help="record kind (default: auto)")
    parser.add_argument("--max_length", type=int, help="token budget (default: the processor's max_length)")
    parser.add_argument("--decode_timeout", type=float, help="seconds per video (default: the processor's, else 60)")
    parser.add_argument("--report", help="report file (default: FILE with .report.json)")
    parser.add_argument("--output", help="file of the good records (default: FILE with .clean.jsonl)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Validate, write the report and the clean file, print a summary; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    source = Path(args.file)
    report_path = Path(args.report) if args.report else source.with_suffix(".report.json")
    output_path = Path(args.output) if args.output else source.with_suffix(".clean.jsonl")
    problem = _usage_problem(args, source, output_path, report_path)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    processor = None
    if args.processor:
        from videollm.data.processor import VideoLLMProcessor

        try:
            processor = VideoLLMProcessor.from_pretrained(args.processor)
        except (OSError, ValueError) as error:
            message = f"--processor: cannot load a videollm processor from {args.processor}: {error}"
            print(f"error: {message}", file=sys.stderr)
            return EXIT_USAGE
        if args.max_length is not None:
            processor.max_length = args.max_length

    report = validate_file(
        source,
        video_root=args.video_root,
        processor=processor,
        kind=args.kind,
        num_workers=args.num_workers,
        decode_timeout=args.decode_timeout,
        progress=not args.no_progress,
    )
    report.write(report_path)
    kept = write_clean_file(source, report.good_lines, output_path)
    for item in report.problems:
        where = f"{item.field}: " if item.field else ""
        print(f"{item.location}: {where}{item.reason}")
    print(f"{kept} of {report.records} records are good ({output_path}); report: {report_path}")
    return EXIT_OK if report.ok else EXIT_BAD_RECORDS


def _usage_problem(args: argparse.Namespace, source: Path, output_path: Path, report_path: Path) -> str | None:
    if not source.is_file():
        return f"{source}: file not found"
    if source.suffix.lower() != ".jsonl":
        return f"{source}: only JSON Lines files (.jsonl) are validated"
    if args.video_root is not None and not Path(args.video_root).is_dir():
        return f"--video_root: {args.video_root} is not a directory"
    if args.processor is not None and not Path(args.processor).is_dir():
        return f"--processor: {args.processor} is not a directory"
    if args.max_length is not None and args.processor is None:
        return "--max_length needs --processor: the token budget is counted with the processor's tokenizer"
    if args.max_length is not None and args.max_length < 1:
        return f"--max_length: must be >= 1, got {args.max_length}"
    if args.num_workers < 1:
        return f"--num_workers: must be >= 1, got {args.num_workers}"
    if output_path.resolve() == source.resolve():
        return "--output: must not be the input file"
    if report_path.resolve() in (source.resolve(), output_path.resolve()):
        return "--report: must not be the input file or the --output file"
    return None


if __name__ == "__main__":
    sys.exit(main())
