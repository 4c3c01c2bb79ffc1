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
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers import HfArgumentParser

from videollm.data.dataset import record_messages
from videollm.data.formats import ConversationRecord, DataValidationError, load_conversations, write_jsonl
from videollm.data.video import DecodedVideo, VideoDecodeError
from videollm.infer.generate import GenerationSettings, generate_answers
from videollm.infer.placement import PlacementArguments, load_for_inference
from videollm.infer.processes import Processes, stable_seed
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


def shuffled(video: DecodedVideo, rng: random.Random) -> DecodedVideo:
    """The same frames in a random order that differs from the original (when there are 2+ distinct frames)."""
    order = list(range(video.frames.shape[0]))
    if len(order) > 1:
        while order == sorted(order):
            rng.shuffle(order)
    return DecodedVideo(
        frames=video.frames[torch.tensor(order)],
        indices=[video.indices[i] for i in order],
        timestamps=list(video.timestamps),
        duration=video.duration,
        path=video.path,
    )


def evaluate(
    model: torch.nn.Module,
    processor,
    records: list[ConversationRecord],
    settings: GenerationSettings,
    batch_size: int = 16,
    shuffle_frames: bool = False,
    seed: int = 0,
    verifier: str | None = None,
    processes: Processes = Processes(),
) -> tuple[dict, list[dict]]:
    """Generate an answer for every record and score it with its verifier; returns (summary, per-sample predictions).

    On several `processes`, each answers its share of the batches and every process returns all predictions, in
    record order."""
    targets = [ScoringTarget.of(record, _last_answer(record_messages(record))["content"]) for record in records]
    verifiers = RecordVerifiers(targets, spec=verifier)

    def answer(batch: list[tuple[int, ConversationRecord]]) -> list[dict]:
        predictions, prompts, videos, kept = [], [], [], []
        for index, record in batch:
            messages = record_messages(record)
            last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            try:
                decoded = [processor.load_video(v) for v in record.videos]
            except VideoDecodeError as error:
                predictions.append(_prediction(record, messages[last_answer]["content"], None, None, error=str(error)))
                continue
            if shuffle_frames:
                rng = random.Random(stable_seed(seed, record.id))
                decoded = [shuffled(v, rng) for v in decoded]
            prompts.append(messages[:last_answer])
            videos.append(decoded)
            kept.append((record, messages[last_answer]["content"], decoded, targets[index]))
        if prompts:
            answers = generate_answers(model, processor, prompts, videos, settings)
            for (record, reference, decoded, target), (text, *_) in zip(kept, answers):
                predictions.append(_prediction(record, reference, text, verifiers.check(target, text), decoded=decoded))
        return predictions

    numbered = list(enumerate(records))
    batches = [numbered[start : start + batch_size] for start in range(0, len(numbered), batch_size)]
    predictions = []
    with tqdm(total=len(records), desc="evaluating", unit="sample", disable=not processes.is_main) as progress:
        for rows in processes.map_batches(batches, answer):  # one prediction per record
            predictions.extend(rows)
            progress.update(len(rows))
    return summarize(predictions), predictions


def _last_answer(messages: list[dict]) -> dict:
    return [m for m in messages if m["role"] == "assistant"][-1]


def _prediction(record, reference, prediction, verdict, decoded=None, error=None) -> dict:
    return {
        "id": record.id,
        "type": record.meta.get("type", "all"),
        "prediction": prediction,
        "reference": reference,
        "correct": bool(verdict),
        "verdict": verdict.reason if verdict is not None else None,
        "frame_indices": [list(v.indices) for v in decoded] if decoded else [],
        "error": error,
    }


def summarize(predictions: list[dict]) -> dict:
    by_type: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        by_type[p["type"]].append(p["correct"])
    total = sum(p["correct"] for p in predictions)
    return {
        "accuracy": total / len(predictions) if predictions else 0.0,
        "num_samples": len(predictions),
        "num_errors": sum(p["error"] is not None for p in predictions),
        "by_type": {
            t: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v)} for t, v in sorted(by_type.items())
        },
    }


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
    for name in ("model", "data"):
        if not Path(getattr(args, name)).exists():
            sys.exit(f"error: --{name}: {getattr(args, name)} does not exist")
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


if __name__ == "__main__":
    main()
