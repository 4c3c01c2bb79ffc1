"""Evaluate a videollm checkpoint on conversation records: accuracy overall and by record type.

    python -m videollm.eval --model DIR --data FILE --video_root DIR --output results.json [--shuffle_frames]
    accelerate launch --num_processes 8 -m videollm.eval --model DIR ...     (one GPU per process)

The prompt is every turn before the last assistant turn; the last assistant turn is the reference. Per-sample
predictions go to `<output stem>.predictions.jsonl` next to the summary. `--shuffle_frames` permutes each video's
frames (timestamps in the prompt stay sorted): if accuracy on temporal questions does not drop, the model is not
using frame order. On several processes each answers every N-th batch and the first writes the results, which are
the ones one process gives (greedy answers; a record's frame permutation is seeded by the record).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import HfArgumentParser

from videollm.data.dataset import record_messages
from videollm.data.formats import ConversationRecord, DataValidationError, load_conversations, write_jsonl
from videollm.data.processor import VideoLLMProcessor
from videollm.eval.scoring import Question, score_answers
from videollm.infer.generate import GenerationSettings
from videollm.infer.placement import PlacementArguments, load_for_inference
from videollm.infer.processes import Processes
from videollm.model.checkpoint import checkpoint_problem
from videollm.selftrain.verifiers import RecordVerifiers


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "videollm checkpoint directory (full or adapter)"})
    data: str = field(metadata={"help": "records with reference answers (.jsonl, .json, .parquet)"})
    output: str = field(metadata={"help": "summary JSON path; predictions are written next to it"})
    video_root: str | None = field(default=None, metadata={"help": "directory relative video paths start from"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    shuffle_frames: bool = field(default=False, metadata={"help": "permute frame order (temporal control)"})
    seed: int = field(default=0, metadata={"help": "seed of the frame permutations"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N records"})
    verifier: str | None = field(
        default=None,
        metadata={
            "help": "verifier spec for every record (e.g. 'number:tolerance=0.05' or 'pkg.module:fn'); by default a "
            "record's label_type, else multiple choice when it has choices, else class"
        },
    )


@dataclass
class ScoringTarget:
    """What an evaluated record is checked against: its `label` (or, without one, its reference answer).

    Evaluation goes through the same `RecordVerifiers` as STaR filtering and DPO pair mining, so "correct" means one
    thing everywhere. The reference answer travels along: for a class label it is one more accepted phrasing.
    """

    label: object
    label_type: str
    meta: dict
    reference: str | None = None

    @classmethod
    def of(cls, record: ConversationRecord, reference: str) -> ScoringTarget:
        meta = record.meta
        default_type = "choice" if meta.get("choices") else "class"
        return cls(meta.get("label", reference), meta.get("label_type", default_type), meta, reference)


def evaluate(
    model: torch.nn.Module,
    processor: VideoLLMProcessor,
    records: list[ConversationRecord],
    settings: GenerationSettings,
    batch_size: int = 16,
    shuffle_frames: bool = False,
    seed: int = 0,
    verifier: str | None = None,
    processes: Processes = Processes(),
) -> tuple[dict, list[dict]]:
    """Answer every record (the turns before its last answer) and score the answer against its label or reference;
    returns (summary, per-record predictions, in record order, on every process)."""
    questions = []
    for record in records:
        messages = record_messages(record)
        last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reference = messages[last_answer]["content"]
        target = ScoringTarget.of(record, reference)
        questions.append(Question(record.id, messages[:last_answer], record.videos, target, {"reference": reference}))
    verifiers = RecordVerifiers([q.target for q in questions], spec=verifier)
    return score_answers(
        lambda: model, processor, questions, verifiers, settings, batch_size, shuffle_frames=shuffle_frames, seed=seed,
        processes=processes,
    )  # fmt: skip


def print_table(summary: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("type", "accuracy", "correct", "total"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for name, row in summary["by_type"].items():
        table.add_row(name, f"{row['accuracy']:.1%}", str(row["correct"]), str(row["total"]))
    table.add_row("all", f"{summary['accuracy']:.1%}", "", str(summary["num_samples"]), style="bold")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser([EvalArguments, PlacementArguments, GenerationSettings])
    args, placement, settings = parser.parse_args_into_dataclasses(args=argv)
    processes = Processes.launched()
    device, dtype = placement.resolve_or_exit()
    if problem := checkpoint_problem(args.model):
        sys.exit(f"error: --model: {problem}")
    if not Path(args.data).exists():
        sys.exit(f"error: --data: {args.data} does not exist")
    if problem := _numbers_problem(args) or settings.problem():
        sys.exit(f"error: {problem}")
    if Path(args.output).is_dir():
        suggestion = Path(args.output) / "results.json"
        sys.exit(f"error: --output: {args.output} is a directory; give the summary's file name, e.g. {suggestion}")
    try:
        records = load_conversations(args.data, video_root=args.video_root)
    except DataValidationError as error:
        sys.exit(f"error: invalid evaluation data:\n{error}")
    records = records[: args.limit] if args.limit else records
    model, processor = load_for_inference(args.model, processes.place(device), dtype)

    summary, predictions = evaluate(
        model, processor, records, settings, args.batch_size, args.shuffle_frames, args.seed, args.verifier, processes
    )
    if not processes.is_main:
        return
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    predictions_path = output.with_name(output.stem + ".predictions.jsonl")
    write_jsonl(predictions_path, predictions)
    summary.update(
        model=args.model,
        data=args.data,
        shuffle_frames=args.shuffle_frames,
        sampling=processor.spec.to_dict(),
        predictions_file=str(predictions_path),
    )
    output.write_text(json.dumps(summary, indent=2))
    print_table(summary, f"{args.model} on {args.data}" + (" (frames shuffled)" if args.shuffle_frames else ""))


def _numbers_problem(args: EvalArguments) -> str | None:
    if args.batch_size < 1:
        return f"--batch_size: must be >= 1, got {args.batch_size}"
    if args.limit is not None and args.limit < 1:
        # records[:-1] would quietly drop the last record instead
        return f"--limit: must be >= 1, got {args.limit}"
    return None


if __name__ == "__main__":
    main()
