"""Answering questions about videos and scoring the answers: the one evaluation loop of the evaluator
(`python -m videollm.eval`) and of self-training's per-cycle evaluations.

Each question is answered greedily (unless the settings sample) and checked by the run's `RecordVerifiers`, the same
verifiers STaR filtering and DPO pair mining use, so "correct" means one thing everywhere. A video that does not decode,
or a prompt over the processor's `max_length`, gives an error row instead of ending the evaluation. The summary counts
accuracy overall and by question type.
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from videollm.data.video import DecodedVideo, decode_each
from videollm.infer.generate import GenerationSettings, generate_answers, set_apart_too_long
from videollm.infer.processes import Processes, cut_into_batches, stable_seed

if TYPE_CHECKING:
    from videollm.data.processor import VideoLLMProcessor
    from videollm.selftrain.verifiers import RecordVerifiers, Verdict


@dataclass
class Question:
    """One evaluated question: the conversation to answer (ending with a user turn), its videos, and `target`, what
    the verifiers check the answer against (anything with `label`, `label_type` and `meta`, whose ``meta["type"]``
    groups the summary). `fields` go into its prediction row as they are (its reference answer, its label)."""

    id: str
    messages: list[dict]
    videos: list[str]
    target: Any
    fields: dict[str, Any] = field(default_factory=dict)


def shuffled(video: DecodedVideo, rng: random.Random) -> DecodedVideo:
    """The same frames in a random order that differs from the original (when there are 2+ distinct frames); the
    timestamps stay sorted, so a prompt that states them does not give the order away."""
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


def score_answers(
    model_loader: Callable[[], torch.nn.Module],
    processor: VideoLLMProcessor,
    questions: Sequence[Question],
    verifiers: RecordVerifiers,
    settings: GenerationSettings,
    batch_size: int = 16,
    load_video: Callable[[str], DecodedVideo] | None = None,
    shuffle_frames: bool = False,
    seed: int = 0,
    processes: Processes = Processes(),
) -> tuple[dict, list[dict]]:
    """Answer every question and check each answer; returns (summary, one prediction row per question, in order).

    `model_loader` gives the model, and is called once, by a process with questions to answer (a process left
    without a batch of a small evaluation set loads nothing). `load_video` reads a video (default: the processor's
    decoder; `FeatureCache.get` in a run with a feature cache). `shuffle_frames` permutes each question's frames,
    seeded by `seed` and the question id (a temporal control: a model that uses frame order loses accuracy on temporal
    questions). On several `processes`, each answers its share of the batches and every process returns all rows.
    """
    load_video = load_video or processor.load_video
    model = functools.cache(model_loader)

    def answer(batch: Sequence[Question]) -> list[dict]:
        readable, unreadable = decode_each(batch, lambda question: question.videos, load_video)
        readable, too_long = set_apart_too_long(processor, readable, lambda question: question.messages)
        rows = {id(question): _row(question, error=str(error)) for question, error in [*unreadable, *too_long]}
        if shuffle_frames:  # one generator per question, seeded by its id, drawn in turn by its videos
            rngs = [random.Random(stable_seed(seed, question.id)) for question, _ in readable]
            readable = [(question, [shuffled(v, rng) for v in videos]) for (question, videos), rng in zip(readable, rngs)]
        if readable:
            messages, videos = [q.messages for q, _ in readable], [vs for _, vs in readable]
            answers = generate_answers(model(), processor, messages, videos, settings)
            for (question, decoded), (text, *_) in zip(readable, answers):
                rows[id(question)] = _row(question, text, verifiers.check(question.target, text), decoded)
        return [rows[id(question)] for question in batch]  # question order, error rows in their place

    batches = cut_into_batches(questions, batch_size)
    predictions = []
    with tqdm(total=len(questions), desc="evaluating", unit="sample", disable=not processes.is_main) as progress:
        for rows in processes.map_batches(batches, answer):  # one row per question
            predictions.extend(rows)
            progress.update(len(rows))
    return summarize(predictions), predictions


def _row(
    question: Question, answer: str | None = None, verdict: Verdict | None = None,
    decoded: Sequence[DecodedVideo] = (), error: str | None = None,
) -> dict:  # fmt: skip
    """A prediction row: a wrong answer keeps its verdict's partial score and reason; an unreadable video, its error."""
    return {
        "id": question.id, "type": question.target.meta.get("type", "all"), "prediction": answer, **question.fields,
        "correct": bool(verdict), "score": verdict.score if verdict is not None else 0.0,
        "reason": verdict.reason if verdict is not None else None,
        "frame_indices": [list(video.indices) for video in decoded], "error": error,
    }  # fmt: skip


def summarize(predictions: Sequence[dict]) -> dict:
    """Accuracy overall and by question type, and how many questions could not be answered (unreadable video, prompt
    too long). Types are named as text (a record's `"type": null` counts as "all", a number as its digits), so a dataset
    that mixes them is summarised, not stopped by sorting after every answer is in."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    for prediction in predictions:
        kind = prediction["type"]
        by_type["all" if kind is None else str(kind)].append(prediction["correct"])
    total = sum(p["correct"] for p in predictions)
    return {
        "accuracy": total / len(predictions) if predictions else 0.0,
        "num_samples": len(predictions),
        "num_errors": sum(p["error"] is not None for p in predictions),
        "by_type": {
            t: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v)} for t, v in sorted(by_type.items())
        },
    }
