"""Self-preference rounds (LLaVA-OneVision-Chat's iterative DPO, VideoSAVi's self-alignment): the model's own samples,
scored, become DPO pairs; each round starts from the last round's policy.

Each round:
1. sample: the current policy answers every question `num_samples` (k) times (OV-Chat: k=5, temperature 0.7,
   top-p 0.9); the k answers of a question share one vision encode and one prefill;
2. score: with the record's verifier against its label (`scorer: verifier`, the score ranks: IoU, closeness of a
   number, 1/0 for classes), or with a judge (`scorer: judge`): a video LLM asked whether each answer is right, the
   policy itself by default (VideoSAVi's self-critique) or `judge_model_name_or_path`; the score is p(yes);
3. pair: the best answer is chosen and the worst rejected, when their scores differ by more than `min_score_gap`;
   with `borrow_rejected`, a question whose k answers all verify is paired too: its answer against another question's
   sample (same class group) that is wrong for it;
4. train one DPO round (`VideoDPOTrainer`, every key of `recipes/dpo.py`); with LoRA the adapter is merged after the
   round, and the merged model is the next round's policy AND reference;
5. evaluate on the labelled `eval_file` with the verifiers.

`rounds` (the DPO config's key) sets the number of rounds. State and resumption: `videollm.selftrain.runs`. With
`feature_cache_dir`, sampling, the policy judging itself, training and evaluation read the videos' frozen vision
features from the cache (a separate judge decodes with its own processor).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from videollm.data.feature_cache import FeatureCache
from videollm.data.formats import load_preferences
from videollm.data.processor import SampleTooLongError, VideoLLMProcessor
from videollm.data.robust import BadSampleCollator, BadSamplePolicy
from videollm.data.video import DecodedVideo
from videollm.infer.processes import Processes, stable_seed
from videollm.model.checkpoint import is_adapter_checkpoint, load_model, save_checkpoint
from videollm.model.trainable import unwrap
from videollm.selftrain import preferences
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
    load_for_generation,
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
    unpartitioned_loads,
    write_summary,
)
from videollm.selftrain.verifiers import RecordVerifiers, normalize_answer
from videollm.train.config import DataArguments, ModelArguments
from videollm.train.dpo import (
    PreferenceCollator,
    VideoDPOConfig,
    VideoDPOTrainer,
    build_preference_dataset,
    preference_rows,
)
from videollm.train.setup import load_or_build

logger = logging.getLogger(__name__)

SCORERS = ("verifier", "judge")


@dataclass
class SelfPreferenceArguments(SelfTrainArguments):
    """Self-preference rounds: k samples per question, scored, best vs worst as DPO pairs."""

    num_samples: int = field(default=5, metadata={"help": "answers sampled per question (OV-Chat: 5)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (OV-Chat: 0.7)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass (OV-Chat: 0.9)"})
    scorer: str = field(default="verifier", metadata={"help": "verifier (against the label) | judge (a model's p(yes))"})
    judge_model_name_or_path: str | None = field(
        default=None, metadata={"help": "judge: a videollm checkpoint; default: the current policy judges itself"}
    )
    judge_template: str = field(
        default="{question}\nProposed answer: {answer}\nIs the proposed answer correct? Answer yes or no.",
        metadata={"help": "judge: the question put to the judge; {question}, {answer} and record fields"},
    )
    min_score_gap: float = field(default=0.0, metadata={"help": "pair only when best - worst score exceeds this"})
    require_correct_chosen: bool = field(
        default=True, metadata={"help": "scorer verifier: pair only when the best answer verifies"}
    )
    borrow_rejected: bool = field(
        default=False,
        metadata={"help": "scorer verifier: a question whose samples all verify borrows its rejected answer from "
                          "another question of its class group (a sample that is wrong for it), so a question type "
                          "the policy always gets right still has pairs"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer: {self.scorer!r} is not one of {' | '.join(SCORERS)}")
        if self.num_samples < 2:
            raise ValueError("num_samples: a pair needs at least 2 samples per question")
        if "{answer}" not in self.judge_template:
            raise ValueError("judge_template: must contain {answer}")
        if self.borrow_rejected and self.scorer != "verifier":
            raise ValueError("borrow_rejected: needs scorer: verifier (a borrowed answer is checked against the label)")


class ModelJudge:
    """Scores answers with a video LLM asked whether each is correct: p(yes) / (p(yes) + p(no)) at its first answer token.

    `model` and `processor` are a separate judge; without `model` the policy that sampled the answers judges them
    (VideoSAVi's self-critique), with the run's processor. The k answers of one question share one vision encode.
    """

    def __init__(self, template: str, processor: VideoLLMProcessor, model: torch.nn.Module | None = None):
        self.template = template
        self.processor = processor
        self.model = model
        tokenizer = processor.tokenizer
        self.yes = sorted({tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "Yes")})
        self.no = sorted({tokenizer.encode(w, add_special_tokens=False)[0] for w in ("no", "No")})

    @torch.no_grad()
    def __call__(
        self, policy: torch.nn.Module, prompt: Prompt, videos: list[DecodedVideo], answers: list[str]
    ) -> list[float | None]:
        """p(yes) per answer; None for an answer whose judge prompt exceeds the processor's `max_length` (a cut
        prompt would lose the question the judge answers, so its score would mean nothing)."""
        model = self.model if self.model is not None else policy
        if self.model is not None:  # a separate judge samples frames with its own spec
            videos = [self.processor.load_video(path) for path in prompt.record.videos]
        processor = self.processor
        encoded = {}
        for index, answer in enumerate(answers):
            content = "<video>\n" * len(videos) + fill(self.template, prompt.record, answer=answer)
            question = [{"role": "user", "content": content}]
            try:
                encoded[index] = processor.encode(question, videos, add_generation_prompt=True, with_video_inputs=False)
            except SampleTooLongError:
                continue
        if not encoded:
            return [None] * len(answers)
        batch = processor.collate([{"input_ids": e.input_ids} for e in encoded.values()], padding_side="left")
        device = next(model.parameters()).device
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        kwargs = {}
        if videos:  # decoded, or read from the run's feature cache
            inputs = {key: value.to(device) for key, value in processor.video_inputs(videos).items()}
            features = unwrap(model).visual_tokens(inputs, [len(v.indices) for v in videos])
            kwargs["video_embeds"] = features.repeat(len(encoded), 1)
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1, **kwargs
        ).logits[:, -1].float()
        logprobs = logits.log_softmax(-1)
        yes, no = logprobs[:, self.yes].logsumexp(-1), logprobs[:, self.no].logsumexp(-1)
        scores = dict(zip(encoded, torch.sigmoid(yes - no).tolist()))
        return [scores.get(index) for index in range(len(answers))]


def best_worst_pairs(
    prompts: Sequence[Prompt],
    samples: dict[str, list[dict]],
    score_key: str,
    min_gap: float,
    require_correct: bool,
    video_root: str | None,
    round_number: int,
) -> tuple[list[dict], Counter]:
    """One pair per prompt: the highest-scored distinct answer chosen, the lowest rejected (ties: the earlier sample).

    An answer without a score (its judge prompt did not fit) takes no part; `dropped["unscored_answers"]` counts them.
    """
    pairs, dropped = [], Counter()
    for prompt in prompts:
        candidates, seen = [], set()
        for row in samples[prompt.id]:
            if row.get(score_key, 0.0) is None:
                dropped["unscored_answers"] += 1
                continue
            key = normalize_answer(row["answer"] or "")
            if key and key not in seen:
                seen.add(key)
                candidates.append(row)
        if len(candidates) < 2:
            dropped["one_distinct_answer"] += 1
            continue
        best = max(candidates, key=lambda r: r[score_key])  # max/min return the first of equals: the earlier sample
        worst = min(candidates, key=lambda r: r[score_key])
        if best[score_key] - worst[score_key] <= min_gap:
            dropped["no_score_gap"] += 1
            continue
        if require_correct and not best["verdict"]:
            dropped["best_is_wrong"] += 1
            continue
        owner = preferences.Prompt(id=prompt.id, messages=prompt.messages, videos=list(prompt.record.videos))
        pairs.append(preferences.preference_record(
            owner, f"{prompt.id}_round{round_number}", best["answer"], worst["answer"], video_root,
            round=round_number, chosen_score=best[score_key], rejected_score=worst[score_key],
        ))  # fmt: skip
    return pairs, dropped


def borrowed_rejected_pairs(
    prompts: Sequence[Prompt],
    samples: dict[str, list[dict]],
    verifiers: RecordVerifiers,
    group_key: str,
    seed: int,
    video_root: str | None,
    round_number: int,
    paired: Collection[str] = (),
) -> tuple[list[dict], Counter]:
    """Pairs for the prompts (not already `paired`) whose samples all verify: their first answer chosen, and rejected a
    sample of another prompt in the same class group (``meta[group_key]``, e.g. the question type) that fails this
    prompt's label, drawn as often as the policy gave it.

    Best-vs-worst pairing gives nothing where the policy is always right, so DPO on the other question types' pairs
    alone is free to move it there: on the synthetic task it went from 100% to 0% on colour in one round. A borrowed
    rejected answer is still the policy's own text, and the verifier checks it is wrong for this prompt. The choice is
    seeded by (seed, round, prompt id), so a resumed round pairs the same way.
    """
    pool: dict[Any, Counter] = {}  # group -> how often each answer text was sampled
    for prompt in prompts:
        answers = pool.setdefault(prompt.record.meta.get(group_key), Counter())
        answers.update(row["answer"].strip() for row in samples[prompt.id] if (row["answer"] or "").strip())
    pairs, counts = [], Counter()
    for prompt in prompts:
        rows = samples[prompt.id]
        if prompt.id in paired or not rows or not all(row["verdict"] for row in rows):
            continue
        check, label = verifiers(prompt.record), prompt.record.label
        answers = pool[prompt.record.meta.get(group_key)]
        wrong = [text for text in answers if not check(text, label)]
        if not wrong:
            counts["no_wrong_answer_to_borrow"] += 1
            continue
        rng = random.Random(stable_seed(seed, round_number, prompt.id))
        rejected = rng.choices(wrong, weights=[answers[text] for text in wrong])[0]  # as often as the policy says it
        owner = preferences.Prompt(id=prompt.id, messages=prompt.messages, videos=list(prompt.record.videos))
        pairs.append(preferences.preference_record(
            owner, f"{prompt.id}_round{round_number}_borrowed", rows[0]["answer"], rejected, video_root,
            round=round_number, chosen_score=rows[0]["score"], rejected_score=0.0, rejected_from="another prompt",
        ))  # fmt: skip
    return pairs, counts


def train_preferences(
    model_args: ModelArguments,
    data_args: DataArguments,
    dpo_args: VideoDPOConfig,
    processor: VideoLLMProcessor,
    start: Path,
    pairs_file: Path,
    step_dir: Path,
    callbacks: Sequence[TrainerCallback] | None = None,
    cache: FeatureCache | None = None,
) -> dict:
    """One DPO round from `start` on `pairs_file`; the trained model in `step_dir/checkpoint`, merged into
    `step_dir/model` when it is an adapter. Resumable and done once (`train_done.json`). With `cache`, the videos'
    features are read from it."""
    output_dir = step_dir / "checkpoint"

    def train() -> dict:
        set_seed(dpo_args.seed)
        model, _ = load_or_build(model_from(model_args, start), data_args, training_args=dpo_args)
        load_video = processor.load_video
        if cache is not None:
            unwrap(model).use_cached_vision(cache.level)
            load_video = cache.get
        rows = preference_rows(load_preferences(pairs_file, video_root=data_args.video_root))
        with dpo_args.main_process_first(desc="preference dataset"):
            dataset = build_preference_dataset(rows, processor, cache_dir=str(step_dir / "datasets"))
        args = dataclasses.replace(dpo_args, output_dir=str(output_dir), rounds=1, round_train_files=None)
        collator = BadSampleCollator(
            PreferenceCollator(processor, mark_phrases="rrpo" in args.loss_type, load_video=load_video),
            load_video,
            {"train": dataset},
            BadSamplePolicy.from_args(data_args, args),
        )
        trainer = VideoDPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            processing_class=processor,
            callbacks=list(callbacks or []),
        )
        resume, last = train_and_save(trainer, output_dir)
        result = {
            "train_steps": trainer.state.global_step, "train_loss": last.get("loss"),
            "reward_accuracy": last.get("rewards/accuracies"), "reward_margin": last.get("rewards/margins"),
            "model": str(output_dir.resolve()), "resumed_from": resume,
        }  # fmt: skip
        del trainer, model
        gc.collect()
        if is_adapter_checkpoint(output_dir):
            # the next round's policy and reference: this round's LoRA merged into its base (OV-Chat, mrDPO)
            result["model"] = str(merged_copy(output_dir, step_dir / "model", processor, dpo_args))
        return result

    return train_once(output_dir, Processes.of(dpo_args), train)


def merged_copy(checkpoint: Path, output_dir: Path, processor: VideoLLMProcessor, training_args: TrainingArguments) -> Path:
    """A full checkpoint of an adapter checkpoint (LoRA merged), written once, by the main process."""

    def merge() -> None:
        if (output_dir / "config.json").is_file():
            return
        with unpartitioned_loads(training_args):
            model, _ = load_model(checkpoint, merge=True)
        partial = output_dir.with_name(output_dir.name + ".partial")
        save_checkpoint(model, processor, partial)
        os.replace(partial, output_dir)

    Processes.of(training_args).on_main(merge)
    return output_dir.resolve()


def run_self_preference(
    model_args: ModelArguments,
    data_args: DataArguments,
    pref_args: SelfPreferenceArguments,
    dpo_args: VideoDPOConfig,
    callbacks: Sequence[TrainerCallback] | None = None,
) -> list[dict]:
    """Run (or resume) `dpo_args.rounds` self-preference rounds in `dpo_args.output_dir`; returns the summary rows."""
    processes = Processes.of(dpo_args)
    if dpo_args.round_train_files:
        raise ValueError("round_train_files: self-preference rounds make their own pairs; set rounds instead")
    records, eval_records = load_records(data_args, pref_args)
    verifiers = record_verifiers(pref_args, records + eval_records)
    run = RunDirectory(
        dpo_args.output_dir, run_settings(model_args, data_args, pref_args, training=dpo_args), step_name="round",
        ignore=RESUMABLE_KEYS, processes=processes,
    )  # fmt: skip
    if run.open():
        logger.info("resuming the run in %s", run.path)
    initial = initial_checkpoint(run, model_args, data_args, dpo_args)
    processor = run_processor(initial, data_args)
    if is_adapter_checkpoint(initial):
        # round 1's reference must be the seed policy itself, not the base under its adapter
        initial = merged_copy(initial, run.path / "initial_merged", processor, dpo_args)
    cache = open_feature_cache(model_args, data_args, dpo_args, initial, processor, records + eval_records)
    load_video = cache.get if cache is not None else None
    judge = None
    if pref_args.scorer == "judge":
        judge_model, judge_processor = None, processor
        if pref_args.judge_model_name_or_path:
            judge_model, judge_processor = load_for_generation(pref_args.judge_model_name_or_path, dpo_args)
        judge = ModelJudge(pref_args.judge_template, judge_processor, judge_model)
    sampler = Sampler(
        processor, verifiers, pref_args.generation(), batch_size=pref_args.generation_batch_size, seed=dpo_args.seed,
        step_name="round", video_root=data_args.video_root, scorer=judge, load_video=load_video, processes=processes,
    )  # fmt: skip
    prompts = [Prompt(r, fill(pref_args.answer_template, r)) for r in records]

    def evaluate(step_dir: Path, checkpoint: Path) -> dict | None:
        return evaluate_step(
            step_dir, inference_loader(checkpoint, dpo_args), processor, eval_records, verifiers, pref_args.evaluation(),
            pref_args.eval_batch_size, pref_args.answer_template, load_video, processes,
        )  # fmt: skip

    def train(start: Path, pairs_file: Path, step_dir: Path) -> dict:
        return train_preferences(model_args, data_args, dpo_args, processor, start, pairs_file, step_dir, callbacks, cache)

    baseline = evaluate(run.step_dir(0), initial)
    rows = [eval_columns({"round": 0, "model": str(initial)}, baseline)]
    history = [metric(baseline, pref_args.metric_type)]
    latest = initial
    for number in range(1, dpo_args.rounds + 1):
        row = run.finished(number)
        if row is None:
            row = _round(number, latest, prompts, run, sampler, data_args, pref_args, dpo_args, train, evaluate)
            run.finish(number, row)
        rows.append(row)
        latest = Path(row["model"])
        history.append(row.get("metric"))
        if should_stop(history, pref_args):
            logger.info("accuracy did not rise in round %d: stopping", number)
            break
    write_summary(run, rows, f"Self-preference rounds: {run.path}", plot_keys=("pair_rate",))
    return rows


def _round(
    number: int, latest: Path, prompts: list[Prompt], run: RunDirectory, sampler: Sampler, data_args: DataArguments,
    pref_args: SelfPreferenceArguments, dpo_args: VideoDPOConfig, train, evaluate,
) -> dict:  # fmt: skip
    started = time.time()
    step_dir = run.step_dir(number)
    log = SampleLog(step_dir / "samples.jsonl", run.processes)
    samples = sampler.run(inference_loader(latest, dpo_args), prompts, "sample", number, log)
    gc.collect()
    score_key = "judge_score" if pref_args.scorer == "judge" else "score"
    pairs, dropped = best_worst_pairs(
        prompts, samples, score_key, pref_args.min_score_gap,
        pref_args.require_correct_chosen and pref_args.scorer == "verifier", data_args.video_root, number,
    )  # fmt: skip
    borrowed = []
    if pref_args.borrow_rejected:
        borrowed, unpaired = borrowed_rejected_pairs(
            prompts, samples, sampler.verifiers, pref_args.class_group_key, dpo_args.seed, data_args.video_root,
            number, paired={pair["question_id"] for pair in pairs},
        )  # fmt: skip
        dropped.update(unpaired)
    pairs += borrowed
    pairs_file = step_dir / "pairs.jsonl"
    run.write_rows(pairs_file, pairs)
    if pairs:
        training = train(latest, pairs_file, step_dir)
    else:
        logger.warning("round %d made no pairs (%s): nothing to train on", number, dict(dropped))
        training = {"train_steps": 0, "train_loss": None, "model": str(latest)}
    summary = evaluate(step_dir, Path(training["model"]))
    all_rows = [row for rows in samples.values() for row in rows]
    row = {
        "round": number, "prompts": len(prompts), "samples": len(all_rows),
        "sample_accuracy": sum(r["verdict"] for r in all_rows) / len(all_rows) if all_rows else 0.0,
        "pairs": len(pairs), "pair_rate": len(pairs) / len(prompts) if prompts else 0.0, "borrowed": len(borrowed),
        **{f"dropped/{k}": v for k, v in sorted(dropped.items())},
        "train_steps": training["train_steps"], "train_loss": training["train_loss"],
        "reward_accuracy": training.get("reward_accuracy"), "model": training["model"],
        "minutes": round((time.time() - started) / 60, 2),
    }  # fmt: skip
    row = eval_columns(row, summary)
    row["metric"] = metric(summary, pref_args.metric_type)
    return row
