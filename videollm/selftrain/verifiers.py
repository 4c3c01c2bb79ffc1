"""Verifiers: does a free-form answer agree with a dataset label? (Video-STaR's filters)

One verifier per `label_type` of labelled records (`videollm.data.formats.load_labelled`):

- ``class``: the label appears in the answer as a whole phrase (case and punctuation ignored) and, when the label
  space is known, no other class does ("left or right" is not an answer).
- ``time_range``: the first two numbers of the answer form an interval with IoU > 0.5 against ``[start, end]``.
- ``box``: the first four numbers form a box ``[x1, y1, x2, y2]`` with IoU > 0.5.
- ``number``: the first number is within 10% relative error.

Sentence labels (Video-STaR's embedding similarity) need an embedding model and are not built in: pass any
`Callable[[str, Any], bool]` where a verifier is expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from videollm.eval.scoring import normalize_answer

Verifier = Callable[[str, Any], bool]
_NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?")


def numbers(text: str) -> list[float]:
    """Every number written in `text`, in order."""
    return [float(match) for match in _NUMBER.findall(text)]


class ClassVerifier:
    """The label is named in the answer, and no other class of `classes` is."""

    def __init__(self, classes: Sequence[str] | None = None, aliases: dict[str, str] | None = None):
        self.classes = [normalize_answer(c) for c in classes] if classes else None
        self.aliases = {normalize_answer(k): normalize_answer(v) for k, v in (aliases or {}).items()}

    def _words(self, answer: str) -> str:
        words = f" {normalize_answer(answer)} "
        for alias, target in self.aliases.items():
            words = words.replace(f" {alias} ", f" {target} ")
        return words

    def __call__(self, answer: str, label: Any) -> bool:
        target = normalize_answer(str(label))
        target = self.aliases.get(target, target)
        words = self._words(answer)
        if self.classes is None:
            return f" {target} " in words
        return {c for c in self.classes if f" {c} " in words} == {target}


def interval_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two 1-D intervals [start, end]."""
    (a0, a1), (b0, b1) = sorted(a), sorted(b)
    intersection = max(0.0, min(a1, b1) - max(a0, b0))
    union = (a1 - a0) + (b1 - b0) - intersection
    return intersection / union if union > 0 else float(a0 == b0 and a1 == b1)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes [x1, y1, x2, y2]."""
    ax0, ax1 = sorted(a[0::2])
    ay0, ay1 = sorted(a[1::2])
    bx0, bx1 = sorted(b[0::2])
    by0, by1 = sorted(b[1::2])
    width = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    height = max(0.0, min(ay1, by1) - max(ay0, by0))
    intersection = width * height
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - intersection
    return intersection / union if union > 0 else 0.0


def time_range_verifier(answer: str, label: Sequence[float], threshold: float = 0.5) -> bool:
    found = numbers(answer)
    return len(found) >= 2 and interval_iou(found[:2], [float(x) for x in label]) > threshold


def box_verifier(answer: str, label: Sequence[float], threshold: float = 0.5) -> bool:
    found = numbers(answer)
    return len(found) >= 4 and box_iou(found[:4], [float(x) for x in label]) > threshold


def number_verifier(answer: str, label: float, tolerance: float = 0.1) -> bool:
    found = numbers(answer)
    if not found:
        return False
    label = float(label)
    return abs(found[0] - label) <= tolerance * abs(label) if label else found[0] == 0.0


VERIFIERS: dict[str, Verifier] = {
    "class": ClassVerifier(),
    "time_range": time_range_verifier,
    "box": box_verifier,
    "number": number_verifier,
}


def get_verifier(label_type: str | None, classes: Sequence[str] | None = None) -> Verifier:
    """The verifier of a label type (``None`` means ``class``); `classes` makes the class check exclusive."""
    label_type = label_type or "class"
    if label_type == "class" and classes:
        return ClassVerifier(classes)
    if label_type not in VERIFIERS:
        raise ValueError(f"label_type {label_type!r} has no verifier; known: {', '.join(VERIFIERS)} (or pass your own callable)")
    return VERIFIERS[label_type]
