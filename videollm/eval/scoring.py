"""Scoring short answers and multiple-choice answers against a reference."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
_LETTER = re.compile(r"^\(?([A-Za-z])\)?(?:[.):]\s*|\s+|$)")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def split_choice(text: str) -> tuple[str | None, str]:
    """'B. right' -> ('b', 'right'); 'right' -> (None, 'right')."""
    match = _LETTER.match(text.strip())
    if match and (len(text.strip()) == 1 or match.end() > 1):
        return match.group(1).lower(), normalize_answer(text.strip()[match.end() :])
    return None, normalize_answer(text)


def is_correct(prediction: str, reference: str, choices: Sequence[str] | None = None) -> bool:
    """Exact match after normalisation; for multiple choice, the right letter or the right option text."""
    if normalize_answer(prediction) == normalize_answer(reference):
        return True
    if not choices:
        return False
    ref_letter, ref_text = split_choice(reference)
    pred_letter, pred_text = split_choice(prediction)
    if pred_letter is not None and ref_letter is not None and pred_letter == ref_letter:
        return True
    option_texts = {normalize_answer(c) for c in choices} | {split_choice(c)[1] for c in choices}
    return bool(pred_text) and pred_text in option_texts and pred_text == ref_text
