"""Answer every conversation of a dataset and write the answers as JSONL; a rerun resumes where the last one stopped.

    python -m videollm.infer.batch --model DIR --data test.jsonl --video_root DIR --output answers.jsonl
    accelerate launch --num_processes 8 -m videollm.infer.batch --model DIR ...     (one GPU per process)

The prompt of a record is every turn before its last assistant turn (that turn is kept as `reference`), or the
whole conversation when it ends with a user turn. Each output line is
`{"id", "answer" | "answers", "reference", "frame_indices", "error"}`. Lines are appended and flushed batch by
batch, so after a crash or a kill, rerunning the same command generates only the ids that have no line yet (a
half-written last line is dropped). A record whose video cannot be decoded, or whose prompt is over the model's
`max_length`, gets a line with `error` set; pass `--retry_errors` to try those again. Sampled answers
(`--do_sample true`) draw from `--seed` and their batch's records, so N processes write what one process writes.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from transformers import HfArgumentParser

from videollm.data.dataset import record_messages
from videollm.data.formats import ConversationRecord, DataValidationError, iter_jsonl, load_conversations
from videollm.data.video import DecodedVideo, decode_each
from videollm.infer.generate import GenerationSettings, set_apart_too_long
from videollm.infer.placement import PlacementArguments
from videollm.infer.processes import Processes, cut_into_batches, stable_seed
from videollm.infer.session import InferenceEngine
from videollm.model.checkpoint import checkpoint_problem


@dataclass
class BatchArguments:
    model: str = field(metadata={"help": "videollm checkpoint directory (full or adapter)"})
    data: str = field(metadata={"help": "conversation records (.jsonl, .json, .parquet), LLaVA or messages style"})
    output: str = field(metadata={"help": "answers JSONL; appended to and resumed by record id"})
    video_root: str | None = field(default=None, metadata={"help": "directory relative video paths start from"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    retry_errors: bool = field(default=False, metadata={"help": "generate again for ids whose line has an error"})
    limit: int | None = field(default=None, metadata={"help": "answer only the first N records"})
    seed: int = field(default=0, metadata={"help": "sampled answers (--do_sample true) draw from it, batch by batch"})


def split_prompt(record: ConversationRecord) -> tuple[list[dict], str | None]:
    """The turns to answer and the reference answer (the last assistant turn, if the record ends with one)."""
    messages = record_messages(record)
    if messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def read_finished(output: Path, retry_errors: bool = False) -> set[str]:
    """Ids that already have a line in `output`, after cutting a half-written last line (a killed run).

    With `retry_errors`, lines with an error are removed from the file and their ids are not counted.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        output.write_bytes(data)
    finished, kept, dropped = set(), [], False
    for number, row in iter_jsonl(output):
        if isinstance(row, ValueError) or "id" not in row:
            raise ValueError(f"{output}:{number}: not an answers line ({row}); move the file away to start over")
        if retry_errors and row.get("error"):
            dropped = True
            continue
        finished.add(str(row["id"]))
        kept.append(row)
    if dropped:
        _rewrite(output, kept)
    return finished


def _rewrite(path: Path, rows: list[dict]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(temporary, path)


def generate_dataset_answers(
    engine: InferenceEngine,
    records: list[ConversationRecord],
    output: str | Path,
    settings: GenerationSettings,
    batch_size: int = 8,
    retry_errors: bool = False,
    processes: Processes = Processes(),
    seed: int = 0,
) -> int:
    """Append an answer line to `output` for every record without one; returns how many records were answered.

    On several `processes`, the batches left are answered `processes.count` at a time, one per process, and the main
    process appends them in batch order: the file is the one a single process writes. Sampled answers draw from a seed
    made of `seed` and the batch's record ids, so they are the same on any number of processes and in every run that
    cuts the same batches (a resumed run cuts its batches from the records left)."""
    duplicates = sorted(i for i, n in Counter(r.id for r in records).items() if n > 1)
    if duplicates:
        raise ValueError(f"record ids must be unique to resume by id; repeated: {duplicates[:5]}")
    output = Path(output)
    finished = processes.from_main(lambda: read_finished(output, retry_errors))
    todo = [r for r in records if r.id not in finished]
    batches = cut_into_batches(todo, batch_size)
    progress = tqdm(
        total=len(records), initial=len(records) - len(todo), desc="generating", unit="sample", disable=not processes.is_main
    )
    for rows in processes.map_batches(batches, lambda batch: _answer_batch(engine, batch, settings, seed)):
        if processes.is_main:
            with open(output, "a", encoding="utf-8") as sink:
                sink.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
                sink.flush()
                os.fsync(sink.fileno())
        progress.update(len(rows))  # one line per record
    progress.close()
    return len(todo)


def _answer_batch(
    engine: InferenceEngine, batch: list[ConversationRecord], settings: GenerationSettings, seed: int
) -> list[dict]:
    """The answer lines of one batch, in record order but with the error lines (unreadable video, prompt too long)
    first."""

    def row(record: ConversationRecord, decoded: Sequence[DecodedVideo] = (), error: str | None = None) -> dict:
        return {"id": record.id, "reference": split_prompt(record)[1], "frame_indices": [list(v.indices) for v in decoded],
                "error": error}  # fmt: skip

    readable, unreadable = decode_each(batch, lambda record: record.videos, engine.load_video)
    readable, too_long = set_apart_too_long(engine.processor, readable, lambda record: split_prompt(record)[0])
    rows = [{**row(record, error=str(error)), "answer": None} for record, error in [*unreadable, *too_long]]
    if readable:
        prompts = [split_prompt(record)[0] for record, _ in readable]
        batch_seed = stable_seed(seed, [record.id for record in batch])
        answers = engine.generate(prompts, [videos for _, videos in readable], settings, batch_seed)
        for (record, videos), texts in zip(readable, answers):
            key = ("answer", texts[0]) if settings.num_return_sequences == 1 else ("answers", texts)
            rows.append({**row(record, videos), key[0]: key[1]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser([BatchArguments, PlacementArguments, GenerationSettings])
    args, placement, settings = parser.parse_args_into_dataclasses(args=argv)
    processes = Processes.launched()
    device, dtype = placement.resolve_or_exit()
    if problem := checkpoint_problem(args.model):
        sys.exit(f"error: --model: {problem}")
    if not Path(args.data).exists():
        sys.exit(f"error: --data: {args.data} does not exist")
    if args.batch_size < 1:
        sys.exit(f"error: --batch_size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        sys.exit(f"error: --limit: must be >= 1, got {args.limit}")
    if Path(args.output).is_dir():
        sys.exit(f"error: --output: {args.output} is a directory; give the answers file, e.g. {Path(args.output) / 'answers.jsonl'}")
    if Path(args.output).resolve() == Path(args.data).resolve():
        # its records' ids would read as answers already written: nothing answered, and the data file appended to
        sys.exit("error: --output: must not be the --data file")
    if problem := settings.problem():
        sys.exit(f"error: {problem}")
    try:
        records = load_conversations(args.data, video_root=args.video_root)
    except DataValidationError as error:
        sys.exit(f"error: invalid data:\n{error}")
    records = records[: args.limit] if args.limit else records
    engine = InferenceEngine.from_checkpoint(args.model, processes.place(device), dtype)
    try:
        answered = generate_dataset_answers(
            engine, records, args.output, settings, args.batch_size, args.retry_errors, processes, args.seed
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    if processes.is_main:
        print(f"{answered} answered, {len(records) - answered} already in {args.output}")


if __name__ == "__main__":
    main()
