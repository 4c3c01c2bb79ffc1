"""What every self-training run (Video-STaR cycles, self-preference rounds) shares: its settings, seed model and
records, the seeded and logged sampling, the evaluation with verifiers, the summary, and resumption.

One run directory holds everything a run made, one folder per cycle (or round)::

    run_config.json             the settings the run started with; a rerun with other settings is refused
    initial/                    the seed model, when it was built (tiny, vision + LLM) rather than loaded
    cycle_0/eval.json           the seed model's evaluation: the baseline row of the summary
    cycle_1/
        samples.jsonl           every generated answer: cycle, stage, prompt id, sampler settings (seed included),
                                frame indices, verdict and score, rationalised or not
        train.jsonl             the training data used (STaR: kept answers; self-preference: pairs.jsonl)
        checkpoint/             the trained model
        eval.json               accuracy overall and by question type; eval_predictions.jsonl per sample
        done.json               the cycle's summary row, written last: a cycle with it is finished
    summary.json, summary.md, summary.png

Resumption: killed at any point, the same command continues. Answers are generated in fixed batches, each from its own
seed (run seed, cycle, stage, batch number), and appended to `samples.jsonl` as each batch finishes; a rerun skips the
prompts already there (a torn last line is dropped) and draws the rest exactly as an uninterrupted run would.
Training restarts from its last Trainer checkpoint, or from the start (seeded) when none was saved; evaluations are
kept once written; finished cycles are skipped.

Several processes (`accelerate launch --num_processes N`): each answers and evaluates every N-th batch, training is
data-parallel, and the main process alone reads and writes the run directory, telling the others what it found
(`videollm.infer.processes`). From the same model, the samples and evaluations are those of one process, whatever
N; training sees N micro-batches per step, as any data-parallel run does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed

from videollm.data.feature_cache import FeatureCache
from videollm.data.formats import PLACEHOLDER, LabelledRecord, load_labelled, relative_video_path, write_jsonl
from videollm.data.processor import VideoLLMProcessor
from videollm.data.video import DecodedVideo, decode_each
from videollm.eval.scoring import Question, score_answers
from videollm.infer.generate import GenerationSettings, generate_answers, set_apart_too_long
from videollm.infer.placement import load_for_inference
from videollm.infer.processes import Processes, cut_into_batches, stable_seed
from videollm.model.checkpoint import save_checkpoint
from videollm.selftrain.verifiers import RecordVerifiers, Verdict
from videollm.train.checkpointing import resolve_latest_checkpoint
from videollm.train.config import DataArguments, ModelArguments
from videollm.train.setup import load_or_build, run_summary

logger = logging.getLogger(__name__)


class RunSettingsMismatch(ValueError):
    """A run directory holds a run started with other settings."""


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: a run killed mid-write leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(partial, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


# ---- the run directory ------------------------------------------------------------------------------------------------


class RunDirectory:
    """A run's folder: its settings, one folder per step (cycle or round), the summary.

    Args:
        path: the run directory (the recipe's `output_dir`).
        settings: everything that decides what the run produces; compared with the saved ones on a rerun.
        step_name: "cycle" (STaR) or "round" (self-preference): folder names and the samples' step field.
        ignore: settings keys that may change between reruns (e.g. logging), left out of the comparison.
        processes: the processes of the run; the main one reads and writes the files, and tells the others.
        name: what the settings-mismatch error calls `path` (the flag that chose it).
        fresh_start: how to start afresh instead of resuming, as that error tells it.
    """

    def __init__(
        self, path: str | Path, settings: dict[str, Any], step_name: str = "cycle", ignore: Iterable[str] = (),
        processes: Processes = Processes(), name: str = "output_dir", fresh_start: str = "choose another output_dir",
    ):  # fmt: skip
        self.path = Path(path)
        self.step_name = step_name
        self.settings = json.loads(json.dumps(settings, default=str))
        self.ignore = set(ignore)
        self.processes = processes
        self.name = name
        self.fresh_start = fresh_start

    def open(self) -> bool:
        """Create the directory or check that it holds this run; True when resuming."""
        return self.processes.from_main(self._open)

    def _open(self) -> bool:
        saved = read_json(self.path / "run_config.json")
        if saved is None:
            write_json(self.path / "run_config.json", self.settings)
            return False
        changed = sorted(
            key for key in set(saved) | set(self.settings)
            if key not in self.ignore and saved.get(key) != self.settings.get(key)
        )  # fmt: skip
        if changed:
            details = "; ".join(f"{k}: {saved.get(k)!r} -> {self.settings.get(k)!r}" for k in changed[:5])
            raise RunSettingsMismatch(
                f"{self.name} {self.path} holds a run started with other settings ({details}); "
                f"rerun with the same settings to resume, or {self.fresh_start}"
            )
        return True

    def step_dir(self, number: int) -> Path:
        return self.path / f"{self.step_name}_{number}"

    def finished(self, number: int) -> dict | None:
        """The summary row of a finished step, or None."""
        return self.processes.from_main(lambda: read_json(self.step_dir(number) / "done.json"))

    def finish(self, number: int, row: dict) -> None:
        self.processes.on_main(lambda: write_json(self.step_dir(number) / "done.json", row))

    def write_rows(self, path: Path, rows: Sequence[dict]) -> None:
        """A JSONL file of the run (e.g. a step's training data), there for every process when this returns."""
        self.processes.on_main(lambda: write_jsonl(path, rows))


# ---- generated samples ------------------------------------------------------------------------------------------------


class SampleLog:
    """An append-only JSONL file of generated rows (a run's samples, a preference build's batches) that survives being
    killed mid-write.

    Opening it drops a torn last line (a write cut short), so appends always start on a line of their own. In a run on
    several processes, the main process reads and writes the file and every process holds the same rows.
    """

    def __init__(self, path: str | Path, processes: Processes = Processes()):
        self.path = Path(path)
        self.writes = processes.is_main
        self.rows: list[dict] = processes.from_main(self._load)

    def _load(self) -> list[dict]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", self.path, len(data) - len(complete))
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]

    def done(self, stage: str) -> set[str]:
        return {row["prompt_id"] for row in self.rows if row["stage"] == stage}

    def resume(self, stage: str, expected: int) -> set[str]:
        """The prompts of `stage` with all `expected` answers (or an error row) on disk; rows of any other prompt of the
        stage are dropped from the file (a batch is written at once, but a kill can cut the write short)."""
        rows = self.stage_rows(stage)
        counts = Counter(row["prompt_id"] for row in rows)
        errors = {row["prompt_id"] for row in rows if row.get("error")}
        incomplete = {p for p, n in counts.items() if n != expected and p not in errors}
        if incomplete:
            self.rows = [r for r in self.rows if not (r["stage"] == stage and r["prompt_id"] in incomplete)]
            if self.writes:
                logger.warning("%s: %d prompts with some of their answers only; they are generated again", self.path, len(incomplete))
                partial = self.path.with_name(self.path.name + ".partial")
                partial.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in self.rows))
                os.replace(partial, self.path)
        return set(counts) - incomplete

    def stage_rows(self, stage: str) -> list[dict]:
        return [row for row in self.rows if row["stage"] == stage]

    def append(self, rows: Sequence[dict]) -> None:
        if self.writes:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
                handle.flush()
                os.fsync(handle.fileno())
        self.rows.extend(rows)


@dataclass
class Prompt:
    """One question to answer: the record it comes from and the text sent (with one placeholder per video)."""

    record: LabelledRecord
    text: str

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": f"{PLACEHOLDER}\n" * len(self.record.videos) + self.text}]


def fill(template: str, record: LabelledRecord, **extra: Any) -> str:
    """A prompt template filled with the record's question, label and meta fields (e.g. ``{question}``, ``{label}``)."""
    label = record.label if not isinstance(record.label, (list, tuple)) else ", ".join(str(x) for x in record.label)
    try:
        return template.format(**{**record.meta, "question": record.question, "label": label, **extra})
    except KeyError as error:
        raise ValueError(f"template {template!r}: record {record.id} has no field {error}") from None


@dataclass
class Sampler:
    """Generates answers for prompts in seeded batches, verifies them, and logs them with their provenance."""

    processor: VideoLLMProcessor
    verifiers: RecordVerifiers
    settings: GenerationSettings
    batch_size: int = 16
    seed: int = 0
    step_name: str = "cycle"
    video_root: str | None = None
    # (model, prompt, decoded videos, answers) -> one score per answer, logged as `judge_score` (e.g. a model judge)
    scorer: Callable[[torch.nn.Module, Prompt, list[DecodedVideo], list[str]], list[float | None]] | None = field(
        default=None, repr=False
    )
    # reads one video for generation: the processor's decoder by default, `FeatureCache.get` in a run with a cache
    load_video: Callable[[str], DecodedVideo] | None = field(default=None, repr=False)
    # the processes the batches are shared out to (batch b to process b mod count)
    processes: Processes = field(default_factory=Processes)

    def run(
        self, model_loader: Callable[[], torch.nn.Module], prompts: Sequence[Prompt], stage: str, step: int,
        log: SampleLog, only: set[str] | None = None, **fields: Any,
    ) -> dict[str, list[dict]]:  # fmt: skip
        """Answer every prompt not answered yet in `log`; return all rows of this stage by prompt id, in prompt order.

        Batches are cut from `prompts` by position and each draws from its own seed, so a resumed run samples what an
        uninterrupted one would, and a run on several processes what one process would: the batches left are
        answered `processes.count` at a time, one per process, and logged together in batch order. `only` answers
        just these prompt ids, in the batches they hold in `prompts`: a subset (e.g. the questions to rationalise)
        that changes by one prompt then changes one batch, not every batch after it. The model is loaded only when
        something is left to generate. Extra `fields` go into every row.
        """
        done = log.resume(stage, self.settings.num_return_sequences)
        wanted = [p for p in prompts if only is None or p.id in only]
        left = []
        for number, cut in enumerate(cut_into_batches(prompts, self.batch_size)):
            batch = [p for p in cut if only is None or p.id in only]
            if not all(p.id in done for p in batch):
                left.append((number, batch))
        model = functools.cache(model_loader)  # loaded once, and only by a process with something to answer

        def answer(item: tuple[int, list[Prompt]]) -> list[dict]:
            number, batch = item
            return self._batch(model(), batch, stage, step, stable_seed(self.seed, step, stage, number), number, fields)

        for rows in self.processes.map_batches(left, answer):
            log.append([row for row in rows if row["prompt_id"] not in done])
        if left:
            logger.info(
                "%s %d, %s: process %d of %d answered %d of the %d batches left", self.step_name, step, stage,
                self.processes.index, self.processes.count, len(left[self.processes.index :: self.processes.count]),
                len(left),
            )  # fmt: skip
        by_prompt: dict[str, list[dict]] = {p.id: [] for p in wanted}
        for row in log.stage_rows(stage):
            if row["prompt_id"] in by_prompt:
                by_prompt[row["prompt_id"]].append(row)
        return by_prompt

    def _batch(self, model, batch: Sequence[Prompt], stage: str, step: int, seed: int, number: int, fields: dict) -> list[dict]:
        readable, unreadable = decode_each(
            batch, lambda prompt: prompt.record.videos, self.load_video or self.processor.load_video
        )
        readable, too_long = set_apart_too_long(self.processor, readable, lambda prompt: prompt.messages)
        failed = {prompt.id: (str(error), "video decode failed") for prompt, error in unreadable}
        failed.update((prompt.id, (str(error), "prompt too long")) for prompt, error in too_long)
        torch.manual_seed(seed)
        answers = generate_answers(
            model, self.processor, [p.messages for p, _ in readable], [vs for _, vs in readable], self.settings
        ) if readable else []  # fmt: skip
        answered = {prompt.id: (videos, texts) for (prompt, videos), texts in zip(readable, answers)}
        sampler = {**self.settings.to_dict(), "seed": seed, "batch": number}
        rows = []
        for prompt in batch:
            record = prompt.record
            base = {
                self.step_name: step, "stage": stage, "prompt_id": prompt.id, "type": record.meta.get("type"),
                "question": record.question, "prompt": prompt.messages[0]["content"], "label": record.label,
                "label_type": record.label_type, "videos": [relative_video_path(v, self.video_root) for v in record.videos],
                "sampler": sampler, **fields,
            }  # fmt: skip
            if prompt.id in failed:
                error, reason = failed[prompt.id]
                rows.append({**base, "sample_index": 0, "answer": None, "error": error,
                             "frame_indices": [], "verdict": False, "score": 0.0, "reason": reason})  # fmt: skip
                continue
            videos, texts = answered[prompt.id]
            scores = self.scorer(model, prompt, videos, texts) if self.scorer else None
            verifier = self.verifiers(record)
            for j, text in enumerate(texts):
                verdict: Verdict = verifier(text, record.label)
                row = {**base, "sample_index": j, "answer": text, "frame_indices": [list(v.indices) for v in videos],
                       "verdict": verdict.correct, "score": verdict.score, "reason": verdict.reason}  # fmt: skip
                if scores is not None:
                    row["judge_score"] = scores[j]
                rows.append(row)
        return rows


# ---- evaluation -------------------------------------------------------------------------------------------------------


def evaluate_labelled(
    model_loader: Callable[[], torch.nn.Module],
    processor: VideoLLMProcessor,
    records: Sequence[LabelledRecord],
    verifiers: RecordVerifiers,
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
    template: str = "{question}",
    load_video: Callable[[str], DecodedVideo] | None = None,
    processes: Processes = Processes(),
) -> tuple[dict, list[dict]]:
    """Greedy answers to labelled questions (asked through `template`), scored by the run's verifiers; returns
    (summary, predictions) as `videollm.eval` does, from the same loop (`score_answers`, which calls `model_loader`
    only on a process with questions to answer)."""
    questions = [Question(r.id, Prompt(r, fill(template, r)).messages, r.videos, r, {"label": r.label}) for r in records]
    settings = settings or GenerationSettings(max_new_tokens=32)
    return score_answers(model_loader, processor, questions, verifiers, settings, batch_size, load_video, processes=processes)


def evaluate_step(
    step_dir: Path,
    model_loader: Callable[[], torch.nn.Module],
    processor: VideoLLMProcessor,
    records: Sequence[LabelledRecord],
    verifiers: RecordVerifiers,
    settings: GenerationSettings,
    batch_size: int,
    template: str,
    load_video: Callable[[str], DecodedVideo] | None = None,
    processes: Processes = Processes(),
) -> dict | None:
    """Evaluate once: `eval.json` and `eval_predictions.jsonl` in `step_dir`; an existing `eval.json` is returned as is.
    Every process evaluates its share and returns the summary of all; the main process writes the files."""
    if not records:
        return None
    saved = processes.from_main(lambda: read_json(step_dir / "eval.json"))
    if saved is not None:
        return saved
    summary, predictions = evaluate_labelled(
        model_loader, processor, records, verifiers, settings, batch_size, template, load_video, processes
    )
    if processes.is_main:
        write_jsonl(step_dir / "eval_predictions.jsonl", predictions)
        write_json(step_dir / "eval.json", summary)
    return summary


def metric(summary: dict | None, question_type: str | None = None) -> float | None:
    """Overall accuracy, or that of one question type."""
    if summary is None:
        return None
    if question_type is None:
        return summary["accuracy"]
    by_type = summary["by_type"].get(question_type)
    return by_type["accuracy"] if by_type else None


# ---- summary ----------------------------------------------------------------------------------------------------------


def eval_columns(row: dict, summary: dict | None) -> dict:
    """Accuracy overall and per question type as summary columns."""
    if summary is None:
        return row
    row["accuracy"] = summary["accuracy"]
    for name, values in summary["by_type"].items():
        row[f"accuracy/{name}"] = values["accuracy"]
    return row


def write_summary(run: RunDirectory, rows: Sequence[dict], title: str, plot_keys: Sequence[str] = ("kept_rate",)) -> None:
    """Print the table of all steps and save it as summary.json, summary.md and summary.png (accuracy per step).

    The table shows every scalar column but the model path (in summary.json), accuracy columns last. The main
    process writes and prints it.
    """
    if not run.processes.is_main:
        return
    rows = list(rows)
    scalar = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in ("model", "metric")]
    columns = [k for k in scalar if not k.startswith("accuracy")] + [k for k in scalar if k.startswith("accuracy")]
    write_json(run.path / "summary.json", {"title": title, "rows": rows})
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    (run.path / "summary.md").write_text(f"# {title}\n\n" + "\n".join(lines) + "\n")
    _print_table(title, columns, cells)
    _plot(run.path / "summary.png", rows, run.step_name, title, plot_keys)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _print_table(title: str, columns: list[str], cells: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in cells:
        table.add_row(*row)
    Console(width=max(120, 14 * len(columns))).print(table)


def _plot(path: Path, rows: Sequence[dict], step_name: str, title: str, extra_keys: Sequence[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'videollm[plot]'): %s not drawn", path)
        return
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k.startswith("accuracy")] + list(extra_keys)
    figure, axis = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(row[step_name], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
        if points:
            style = "--" if key in extra_keys else "-"
            axis.plot(*zip(*points), style, marker="o", label=key)
    axis.set_xticks(sorted({row[step_name] for row in rows}))
    axis.set_xlabel(step_name)
    axis.set_ylim(0, 1.02)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---- a run's settings --------------------------------------------------------------------------------------------------


@dataclass
class SelfTrainArguments:
    """What every self-training run shares: which records, how answers are generated, verified and evaluated."""

    num_samples: int = field(default=1, metadata={"help": "answers sampled per question (k)"})
    do_sample: bool = field(default=True, metadata={"help": "sample answers (false: greedy)"})
    temperature: float = field(default=0.2, metadata={"help": "sampling temperature (Video-STaR: 0.2)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest generated answer in tokens"})
    generation_batch_size: int = field(
        default=16, metadata={"help": "questions per vision pass and prefill; their k answers decode together"}
    )
    answer_template: str = field(
        default="{question}",
        metadata={"help": "the prompt: {question}, {label} and record fields, e.g. '{question} Explain step by step.'"},
    )
    verifier: str | None = field(
        default=None,
        metadata={"help": "one verifier for every record instead of each record's label_type: a type with settings "
                          "('number:tolerance=0.05') or a callable's dotted path ('my_pkg.checks:same_meaning')"},
    )  # fmt: skip
    synonyms: str | None = field(
        default=None, metadata={"help": "label -> other phrasings, a JSON file or inline JSON ({\"up\": [\"upwards\"]})"}
    )
    class_group_key: str = field(
        default="type", metadata={"help": "records sharing this meta field share a class label space (exclusive)"}
    )
    types: list[str] | None = field(default=None, metadata={"help": "use only records whose 'type' is one of these"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N training records"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate only the first N eval records"})
    eval_batch_size: int = field(default=32, metadata={"help": "questions per batch when evaluating"})
    eval_max_new_tokens: int = field(default=32, metadata={"help": "longest answer when evaluating (greedy)"})
    metric_type: str | None = field(
        default=None, metadata={"help": "stop on the accuracy of this question type (e.g. direction) instead of all"}
    )
    stop_when_no_gain: bool = field(default=True, metadata={"help": "stop once the evaluated accuracy does not rise"})
    min_gain: float = field(default=0.0, metadata={"help": "a rise of at most this much counts as no gain"})

    def __post_init__(self) -> None:
        self.metric_type = self.metric_type or None
        if self.num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("num_samples > 1 needs do_sample: true (greedy answers are all the same)")
        if self.generation_batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("generation_batch_size and eval_batch_size must be >= 1")
        # generate() refuses these only once the seed model is loaded
        if problem := self.generation().problem(flag="") or self.evaluation().problem(flag="eval_"):
            raise ValueError(problem)
        self.synonym_map()

    def generation(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, temperature=self.temperature,
            top_p=self.top_p, num_return_sequences=self.num_samples,
        )  # fmt: skip

    def evaluation(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.eval_max_new_tokens)

    def synonym_map(self) -> dict[str, list[str]]:
        if not self.synonyms:
            return {}
        text = Path(self.synonyms).read_text() if Path(self.synonyms).is_file() else self.synonyms
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"synonyms: neither a JSON file nor inline JSON ({error})") from None
        if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
            raise ValueError('synonyms: must map each label to a list of phrasings, e.g. {"up": ["upwards"]}')
        return value


# Settings that do not change what a run produces: they may differ when a run is resumed (or extended: `cycles`).
RESUMABLE_KEYS = {
    "cycles", "rounds", "stop_when_no_gain", "min_gain", "eval_batch_size", "decode_timeout", "decode_backend",
    "feature_cache_dir",
}  # fmt: skip
TRAINING_KEYS = (
    "learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "seed", "bf16", "fp16", "optim",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "beta", "loss_type", "loss_weights", "rrpo_alpha",
)  # fmt: skip


def run_settings(*configs: Any, training: Any) -> dict[str, Any]:
    """The settings that decide what a run produces, as one flat dict (saved in run_config.json)."""
    settings: dict[str, Any] = {}
    for config in configs:
        settings.update(dataclasses.asdict(config))
    for key in TRAINING_KEYS:
        if hasattr(training, key):
            settings[key] = getattr(training, key)
    settings["model_name_or_path"] = (
        str(Path(settings["model_name_or_path"]).resolve()) if settings.get("model_name_or_path") else None
    )
    return settings


# ---- models and records -----------------------------------------------------------------------------------------------


def load_records(data_args: DataArguments, args: SelfTrainArguments) -> tuple[list[LabelledRecord], list[LabelledRecord]]:
    """Training and evaluation records, filtered by `types` and cut to `limit` / `eval_limit`."""
    if data_args.train_file is None:
        raise ValueError("train_file: required (labelled records: video, question, label)")

    def read(path: str | None, limit: int | None) -> list[LabelledRecord]:
        if path is None:
            return []
        records = load_labelled(path, video_root=data_args.video_root)
        if args.types:
            records = [r for r in records if r.meta.get("type") in args.types]
        return records[:limit] if limit else records

    return read(data_args.train_file, args.limit), read(data_args.eval_file, args.eval_limit)


def train_once(output_dir: Path, processes: Processes, train: Callable[[], dict]) -> dict:
    """`train()`'s result, training only once: the result is recorded in `output_dir/train_done.json` (by the main
    process, after `train` saved the model) and read back, on every process, by every later call."""
    done = processes.from_main(lambda: read_json(output_dir / "train_done.json"))
    if done is not None:
        return done
    result = train()
    gc.collect()  # the trainer's memory, before generation or a merge needs it
    processes.on_main(lambda: write_json(output_dir / "train_done.json", result))
    return result


def train_and_save(trainer: Any, output_dir: Path) -> tuple[str | None, dict]:
    """Train, from the newest complete checkpoint in `output_dir` when an interrupted run left one, then save the
    model and the trainer state there; returns that checkpoint's path (None for a fresh start) and the last logged
    training entry (loss and the trainer's metrics)."""
    resume = resolve_latest_checkpoint(output_dir)
    if resume:
        logger.info("training resumes from %s", resume)
    trainer.train(resume_from_checkpoint="latest" if resume else None)
    logger.info(run_summary(trainer))
    trainer.save_model(str(output_dir))
    trainer.save_state()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return (str(resume) if resume else None), (logged[-1] if logged else {})


def initial_checkpoint(
    run: RunDirectory, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> Path:
    """The seed model's checkpoint: `model_name_or_path`, or a model built once (seeded, by the main process, with
    whole weights) and saved in `initial/`."""
    if model_args.model_name_or_path:
        return Path(model_args.model_name_or_path).resolve()
    path = run.path / "initial"

    def build() -> None:
        if (path / "config.json").is_file():
            return
        set_seed(training_args.seed)
        with unpartitioned_loads(training_args):
            model, processor = load_or_build(model_args, data_args)
        partial = run.path / "initial.partial"
        save_checkpoint(model, processor, partial)
        os.replace(partial, path)

    run.processes.on_main(build)
    return path.resolve()


def run_processor(checkpoint: Path, data_args: DataArguments) -> VideoLLMProcessor:
    """The one processor a run decodes and encodes with: the seed checkpoint's, with the data keys applied."""
    processor = VideoLLMProcessor.from_pretrained(checkpoint)
    requested = data_args.sampling_spec()
    if requested is not None and requested != processor.spec:
        processor.sampling = {**requested.to_dict(), "frame_size": processor.spec.frame_size}
    for key, value in data_args.processor_overrides().items():
        setattr(processor, key, value)
    return processor


def model_from(model_args: ModelArguments, checkpoint: Path) -> ModelArguments:
    """The model keys with `checkpoint` as the model to start from."""
    return dataclasses.replace(
        model_args, model_name_or_path=str(checkpoint), tiny=False, vision_name_or_path=None, llm_name_or_path=None
    )


def open_feature_cache(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: Any,
    checkpoint: Path,
    processor: VideoLLMProcessor,
    records: Sequence[LabelledRecord],
) -> FeatureCache | None:
    """The run's feature cache (`feature_cache_dir`; None without one), checked against `checkpoint` under the run's
    training policy and for every video of `records`; raises `FeatureCacheError` otherwise.

    The cache needs a frozen tower (and holds projector outputs only when the projector is frozen too), and what is
    frozen never changes across steps: one cache serves the sampling, training and evaluation of every step.
    """
    if not data_args.feature_cache_dir:
        return None
    model, _ = load_or_build(model_from(model_args, checkpoint), data_args, training_args=training_args)
    cache = FeatureCache.open(data_args.feature_cache_dir, model, processor, video_root=data_args.video_root)
    del model
    gc.collect()
    cache.check(path for record in records for path in record.videos)
    return cache


def inference_loader(checkpoint: Path, training_args: TrainingArguments | None = None) -> Callable[[], torch.nn.Module]:
    """Loads a checkpoint for generation when called: LoRA merged (faster), whole on every process, on the device the
    run trains on, in bf16 when it trains in bf16 (without `training_args`: on the CPU, as saved)."""

    def load() -> torch.nn.Module:
        return load_for_generation(checkpoint, training_args)[0]

    return load


def load_for_generation(
    checkpoint: str | Path, training_args: TrainingArguments | None = None
) -> tuple[torch.nn.Module, VideoLLMProcessor]:
    """A checkpoint and its processor, placed as `inference_loader` says."""
    device = training_args.device if training_args is not None else "cpu"
    dtype = torch.bfloat16 if training_args is not None and training_args.bf16 else None
    with unpartitioned_loads(training_args):
        return load_for_inference(checkpoint, device, dtype)


@contextlib.contextmanager
def unpartitioned_loads(training_args: TrainingArguments | None) -> Iterator[None]:
    """Loads in this block give every process the whole weights, also in a DeepSpeed ZeRO-3 run, where transformers
    would partition them across the processes: generation and LoRA merging need them whole."""
    from transformers.integrations import is_deepspeed_zero3_enabled, set_hf_deepspeed_config, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    # The run's DeepSpeed config object: the Trainer's own with `--deepspeed`, accelerate's under `accelerate launch`.
    plugin = getattr(training_args, "deepspeed_plugin", None)
    config = getattr(training_args, "hf_deepspeed_config", None) or getattr(plugin, "dschf", None)
    if config is None:
        raise RuntimeError("DeepSpeed ZeRO-3 is on, but the run's training arguments do not hold its config")
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


def record_verifiers(args: SelfTrainArguments, records: Sequence[LabelledRecord]) -> RecordVerifiers:
    """The run's verifiers for `records` (training and evaluation together, so class groups span both)."""
    return RecordVerifiers(records, spec=args.verifier, synonyms=args.synonym_map(), group_key=args.class_group_key)


def should_stop(history: Sequence[float | None], args: SelfTrainArguments) -> bool:
    """True when the last accuracy did not rise by more than `min_gain` above the best before it."""
    if not args.stop_when_no_gain or len(history) < 2 or history[-1] is None:
        return False
    earlier = [a for a in history[:-1] if a is not None]
    return bool(earlier) and history[-1] <= max(earlier) + args.min_gain
