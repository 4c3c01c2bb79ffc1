"""Preference-data builders for video DPO, from a model's own answers.

(a) `verified_pairs` (LLaVA-Hound / Video-STaR style): sample k answers per labelled question; a verifier marks each
    right or wrong against the label; right answers are chosen, wrong ones rejected.
(b) `temporal_pairs` (TEMPLE / RRPO style, no labels needed): the model's answer on the clean video is chosen, its
    answer on a temporally perturbed copy (frames shuffled, reversed or dropped) is rejected; TEMPLE's filters drop
    pairs that carry no signal; the differing phrases are marked for RRPO.
(c) `curriculum_stages` / `write_curriculum`: perturbation pairs grouped by magnitude, coarse (easy) first, one file
    per stage, trained as DPO rounds (`recipes/dpo.py --round_train_files ...`).

Rows are preference records as `load_preferences` reads them (`prompt`, `chosen`, `rejected`, `video(s)`, and
`chosen_phrases` / `rejected_phrases` / `perturbation` / `magnitude` kept in `meta`).

Magnitude of a temporal perturbation: the number of consecutive sampled frames it touches (capped to the clip). A
larger one changes more of the video, so the answers differ more plainly: large magnitudes are the easy stages.
"""

from __future__ import annotations

import difflib
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from videollm.data.formats import PLACEHOLDER, LabelledRecord, relative_video_path, write_jsonl
from videollm.data.video import DecodedVideo, decode_each
from videollm.infer.generate import set_apart_too_long
from videollm.infer.processes import Processes, cut_into_batches, stable_seed
from videollm.selftrain.runs import RunSettingsMismatch, SampleLog
from videollm.selftrain.verifiers import RecordVerifiers, Verifier, get_verifier, normalize_answer

if TYPE_CHECKING:
    from videollm.data.processor import VideoLLMProcessor
    from videollm.infer.generate import GenerationSettings

PERTURBATIONS = ("shuffle", "reverse", "drop")

# (conversations ending with a user turn, their decoded videos) -> answers, one list per conversation
Answerer = Callable[[Sequence[list[dict]], Sequence[list[DecodedVideo]]], list[list[str]]]


# ---- perturbations --------------------------------------------------------------------------------------------------


def perturb_video(video: DecodedVideo, kind: str, magnitude: int, seed: int = 0) -> DecodedVideo:
    """A temporally perturbed copy of `video`: a window of `magnitude` consecutive frames is shuffled, reversed or dropped.

    The window starts at a random frame drawn from `seed`. Shuffled and reversed frames keep the clean clip's
    timestamps (a prompt that states frame times does not give the perturbation away); `drop` keeps at least one frame.
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"perturbation {kind!r} unknown; choose from {', '.join(PERTURBATIONS)}")
    total = len(video.indices)
    size = min(int(magnitude), total - 1 if kind == "drop" else total)
    if size < (1 if kind == "drop" else 2):
        raise ValueError(f"{kind} of {magnitude} frames needs a longer clip than {total} frames")
    rng = random.Random(seed)
    start = rng.randrange(total - size + 1)
    window = list(range(start, start + size))
    if kind == "reverse":
        order = list(range(start)) + window[::-1] + list(range(start + size, total))
    elif kind == "shuffle":
        shuffled = window[:]
        while shuffled == window:
            rng.shuffle(shuffled)
        order = list(range(start)) + shuffled + list(range(start + size, total))
    else:
        order = [i for i in range(total) if i not in window]
    timestamps = [video.timestamps[i] for i in order] if kind == "drop" else list(video.timestamps)
    return replace(video, frames=video.frames[order], indices=[video.indices[i] for i in order], timestamps=timestamps)


# ---- pair filters and phrase marking --------------------------------------------------------------------------------


@dataclass
class PairFilter:
    """TEMPLE's filters: drop pairs without a preference signal or with implausible lengths."""

    min_length_ratio: float = field(default=0.5, metadata={"help": "shortest rejected/chosen length ratio kept (words)"})
    max_length_ratio: float = field(default=2.0, metadata={"help": "longest rejected/chosen length ratio kept (words)"})

    def reason(self, chosen: str, rejected: str) -> str | None:
        """Why the pair is dropped, or None to keep it."""
        clean, perturbed = normalize_answer(chosen), normalize_answer(rejected)
        if not clean or not perturbed:
            return "empty"
        if clean == perturbed:
            return "identical"
        if clean in perturbed:
            return "chosen_in_rejected"
        ratio = len(perturbed.split()) / len(clean.split())
        if not self.min_length_ratio <= ratio <= self.max_length_ratio:
            return "length_ratio"
        return None


def differing_phrases(chosen: str, rejected: str) -> tuple[list[str], list[str]]:
    """The word spans where two answers differ, as exact substrings of each (RRPO's marked phrases)."""
    chosen_words = [(m.group(), m.span()) for m in re.finditer(r"\S+", chosen)]
    rejected_words = [(m.group(), m.span()) for m in re.finditer(r"\S+", rejected)]
    matcher = difflib.SequenceMatcher(a=[w for w, _ in chosen_words], b=[w for w, _ in rejected_words], autojunk=False)
    chosen_phrases, rejected_phrases = [], []
    for tag, a0, a1, b0, b1 in matcher.get_opcodes():
        if tag == "equal":
            continue
        if a1 > a0:
            chosen_phrases.append(chosen[chosen_words[a0][1][0] : chosen_words[a1 - 1][1][1]])
        if b1 > b0:
            rejected_phrases.append(rejected[rejected_words[b0][1][0] : rejected_words[b1 - 1][1][1]])
    return chosen_phrases, rejected_phrases


# ---- prompts --------------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """A question about videos: the conversation so far (ending with a user turn) and the video paths."""

    id: str
    messages: list[dict]
    videos: list[str]
    label: Any = None
    label_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def prompts_from_labelled(records: Sequence[LabelledRecord]) -> list[Prompt]:
    """One user turn per labelled question, with a placeholder per video in front of the question."""
    return [
        Prompt(
            id=r.id,
            messages=[{"role": "user", "content": f"{PLACEHOLDER}\n" * len(r.videos) + r.question}],
            videos=list(r.videos),
            label=r.label,
            label_type=r.label_type,
            meta=dict(r.meta),
        )
        for r in records
    ]


def preference_record(
    prompt: Prompt, pair_id: str, chosen: str, rejected: str, video_root: str | None = None, **meta: Any
) -> dict:
    """A row `load_preferences` reads back; video paths relative to `video_root` when they lie under it."""
    videos = [relative_video_path(v, video_root) for v in prompt.videos]
    return {
        "id": pair_id, "question_id": prompt.id, "videos": videos, "prompt": prompt.messages,
        "chosen": chosen, "rejected": rejected, **meta,
    }  # fmt: skip


# ---- builders -------------------------------------------------------------------------------------------------------


@dataclass
class BuildReport:
    """What a builder kept and dropped, by reason; `unreadable` names each question dropped for its video, and why,
    `too_long` each dropped because its prompt is over the processor's `max_length`."""

    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    unreadable: list[str] = field(default_factory=list)
    too_long: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.kept} pairs kept; dropped: {reasons}"


# What a batch of questions gave: the rows kept, and why each other pair was dropped.
_BatchPairs = tuple[list[dict], list[str]]


def verified_pairs(
    prompts: Sequence[Prompt],
    answer: Answerer,
    load_video: Callable[[str], DecodedVideo],
    verifier_for: Callable[[Prompt], Verifier] | None = None,
    max_pairs_per_prompt: int = 1,
    seed: int = 0,
    video_root: str | None = None,
    batch_size: int = 8,
    processes: Processes = Processes(),
    log: SampleLog | None = None,
    processor: VideoLLMProcessor | None = None,
) -> tuple[list[dict], BuildReport]:
    """Pairs from labelled prompts: `answer` samples k answers each; verified ones are chosen, failed ones rejected.

    `verifier_for` picks each prompt's verifier; by default the one of its `label_type`. A prompt with no verified or
    no failed answer gives no pair. Duplicate answers count once; pairs are drawn at random (seeded per prompt), at
    most `max_pairs_per_prompt` per prompt. Batch `b` is answered by process `b mod N` of `processes`, from its own
    seed; a question whose video does not decode, or (given the answering model's `processor`) whose prompt is over
    its `max_length`, is dropped and named in the report. With a `log`, each batch's outcome is written to it as it
    comes, and a rerun on the same log answers only the batches it lacks.
    """

    def pairs_of(batch: Sequence[Prompt], videos: list[list[DecodedVideo]]) -> _BatchPairs:
        rows, dropped = [], []
        for prompt, answers in zip(batch, answer([p.messages for p in batch], videos)):
            check = verifier_for(prompt) if verifier_for else get_verifier(prompt.label_type)
            unique = list(dict.fromkeys(a.strip() for a in answers if a.strip()))
            right = [a for a in unique if check(a, prompt.label)]
            wrong = [a for a in unique if a not in right]
            if not right or not wrong:
                dropped.append("all_wrong" if not right else "all_right")
                continue
            pairs = [(c, r) for c in right for r in wrong]
            drawn = random.Random(stable_seed(seed, prompt.id)).sample(pairs, min(max_pairs_per_prompt, len(pairs)))
            for number, (chosen, rejected) in enumerate(drawn):
                pair_id = f"{prompt.id}_verified_{number}"
                rows.append(preference_record(prompt, pair_id, chosen, rejected, video_root, label=prompt.label))
        return rows, dropped

    return _build_pairs(prompts, load_video, pairs_of, seed, batch_size, processes, log, processor)


def temporal_pairs(
    prompts: Sequence[Prompt],
    answer: Answerer,
    load_video: Callable[[str], DecodedVideo],
    perturbations: Sequence[tuple[str, int]],
    pair_filter: PairFilter | None = None,
    seed: int = 0,
    video_root: str | None = None,
    batch_size: int = 8,
    processes: Processes = Processes(),
    log: SampleLog | None = None,
    processor: VideoLLMProcessor | None = None,
) -> tuple[list[dict], BuildReport]:
    """Pairs from the model's answers on clean (chosen) and perturbed (rejected) videos, one per (prompt, perturbation).

    `answer` should be greedy (or low temperature): then a different answer is caused by the perturbation. Each kept
    pair records `perturbation`, `magnitude` and the differing phrases (`chosen_phrases`, `rejected_phrases`).
    Batch `b` is answered by process `b mod N` of `processes`, from its own seed; a question whose video does not
    decode, or (given the answering model's `processor`) whose prompt is over its `max_length`, is dropped and named in
    the report. With a `log`, each batch's outcome is written to it as it comes, and a rerun on the same log answers
    only the batches it lacks.
    """
    pair_filter = pair_filter or PairFilter()

    def pairs_of(batch: Sequence[Prompt], clean: list[list[DecodedVideo]]) -> _BatchPairs:
        rows, dropped = [], []
        messages = [p.messages for p in batch]
        chosen = [answers[0].strip() for answers in answer(messages, clean)]
        for kind, magnitude in perturbations:
            perturbed = [
                [perturb_video(v, kind, magnitude, seed=stable_seed(seed, p.id, kind, magnitude, j)) for j, v in enumerate(vs)]
                for p, vs in zip(batch, clean)
            ]
            rejected = [answers[0].strip() for answers in answer(messages, perturbed)]
            for prompt, good, bad in zip(batch, chosen, rejected):
                reason = pair_filter.reason(good, bad)
                if reason:
                    dropped.append(reason)
                    continue
                chosen_phrases, rejected_phrases = differing_phrases(good, bad)
                rows.append(
                    preference_record(
                        prompt, f"{prompt.id}_{kind}_{magnitude}", good, bad, video_root, perturbation=kind,
                        magnitude=magnitude, chosen_phrases=chosen_phrases, rejected_phrases=rejected_phrases,
                    )  # fmt: skip
                )
        return rows, dropped

    return _build_pairs(prompts, load_video, pairs_of, seed, batch_size, processes, log, processor)


def _build_pairs(
    prompts: Sequence[Prompt],
    load_video: Callable[[str], DecodedVideo],
    pairs_of: Callable[[Sequence[Prompt], list[list[DecodedVideo]]], _BatchPairs],
    seed: int,
    batch_size: int,
    processes: Processes,
    log: SampleLog | None,
    processor: VideoLLMProcessor | None,
) -> tuple[list[dict], BuildReport]:
    """What the builders share: prompts cut into batches, batch `b` answered by process `b mod N` after seeding torch
    with its own seed (so sampled answers are those one process draws), questions whose video does not decode or whose
    prompt is too long (with a `processor`) dropped and named instead of ending the run, and, with a `log`, each batch's outcome written as it comes, so that a rerun
    answers only the batches it lacks. Rows come in prompt order."""
    batches = list(enumerate(cut_into_batches(prompts, batch_size)))
    logged = {entry["batch"]: entry for entry in (log.rows if log else [])}
    for number, batch in batches:
        if number in logged and logged[number]["prompt_ids"] != [p.id for p in batch]:
            raise RunSettingsMismatch(
                f"{log.path}: batch {number} was cut from other questions ({logged[number]['prompt_ids'][:3]}... "
                f"against {[p.id for p in batch][:3]}...): the input changed since this build started; delete "
                f"{log.path} to start over"
            )

    def answer_batch(item: tuple[int, Sequence[Prompt]]) -> list[dict]:
        number, batch = item
        readable, unreadable = decode_each(batch, lambda prompt: prompt.videos, load_video)
        too_long = []
        if processor is not None:
            readable, too_long = set_apart_too_long(processor, readable, lambda prompt: prompt.messages)
        torch.manual_seed(stable_seed(seed, "batch", number))
        rows, dropped = pairs_of([p for p, _ in readable], [vs for _, vs in readable]) if readable else ([], [])
        return [{"batch": number, "prompt_ids": [p.id for p in batch], "rows": rows, "dropped": dropped,
                 "unreadable": [f"{prompt.id}: {error}" for prompt, error in unreadable],
                 "too_long": [f"{prompt.id}: {error}" for prompt, error in too_long]}]  # fmt: skip

    left = [(number, batch) for number, batch in batches if number not in logged]
    for entries in processes.map_batches(left, answer_batch):
        if log is not None:
            log.append(entries)
        logged.update((entry["batch"], entry) for entry in entries)
    rows, report = [], BuildReport()
    for number, _ in batches:
        entry = logged[number]
        rows.extend(entry["rows"])
        report.kept += len(entry["rows"])
        report.dropped.update(entry["dropped"])
        if entry["unreadable"]:
            report.dropped["unreadable_video"] += len(entry["unreadable"])
            report.unreadable.extend(entry["unreadable"])
        if entry.get("too_long"):  # absent from the logs of builds begun before prompts were checked
            report.dropped["prompt_too_long"] += len(entry["too_long"])
            report.too_long.extend(entry["too_long"])
    return rows, report


def curriculum_stages(rows: Sequence[dict], easy_first: bool = True) -> list[tuple[int, list[dict]]]:
    """Perturbation pairs grouped by magnitude: large (coarse, easy) first unless `easy_first` is False."""
    stages: dict[int, list[dict]] = {}
    for row in rows:
        stages.setdefault(int(row["magnitude"]), []).append(row)
    return sorted(stages.items(), key=lambda item: -item[0] if easy_first else item[0])


def write_curriculum(rows: Sequence[dict], output_dir: str | Path, easy_first: bool = True) -> list[Path]:
    """One JSONL file per stage (`stage_1_magnitude_8.jsonl`, ...), in training order; returns their paths."""
    paths = []
    for number, (magnitude, stage_rows) in enumerate(curriculum_stages(rows, easy_first), start=1):
        path = Path(output_dir) / f"stage_{number}_magnitude_{magnitude}.jsonl"
        write_jsonl(path, stage_rows)
        paths.append(path)
    return paths


def exclusive_class_verifiers(prompts: Sequence[Prompt], key: str = "type") -> Callable[[Prompt], Verifier]:
    """Class verifiers whose label space is every label seen for the prompt's `meta[key]` (e.g. the question type),
    so that an answer naming two classes fails (`RecordVerifiers`: the same verifiers STaR and evaluation use)."""
    return RecordVerifiers(prompts, group_key=key)


def model_answerer(
    model: torch.nn.Module, processor: VideoLLMProcessor, settings: GenerationSettings | None = None
) -> Answerer:
    """An `Answerer` that generates with a videollm model (greedy unless `settings` sample)."""
    from videollm.infer.generate import generate_answers

    def answer(conversations: Sequence[list[dict]], videos: Sequence[list[DecodedVideo]]) -> list[list[str]]:
        return generate_answers(model, processor, conversations, videos, settings)

    return answer
