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
by more than `min_gain`. State and resumption: `videollm.selftrain.runs`. With `feature_cache_dir`, every step reads
the videos' frozen vision features from the cache instead of decoding and encoding them (`open_feature_cache`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

from videollm.data.dataset import ConversationDataset, VideoCollator
from videollm.data.feature_cache import CachedFeatureDataset, FeatureCache
from videollm.data.formats import load_conversations
from videollm.data.processor import VideoLLMProcessor
from videollm.data.robust import BadSamplePolicy
from videollm.infer.processes import Processes
from videollm.model.trainable import unwrap
from videollm.selftrain.runs import (
    RESUMABLE_KEYS,
    Prompt,
    RunDirectory,
    SampleLog,
    Sampler,
    SelfTrainArguments,
    eval_columns,
    evaluate_step,
    fill,
    inference_loader,
    initial_checkpoint,
    load_records,
    metric,
    model_from,
    open_feature_cache,
    record_verifiers,
    run_processor,
    run_settings,
    should_stop,
    train_and_save,
    train_once,
    write_summary,
)
from videollm.selftrain.verifiers import normalize_answer
from videollm.train.config import DataArguments, ModelArguments
from videollm.train.setup import load_or_build
from videollm.train.sft import VideoSFTConfig, VideoSFTTrainer

logger = logging.getLogger(__name__)

RETRAIN_FROM = ("initial", "previous")


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


# ---- answers kept ---------------------------------------------------------------------------------------------------


def first_verified(rows: Sequence[dict], limit: int) -> list[dict]:
    """Verified rows with distinct answers (normalised), in sample order, at most `limit`."""
    kept, seen = [], set()
    for row in rows:
        key = normalize_answer(row["answer"] or "")
        if row["verdict"] and key and key not in seen:
            seen.add(key)
            kept.append(row)
    return kept[:limit]


# ---- training -------------------------------------------------------------------------------------------------------


def train_on_kept(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: VideoSFTConfig,
    processor: VideoLLMProcessor,
    start: Path,
    train_file: Path,
    output_dir: Path,
    callbacks: Sequence[TrainerCallback] | None = None,
    cache: FeatureCache | None = None,
) -> dict:
    """Fine-tune `start` on the conversations in `train_file` into `output_dir`; resumable, done once.

    A `train_done.json` marks a finished training. Otherwise training resumes from the last Trainer checkpoint in
    `output_dir` (with `save_strategy: steps`), or starts again from `start` with the same seed. With `cache`, the
    videos' features are read from it.
    """
    def train() -> dict:
        set_seed(training_args.seed)  # LoRA and any new weights start the same in a rerun
        model, _ = load_or_build(model_from(model_args, start), data_args, training_args=training_args)
        records = load_conversations(train_file)
        args = dataclasses.replace(training_args, output_dir=str(output_dir))
        bad_samples = BadSamplePolicy.from_args(data_args, args)
        if cache is not None:
            unwrap(model).use_cached_vision(cache.level)
            train_dataset = CachedFeatureDataset(records, processor, cache, bad_samples)
        else:
            train_dataset = ConversationDataset(records, processor, bad_samples)
        trainer = VideoSFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=VideoCollator(processor, sample_ids=True),
            processing_class=processor,
            callbacks=list(callbacks or []),
        )
        resume, last = train_and_save(trainer, output_dir)
        return {"train_steps": trainer.state.global_step, "train_loss": last.get("loss"), "resumed_from": resume}

    return train_once(output_dir, Processes.of(training_args), train)


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
    training_args: VideoSFTConfig,
    callbacks: Sequence[TrainerCallback] | None = None,
) -> list[dict]:
    """Run (or resume) Video-STaR cycles in `training_args.output_dir`; returns the summary rows (cycle 0: the seed)."""
    processes = Processes.of(training_args)
    records, eval_records = load_records(data_args, star_args)
    verifiers = record_verifiers(star_args, records + eval_records)
    run = RunDirectory(
        training_args.output_dir, run_settings(model_args, data_args, star_args, training=training_args),
        step_name="cycle", ignore=RESUMABLE_KEYS, processes=processes,
    )  # fmt: skip
    if run.open():
        logger.info("resuming the run in %s", run.path)
    initial = initial_checkpoint(run, model_args, data_args, training_args)
    processor = run_processor(initial, data_args)
    cache = open_feature_cache(model_args, data_args, training_args, initial, processor, records + eval_records)
    load_video = cache.get if cache is not None else None
    sampler = Sampler(
        processor, verifiers, star_args.generation(), batch_size=star_args.generation_batch_size,
        seed=training_args.seed, step_name="cycle", video_root=data_args.video_root, load_video=load_video,
        processes=processes,
    )  # fmt: skip
    prompts = [Prompt(r, fill(star_args.answer_template, r)) for r in records]

    def evaluate(step_dir: Path, checkpoint: Path) -> dict | None:
        return evaluate_step(
            step_dir, inference_loader(checkpoint, training_args), processor, eval_records, verifiers, star_args.evaluation(),
            star_args.eval_batch_size, star_args.answer_template, load_video, processes,
        )  # fmt: skip

    def train(start: Path, train_file: Path, checkpoint: Path) -> dict:
        return train_on_kept(model_args, data_args, training_args, processor, start, train_file, checkpoint, callbacks, cache)

    baseline = evaluate(run.step_dir(0), initial)
    rows = [eval_columns({"cycle": 0, "model": str(initial)}, baseline)]
    history = [metric(baseline, star_args.metric_type)]
    latest = initial
    for cycle in range(1, star_args.cycles + 1):
        row = run.finished(cycle)
        if row is None:
            row = _cycle(cycle, latest, initial, prompts, run, sampler, star_args, training_args, train, evaluate)
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
    star_args: StarArguments, training_args: VideoSFTConfig, train, evaluate,
) -> dict:  # fmt: skip
    started = time.time()
    step_dir = run.step_dir(cycle)
    log = SampleLog(step_dir / "samples.jsonl", run.processes)
    cached: dict[str, torch.nn.Module] = {}

    def generator() -> torch.nn.Module:
        if "model" not in cached:
            cached["model"] = inference_loader(latest, training_args)()
        return cached["model"]

    # (1, 2) answer and verify
    answers = sampler.run(generator, prompts, "answer", cycle, log, rationalized=False)
    kept = {p.id: first_verified(answers[p.id], star_args.max_kept_per_prompt) for p in prompts}
    failed = [p for p in prompts if not kept[p.id]]
    # (3) rationalise: the label in the prompt; what verifies is kept with the original question
    rationalized = 0
    if star_args.rationalize and failed:
        hinted = [Prompt(p.record, fill(star_args.rationalize_template, p.record)) for p in prompts]
        explained = sampler.run(generator, hinted, "rationalize", cycle, log, only={p.id for p in failed}, rationalized=True)
        for prompt in failed:
            kept[prompt.id] = first_verified(explained[prompt.id], star_args.max_kept_per_prompt)
            rationalized += bool(kept[prompt.id])
    cached.clear()
    gc.collect()

    # (4) retrain on everything kept
    train_rows = kept_conversations(prompts, kept, cycle)
    train_file = step_dir / "train.jsonl"
    run.write_rows(train_file, train_rows)
    checkpoint = step_dir / "checkpoint"
    start = initial if star_args.retrain_from == "initial" else latest
    if train_rows:
        training = train(start, train_file, checkpoint)
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
