"""Video-STaR: self-training cycles that turn any labelled video dataset into instruction data.

Each cycle, for the labelled records `{"video", "question", "label", "label_type"?}` of `train_file`:

1. generate: the latest model answers every question (`num_samples` answers each, batched, sampler settings in
   the config; Video-STaR samples at temperature 0.2 with a step-by-step instruction in `answer_template`);
2. verify: the record's verifier keeps answers that agree with the label (`videollm.selftrain.verifiers`);
3. rationalise: for questions with no verified answer, the label is put in the prompt (`rationalize_template`) and
   the model explains it; an explanation that verifies is kept, paired with the ORIGINAL question (no label in it);
4. retrain on everything kept, from the initial checkpoint (`retrain_from: initial`, the paper's choice, which keeps
   errors from compounding) or from the last cycle's model (`retrain_from: previous`);
5. evaluate on the labelled `eval_file` with the same verifiers.

The run stops after `cycles` cycles, or as soon as the evaluated accuracy (overall, or of `metric_type`) does not rise
by more than `min_gain`. State and resumption: `videollm.selftrain.runs`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from videollm.data.dataset import ConversationDataset, VideoCollator
from videollm.data.formats import LabelledRecord, load_conversations, load_labelled, write_jsonl
from videollm.data.processor import VideoLLMProcessor
from videollm.eval.scoring import normalize_answer
from videollm.infer.generate import GenerationSettings
from videollm.model.checkpoint import load_model, save_checkpoint
from videollm.selftrain.runs import (
    Prompt,
    RunDirectory,
    SampleLog,
    Sampler,
    eval_columns,
    evaluate_step,
    fill,
    metric,
    read_json,
    write_json,
    write_summary,
)
from videollm.selftrain.verifiers import RecordVerifiers
from videollm.train.config import DataArguments, ModelArguments
from videollm.train.setup import load_or_build
from videollm.train.sft import VideoSFTTrainer

logger = logging.getLogger(__name__)

RETRAIN_FROM = ("initial", "previous")


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
        if self.num_samples < 1:
            raise ValueError(f"num_samples: must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("num_samples > 1 needs do_sample: true (greedy answers are all the same)")
        if self.generation_batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("generation_batch_size and eval_batch_size must be >= 1")
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


@dataclass
class StarArguments(SelfTrainArguments):
    """Video-STaR cycles: generate, verify, rationalise failures, retrain, evaluate."""

    cycles: int = field(default=3, metadata={"help": "most cycles to run (Video-STaR: about 3)"})
    retrain_from: str = field(
        default="initial", metadata={"help": "initial (each cycle trains the seed model, as in STaR) | previous"}
    )
    rationalize: bool = field(default=True, metadata={"help": "explain the label for questions answered wrongly"})
    rationalize_template: str = field(
        default="{question}\nThe correct answer is {label}. Explain why, then give the answer.",
        metadata={"help": "the rationalisation prompt; {label} is the record's label"},
    )
    max_kept_per_prompt: int = field(default=1, metadata={"help": "verified distinct answers kept per question"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cycles < 1:
            raise ValueError(f"cycles: must be >= 1, got {self.cycles}")
        if self.retrain_from not in RETRAIN_FROM:
            raise ValueError(f"retrain_from: {self.retrain_from!r} is not one of {' | '.join(RETRAIN_FROM)}")
        if "{label}" not in self.rationalize_template:
            raise ValueError("rationalize_template: must contain {label} (the label goes into the prompt)")
        if self.max_kept_per_prompt < 1:
            raise ValueError("max_kept_per_prompt: must be >= 1")


# Settings that do not change what a run produces: they may differ when a run is resumed (or extended: `cycles`).
RESUMABLE_KEYS = {"cycles", "rounds", "stop_when_no_gain", "min_gain", "eval_batch_size"}
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


# ---- shared pieces (STaR and self-preference) ---------------------------------------------------------------------


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


def initial_checkpoint(run: RunDirectory, model_args: ModelArguments, data_args: DataArguments, seed: int) -> Path:
    """The seed model's checkpoint: `model_name_or_path`, or a model built once (seeded) and saved in `initial/`."""
    if model_args.model_name_or_path:
        return Path(model_args.model_name_or_path).resolve()
    path = run.path / "initial"
    if not (path / "config.json").is_file():
        set_seed(seed)
        model, processor = load_or_build(model_args, data_args)
        partial = run.path / "initial.partial"
        save_checkpoint(model, processor, partial)
        os.replace(partial, path)
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


def inference_loader(checkpoint: Path) -> Callable[[], torch.nn.Module]:
    """Loads a checkpoint for generation (LoRA merged: faster) when called."""

    def load() -> torch.nn.Module:
        model, _ = load_model(checkpoint, merge=True)
        return model.eval()

    return load


def record_verifiers(args: SelfTrainArguments, records: Sequence[LabelledRecord]) -> RecordVerifiers:
    return RecordVerifiers(records, spec=args.verifier, synonyms=args.synonym_map(), group_key=args.class_group_key)


def first_verified(rows: Sequence[dict], limit: int) -> list[dict]:
    """Verified rows with distinct answers (normalised), in sample order, at most `limit`."""
    kept, seen = [], set()
    for row in rows:
        key = normalize_answer(row["answer"] or "")
        if row["verdict"] and key and key not in seen:
            seen.add(key)
            kept.append(row)
    return kept[:limit]


def should_stop(history: Sequence[float | None], args: SelfTrainArguments) -> bool:
    """True when the last accuracy did not rise by more than `min_gain` above the best before it."""
    if not args.stop_when_no_gain or len(history) < 2 or history[-1] is None:
        return False
    earlier = [a for a in history[:-1] if a is not None]
    return bool(earlier) and history[-1] <= max(earlier) + args.min_gain


# ---- training -------------------------------------------------------------------------------------------------------


def train_on_kept(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    processor: VideoLLMProcessor,
    start: Path,
    train_file: Path,
    output_dir: Path,
    callbacks: Sequence[TrainerCallback] | None = None,
) -> dict:
    """Fine-tune `start` on the conversations in `train_file` into `output_dir`; resumable, done once.

    A `train_done.json` marks a finished training. Otherwise training resumes from the last Trainer checkpoint in
    `output_dir` (with `save_strategy: steps`), or starts again from `start` with the same seed.
    """
    done = read_json(output_dir / "train_done.json")
    if done is not None:
        return done
    set_seed(training_args.seed)  # LoRA and any new weights start the same in a rerun
    model, _ = load_or_build(model_from(model_args, start), data_args)
    records = load_conversations(train_file)
    args = dataclasses.replace(training_args, output_dir=str(output_dir))
    trainer = VideoSFTTrainer(
        model=model,
        args=args,
        train_dataset=ConversationDataset(records, processor),
        data_collator=VideoCollator(processor),
        processing_class=processor,
        callbacks=list(callbacks or []),
    )
    resume = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume:
        logger.info("training resumes from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(output_dir))
    trainer.save_state()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {"train_steps": trainer.state.global_step, "train_loss": losses[-1] if losses else None, "resumed_from": resume}
    del trainer, model
    gc.collect()
    write_json(output_dir / "train_done.json", result)
    return result


# ---- the cycle ------------------------------------------------------------------------------------------------------


def kept_conversations(prompts: Sequence[Prompt], kept: dict[str, list[dict]], cycle: int) -> list[dict]:
    """Training conversations: each prompt's ORIGINAL question (no label) with its kept answers."""
    rows = []
    for prompt in prompts:
        for number, sample in enumerate(kept.get(prompt.id, [])):
            rows.append({
                "id": f"{prompt.id}_{number}",
                "videos": [str(Path(v).resolve()) for v in prompt.record.videos],
                "messages": prompt.messages + [{"role": "assistant", "content": sample["answer"]}],
                "prompt_id": prompt.id, "cycle": cycle, "rationalized": sample["rationalized"],
                "type": prompt.record.meta.get("type"),
            })  # fmt: skip
    return rows


def run_star(
    model_args: ModelArguments,
    data_args: DataArguments,
    star_args: StarArguments,
    training_args: TrainingArguments,
    callbacks: Sequence[TrainerCallback] | None = None,
) -> list[dict]:
    """Run (or resume) Video-STaR cycles in `training_args.output_dir`; returns the summary rows (cycle 0: the seed)."""
    records, eval_records = load_records(data_args, star_args)
    verifiers = record_verifiers(star_args, records + eval_records)
    run = RunDirectory(
        training_args.output_dir, run_settings(model_args, data_args, star_args, training=training_args),
        step_name="cycle", ignore=RESUMABLE_KEYS,
    )  # fmt: skip
    if run.open():
        logger.info("resuming the run in %s", run.path)
    initial = initial_checkpoint(run, model_args, data_args, training_args.seed)
    processor = run_processor(initial, data_args)
    sampler = Sampler(
        processor, verifiers, star_args.generation(), batch_size=star_args.generation_batch_size,
        seed=training_args.seed, step_name="cycle", video_root=data_args.video_root,
    )  # fmt: skip
    prompts = [Prompt(r, fill(star_args.answer_template, r)) for r in records]

    def evaluate(step_dir: Path, checkpoint: Path) -> dict | None:
        return evaluate_step(
            step_dir, inference_loader(checkpoint), processor, eval_records, verifiers, star_args.evaluation(),
            star_args.eval_batch_size, star_args.answer_template,
        )  # fmt: skip

    baseline = evaluate(run.step_dir(0), initial)
    rows = [eval_columns({"cycle": 0, "model": str(initial)}, baseline)]
    history = [metric(baseline, star_args.metric_type)]
    latest = initial
    for cycle in range(1, star_args.cycles + 1):
        row = run.finished(cycle)
        if row is None:
            row = _cycle(cycle, latest, initial, prompts, run, sampler, processor, model_args, data_args, star_args,
                         training_args, callbacks, evaluate)  # fmt: skip
            run.finish(cycle, row)
        else:
            logger.info("cycle %d already finished; skipped", cycle)
        rows.append(row)
        latest = Path(row["model"])
        history.append(row.get("metric"))
        if should_stop(history, star_args):
            logger.info("accuracy did not rise in cycle %d: stopping", cycle)
            break
    write_summary(run, rows, f"Video-STaR: {run.path}", plot_keys=("kept_rate",))
    return rows


def _cycle(
    cycle: int, latest: Path, initial: Path, prompts: list[Prompt], run: RunDirectory, sampler: Sampler,
    processor: VideoLLMProcessor, model_args: ModelArguments, data_args: DataArguments, star_args: StarArguments,
    training_args: TrainingArguments, callbacks, evaluate,
) -> dict:  # fmt: skip
    started = time.time()
    step_dir = run.step_dir(cycle)
    log = SampleLog(step_dir / "samples.jsonl")
    cached: dict[str, torch.nn.Module] = {}

    def generator() -> torch.nn.Module:
        if "model" not in cached:
            cached["model"] = inference_loader(latest)()
        return cached["model"]

    # (1, 2) answer and verify
    answers = sampler.run(generator, prompts, "answer", cycle, log, rationalized=False)
    kept = {p.id: first_verified(answers[p.id], star_args.max_kept_per_prompt) for p in prompts}
    failed = [p for p in prompts if not kept[p.id]]
    # (3) rationalise: the label in the prompt; what verifies is kept with the original question
    rationalized = 0
    if star_args.rationalize and failed:
        hinted = [Prompt(p.record, fill(star_args.rationalize_template, p.record)) for p in failed]
        explained = sampler.run(generator, hinted, "rationalize", cycle, log, rationalized=True)
        for prompt in failed:
            kept[prompt.id] = first_verified(explained[prompt.id], star_args.max_kept_per_prompt)
            rationalized += bool(kept[prompt.id])
    cached.clear()
    gc.collect()

    # (4) retrain on everything kept
    train_rows = kept_conversations(prompts, kept, cycle)
    train_file = step_dir / "train.jsonl"
    write_jsonl(train_file, train_rows)
    checkpoint = step_dir / "checkpoint"
    start = initial if star_args.retrain_from == "initial" else latest
    if train_rows:
        training = train_on_kept(model_args, data_args, training_args, processor, start, train_file, checkpoint, callbacks)
    else:
        logger.warning("cycle %d kept no answers: nothing to train on; the model stays %s", cycle, start)
        training, checkpoint = {"train_steps": 0, "train_loss": None}, start

    # (5) evaluate
    summary = evaluate(step_dir, checkpoint)
    right = sum(1 for p in prompts if kept[p.id] and not kept[p.id][0]["rationalized"])
    row = {
        "cycle": cycle, "prompts": len(prompts), "samples": sum(len(v) for v in answers.values()),
        "right": right, "rationalized": rationalized, "kept": len(train_rows),
        "kept_rate": (right + rationalized) / len(prompts) if prompts else 0.0,
        "train_steps": training["train_steps"], "train_loss": training["train_loss"],
        "model": str(Path(checkpoint).resolve()), "minutes": round((time.time() - started) / 60, 2),
    }  # fmt: skip
    for question_type in sorted({p.record.meta.get("type") for p in prompts if p.record.meta.get("type")}):
        of_type = [p for p in prompts if p.record.meta.get("type") == question_type]
        row[f"kept_rate/{question_type}"] = sum(bool(kept[p.id]) for p in of_type) / len(of_type)
    row = eval_columns(row, summary)
    row["metric"] = metric(summary, star_args.metric_type)
    return row
