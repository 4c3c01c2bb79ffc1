"""Verifiers: does a free-form answer agree with a dataset label? (Video-STaR's filters)

One interface for every label type: ``verifier(answer, label) -> Verdict``. A `Verdict` is true when the answer is
right, and carries a score in [0, 1] (IoU, closeness of a number, 1/0 for classes) that ranks answers, and a reason
when it is false. The same object filters answers in a STaR cycle, ranks samples into DPO pairs, and scores an
evaluation, so the three can never disagree on what "right" means.

Built in (``label_type`` of labelled records, `videollm.data.formats.load_labelled`):

- ``class`` (`ClassVerifier`): the label, or one of its synonyms, appears in the answer as whole words ("right" is
  not in "bright"), not negated in its clause ("not left", "isn't moving left", "neither left nor right"), and, when
  the label space is known, no other class is asserted ("left or right" is not an answer). The negation rule errs on
  the side of rejecting: "no doubt it goes left" is rejected too, as a filter that keeps a wrong answer for training
  costs more than one that drops a right one.
- ``choice`` (`ChoiceVerifier`): multiple choice; the label is a letter ("B"), an option text ("right") or both
  ("B. right"). The answer may give the letter, the option text or both; a letter and a text that name different
  options, or two options, are wrong.
- ``number`` (`NumberVerifier`): the first number of the answer (digits, or words up to twenty) is within a relative
  tolerance of the label (10%, inclusive).
- ``time_range`` (`TimeSpanVerifier`): the first two numbers (seconds, or m:ss) form an interval whose IoU with
  ``[start, end]`` exceeds a threshold (0.5, strict, as in Video-STaR).
- ``box`` (`BoxVerifier`): the first four numbers form a box ``[x1, y1, x2, y2]`` with IoU above a threshold (0.5).
- any Python callable by dotted path (`CallableVerifier`, ``"package.module:function"``), e.g. an embedding
  similarity for sentence labels. It may return a bool, a score (true at >= its threshold) or a `Verdict`.

Specs name a verifier and its settings in one string, for configs and per-record ``label_type``:
``"number:tolerance=0.05"``, ``"time_range:threshold=0.3"``, ``"my_pkg.checks:same_meaning"``.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: `correct` (also the truth value), a `score` in [0, 1], and why it failed."""

    correct: bool
    score: float
    reason: str = ""

    def __bool__(self) -> bool:
        return self.correct

    def to_dict(self) -> dict[str, Any]:
        return {"correct": self.correct, "score": self.score, "reason": self.reason}


RIGHT = Verdict(True, 1.0)


def wrong(reason: str, score: float = 0.0) -> Verdict:
    """A failed `Verdict` that says why (and keeps a partial score, e.g. an IoU under the threshold)."""
    return Verdict(False, score, reason)


class Verifier(Protocol):
    """``verifier(answer, label) -> Verdict``: every verifier of this module, and any callable wrapped in
    `CallableVerifier`, has this form."""

    def __call__(self, answer: str, label: Any) -> Verdict: ...


# ---- text helpers ----------------------------------------------------------------------------------------------------

_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: the form every comparison of answer text uses."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


# A negation cue negates the class words after it in the same clause: "not left", "it does not move left".
NEGATION_CUES = frozenset({"not", "no", "never", "neither", "nor", "without", "nothing", "none"})
_CONTRACTION = re.compile(r"(?:(?<=\w)n['’]t\b|\bcannot\b)", re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"[.;:!?,\n]+|\s(?:but|however|instead|rather|whereas)\s", re.IGNORECASE)


def clauses(text: str) -> list[list[str]]:
    """The answer as clauses of normalised words; a clause ends at punctuation or a contrast ("but", "instead")."""
    text = _CONTRACTION.sub(lambda m: " not" if m.group().lower() != "cannot" else "can not", text)
    return [words for part in _CLAUSE_BREAK.split(f" {text} ") if (words := normalize_answer(part).split())]


def _find(words: list[str], phrase: list[str]) -> list[int]:
    """Start positions of `phrase` as whole words in `words`."""
    n = len(phrase)
    return [i for i in range(len(words) - n + 1) if words[i : i + n] == phrase]


def mentions(text: str, phrases: Iterable[str]) -> tuple[bool, bool]:
    """(asserted, negated): does any phrase occur as whole words outside / inside a negated clause span."""
    targets = [p for p in (normalize_answer(p).split() for p in phrases) if p]
    asserted = negated = False
    for words in clauses(text):
        cues = [i for i, word in enumerate(words) if word in NEGATION_CUES]
        for phrase in targets:
            for start in _find(words, phrase):
                if any(cue < start for cue in cues):
                    negated = True
                else:
                    asserted = True
    return asserted, negated


# ---- classes -----------------------------------------------------------------------------------------------------------


class ClassVerifier:
    """The label is asserted in the answer (whole words, synonyms count) and not negated; no other class is asserted.

    Args:
        classes: the label space. Without it only the label itself is checked ("left and right" passes for "left").
        synonyms: label -> other ways to say it, e.g. ``{"up": ["upwards", "upward"]}``.
        aliases: alias -> label, the inverse form of `synonyms` (kept for existing callers).
    """

    def __init__(
        self,
        classes: Sequence[str] | None = None,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        aliases: Mapping[str, str] | None = None,
    ):
        self.classes = [normalize_answer(c) for c in classes] if classes else None
        self.synonyms: dict[str, list[str]] = {}
        for label, others in (synonyms or {}).items():
            self.synonyms.setdefault(normalize_answer(label), []).extend(normalize_answer(o) for o in others)
        for alias, label in (aliases or {}).items():
            self.synonyms.setdefault(normalize_answer(label), []).append(normalize_answer(alias))

    def phrases(self, label: str) -> list[str]:
        label = normalize_answer(label)
        return [label, *self.synonyms.get(label, [])]

    def __call__(self, answer: str, label: Any) -> Verdict:
        target = normalize_answer(str(label))
        asserted, negated = mentions(answer, self.phrases(target))
        if not asserted:
            return wrong("negated" if negated else "label not named")
        if self.classes is not None:
            others = [c for c in self.classes if c != target and mentions(answer, self.phrases(c))[0]]
            if others:
                return wrong(f"also names {', '.join(others)}")
        return RIGHT

    def __repr__(self) -> str:
        return f"ClassVerifier(classes={self.classes}, synonyms={self.synonyms})"


# ---- multiple choice ---------------------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJ"
# "B", "B.", "b)", "B:", "(b)" at the start; "B right" too, but not "A ..." or "I ...", which start English sentences.
# Markdown emphasis around the letter ("**B**", "**B.** right") is read through.
_LEADING_LETTER = re.compile(r"^[\s*_]*(?:\(([A-Ja-j])\)|([A-Ja-j])[*_]*(?:[.):]|\s*$)|([B-HJ])[*_]*(?=\s))")
_STATED_LETTER = re.compile(
    r"\b(?i:option|choice)\s*\(?([A-Ja-j])\)?(?!\w)"  # "option b"
    # "answer: (c)", "the answer is B.", "the answer is: B", "the correct option is C because ...", "answer is **D**"
    r"|\b(?i:answer|option|choice)\s*(?:(?i:is)\s*:?|:)?\s*[*_]*"
    r"(?:\(([A-Ja-j])\)|([A-J])(?=[*_]*(?:\s*$|[.),;:]))|([B-HJ])(?=[*_]*\s))"
)


def split_letter(answer: str) -> tuple[str | None, str]:
    """(the option letter an answer gives, the rest of it): "B. right" -> ("B", "right"), "(c)" -> ("C", ""),
    "The answer is B" -> ("B", "The answer is B"), "A circle" -> (None, "A circle")."""
    match = _LEADING_LETTER.match(answer)
    if match:
        return next(g for g in match.groups() if g).upper(), answer[match.end() :].strip()
    match = _STATED_LETTER.search(answer)
    return (next(g for g in match.groups() if g).upper() if match else None), answer


class ChoiceVerifier:
    """Multiple choice: the right letter, the right option text, or both, consistently.

    Args:
        choices: the option texts in letter order (A, B, ...). With them a letter maps to its text and back, and an
            answer whose letter and text name different options, or whose text names two options, is wrong. Without
            them a letter is compared with a letter and a text with a text.
        synonyms: option text -> other ways to say it (as for `ClassVerifier`).
    """

    def __init__(self, choices: Sequence[str] | None = None, synonyms: Mapping[str, Sequence[str]] | None = None):
        self.choices = [normalize_answer(c) for c in choices] if choices else None
        self.texts = ClassVerifier(self.choices, synonyms)

    def _option(self, letter: str) -> str | None:
        index = _LETTERS.index(letter)
        return self.choices[index] if self.choices and index < len(self.choices) else None

    def _label(self, label: Any) -> tuple[str | None, str | None]:
        """(letter, option text) of a label given as "B", "right" or "B. right"."""
        letter, rest = split_letter(str(label))
        text = normalize_answer(rest if letter else str(label)) or None
        if letter and text is None:
            text = self._option(letter)
        if letter is None and self.choices and text in self.choices:
            letter = _LETTERS[self.choices.index(text)]
        return letter, text

    def __call__(self, answer: str, label: Any) -> Verdict:
        letter, text = self._label(label)
        given, body = split_letter(answer)
        if given is None:
            return self.texts(answer, text) if text else wrong("no option letter given")
        if self.choices is not None and self._option(given) is None:
            return wrong(f"no option {given}")
        if letter is not None and given != letter:
            return wrong(f"letter {given}, expected {letter}")
        if self.choices is not None:
            named = [c for c in self.choices if mentions(body, self.texts.phrases(c))[0]]
            if named and named != [self._option(given)]:
                return wrong(f"letter {given} but the text names {', '.join(named)}")
            return RIGHT
        if letter is None:  # a text label and no options: only the text can be checked
            return self.texts(body, text) if body else wrong("a letter, but no options to map it to the label")
        if text is not None and body and not mentions(body, self.texts.phrases(text))[0]:
            return wrong(f"letter {given} with a text other than {text!r}")
        return RIGHT


# ---- numbers, spans, boxes ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?:(?<![\w.])[-+])?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+)(?:[eE][-+]?\d+)?")
_CLOCK = re.compile(r"(?<![\d.:])(\d+):([0-5]\d)(?::([0-5]\d))?(\.\d+)?(?![\d:])")
_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)


def numbers(text: str, clock: bool = False, words: bool = False) -> list[float]:
    """Every number written in `text`, in order; `clock` reads "1:05" as 65 (seconds), `words` reads "three" as 3."""
    found: list[tuple[int, float]] = []
    taken: list[tuple[int, int]] = []
    if clock:
        for m in _CLOCK.finditer(text):
            parts = [int(m.group(1)), int(m.group(2))] + ([int(m.group(3))] if m.group(3) else [])
            seconds = sum(p * 60**i for i, p in enumerate(reversed(parts))) + float(m.group(4) or 0)
            found.append((m.start(), float(seconds)))
            taken.append(m.span())
    for m in _NUMBER.finditer(text):
        if not any(a <= m.start() < b for a, b in taken):
            found.append((m.start(), float(m.group().replace(",", ""))))
    if words:
        found.extend((m.start(), float(_NUMBER_WORDS[m.group().lower()])) for m in _NUMBER_WORD.finditer(text))
    return [value for _, value in sorted(found, key=lambda item: item[0])]


class NumberVerifier:
    """The first number of the answer is within `tolerance` relative error of the label (bound included).

    A label of 0 has no relative scale: `absolute_tolerance` (default 0) applies instead. Score: 1 - relative error,
    floored at 0.
    """

    def __init__(self, tolerance: float = 0.1, absolute_tolerance: float = 0.0):
        if tolerance < 0 or absolute_tolerance < 0:
            raise ValueError("number verifier: tolerances must be >= 0")
        self.tolerance = float(tolerance)
        self.absolute_tolerance = float(absolute_tolerance)

    def __call__(self, answer: str, label: Any) -> Verdict:
        found = numbers(answer, words=True)
        if not found:
            return wrong("no number")
        value, target = found[0], float(label)
        error = abs(value - target)
        # relative bound with a little slack for binary floats: 10% of 10 must admit 11.0
        bound = max(self.tolerance * abs(target), self.absolute_tolerance) * (1 + 1e-9)
        score = max(0.0, 1.0 - error / abs(target)) if target else float(error <= bound)
        if error <= bound:
            return Verdict(True, score)
        return wrong(f"{value:g} is {error:g} from {target:g}", score)


def interval_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two 1-D intervals [start, end] (either order)."""
    (a0, a1), (b0, b1) = sorted(a), sorted(b)
    intersection = max(0.0, min(a1, b1) - max(a0, b0))
    union = (a1 - a0) + (b1 - b0) - intersection
    return intersection / union if union > 0 else float(a0 == b0 and a1 == b1)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes [x1, y1, x2, y2] (corners in either order)."""
    ax0, ax1 = sorted(a[0::2])
    ay0, ay1 = sorted(a[1::2])
    bx0, bx1 = sorted(b[0::2])
    by0, by1 = sorted(b[1::2])
    width = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    height = max(0.0, min(ay1, by1) - max(ay0, by0))
    intersection = width * height
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - intersection
    return intersection / union if union > 0 else 0.0


class _IoUVerifier:
    size = 0
    iou: Callable[[Sequence[float], Sequence[float]], float]
    clock = False

    def __init__(self, threshold: float = 0.5):
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"IoU threshold must be in [0, 1), got {threshold}")
        self.threshold = float(threshold)

    def __call__(self, answer: str, label: Any) -> Verdict:
        found = numbers(answer, clock=self.clock)
        target = _label_numbers(label, self.size, self.clock)
        if len(found) < self.size:
            return wrong(f"needs {self.size} numbers, found {len(found)}")
        iou = type(self).iou(found[: self.size], target)
        # strictly above the threshold, as Video-STaR's "IoU > 0.5"
        return Verdict(True, iou) if iou > self.threshold else wrong(f"IoU {iou:.2f} <= {self.threshold:g}", iou)


class TimeSpanVerifier(_IoUVerifier):
    """The first two numbers of the answer (seconds, or m:ss / h:mm:ss) span an interval with IoU > `threshold`."""

    size, iou, clock = 2, staticmethod(interval_iou), True


class BoxVerifier(_IoUVerifier):
    """The first four numbers of the answer form a box [x1, y1, x2, y2] with IoU > `threshold`."""

    size, iou = 4, staticmethod(box_iou)


def _label_numbers(label: Any, size: int, clock: bool) -> list[float]:
    values = numbers(label, clock=clock) if isinstance(label, str) else [float(x) for x in label]
    if len(values) != size:
        raise ValueError(f"label {label!r}: expected {size} numbers")
    return values


# ---- callables ---------------------------------------------------------------------------------------------------------


def import_object(path: str) -> Any:
    """``"package.module:name"`` or ``"package.module.name"`` -> the object."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"{path!r} is not a dotted path such as 'package.module:function'")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"verifier {path!r}: cannot import {module_name!r} ({error})") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"verifier {path!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


class CallableVerifier:
    """Any ``fn(answer, label, **kwargs)`` returning a bool, a score in [0, 1] or a `Verdict`.

    A score counts as right at or above `threshold`. `fn` may be the callable itself or its dotted path.
    """

    def __init__(self, fn: Callable[..., Any] | str, threshold: float = 0.5, **kwargs: Any):
        self.name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.fn = import_object(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise ValueError(f"verifier {self.name!r} is not callable")
        self.threshold = threshold
        self.kwargs = kwargs

    def __call__(self, answer: str, label: Any) -> Verdict:
        result = self.fn(answer, label, **self.kwargs)
        if isinstance(result, Verdict):
            return result
        if isinstance(result, bool):
            return RIGHT if result else wrong(f"{self.name} returned False")
        if isinstance(result, (int, float)) and math.isfinite(result):
            score = float(result)
            return Verdict(True, score) if score >= self.threshold else wrong(f"score {score:.3g} < {self.threshold}", score)
        raise TypeError(f"verifier {self.name} returned {type(result).__name__}; expected bool, a number or a Verdict")


# ---- registry and specs ------------------------------------------------------------------------------------------------

VERIFIER_TYPES: dict[str, type] = {
    "class": ClassVerifier,
    "choice": ChoiceVerifier,
    "multiple_choice": ChoiceVerifier,
    "number": NumberVerifier,
    "time_range": TimeSpanVerifier,
    "time_span": TimeSpanVerifier,
    "box": BoxVerifier,
}

# Default-settings instances, one per label type (existing callers index this dict).
VERIFIERS: dict[str, Verifier] = {name: cls() for name, cls in VERIFIER_TYPES.items()}


def time_range_verifier(answer: str, label: Sequence[float], threshold: float = 0.5) -> Verdict:
    """`TimeSpanVerifier(threshold)(answer, label)`, as a function."""
    return TimeSpanVerifier(threshold)(answer, label)


def box_verifier(answer: str, label: Sequence[float], threshold: float = 0.5) -> Verdict:
    """`BoxVerifier(threshold)(answer, label)`, as a function."""
    return BoxVerifier(threshold)(answer, label)


def number_verifier(answer: str, label: float, tolerance: float = 0.1) -> Verdict:
    """`NumberVerifier(tolerance)(answer, label)`, as a function."""
    return NumberVerifier(tolerance)(answer, label)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"number:tolerance=0.05"`` -> ("number", {"tolerance": 0.05}); ``"pkg.mod:fn"`` -> ("pkg.mod:fn", {})."""
    name, _, rest = spec.partition(":")
    if name not in VERIFIER_TYPES:
        return spec, {}
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"verifier spec {spec!r}: {item!r} is not key=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return name, options


def build_verifier(spec: str, **defaults: Any) -> Verifier:
    """A verifier from a spec: a label type with optional settings, or a dotted path to a callable.

    `defaults` (e.g. ``classes``, ``synonyms``, ``choices``) go to the verifier types that take them.
    """
    name, options = parse_spec(spec)
    if name not in VERIFIER_TYPES:
        if "." not in name and ":" not in name:
            raise ValueError(
                f"label_type {name!r} has no verifier; known: {', '.join(VERIFIER_TYPES)} "
                "(or pass your own callable, e.g. 'my_package.checks:same_meaning')"
            )
        return CallableVerifier(name, **options)
    cls = VERIFIER_TYPES[name]
    accepted = {
        ClassVerifier: ("classes", "synonyms", "aliases"),
        ChoiceVerifier: ("choices", "synonyms"),
    }.get(cls, ())
    kwargs = {k: v for k, v in defaults.items() if k in accepted and v is not None}
    try:
        return cls(**{**kwargs, **options})
    except TypeError as error:
        raise ValueError(f"verifier spec {spec!r}: {error}") from error


def get_verifier(label_type: str | None, classes: Sequence[str] | None = None) -> Verifier:
    """The verifier of a label type or spec (``None`` means ``class``); `classes` makes the class check exclusive."""
    label_type = label_type or "class"
    if label_type in VERIFIERS and not (classes and VERIFIER_TYPES[label_type] is ClassVerifier):
        return VERIFIERS[label_type]
    return build_verifier(label_type, classes=classes)


class RecordVerifiers:
    """The verifier of each labelled record, built once: the one object a run uses to filter, rank and score.

    - a record's ``label_type`` (or `spec`, which overrides every record's) picks the verifier;
    - class labels are exclusive within their group: every label seen among the records with the same
      ``meta[group_key]`` (e.g. the question type) is a class, so an answer naming two of them fails;
    - multiple-choice records carry their options in ``meta["choices"]``;
    - `synonyms` (label -> other phrasings) apply to class and choice labels;
    - a class record's ``reference`` answer text, when it has one and it differs from the label, is one more way of
      saying that label in its group: a dataset labelled "down" whose answers read "downwards" scores "downwards"
      right without a hand-written synonym list.
    """

    def __init__(
        self,
        records: Sequence[Any],
        spec: str | None = None,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        group_key: str = "type",
    ):
        self.spec = spec
        self.synonyms = dict(synonyms or {})
        self.group_key = group_key
        spaces: dict[Any, set[str]] = {}
        phrasings: dict[Any, dict[str, set[str]]] = {}
        for record in records:
            if self._type(record) == "class":
                group, label = self._group(record), str(record.label)
                spaces.setdefault(group, set()).add(label)
                reference = getattr(record, "reference", None)
                if reference and normalize_answer(reference) != normalize_answer(label):
                    phrasings.setdefault(group, {}).setdefault(label, set()).add(reference)
        self._class = {
            group: ClassVerifier(sorted(labels), self._with_phrasings(phrasings.get(group, {})))
            for group, labels in spaces.items()
        }
        self._cache: dict[Any, Verifier] = {}

    def _with_phrasings(self, phrasings: Mapping[str, set[str]]) -> dict[str, list[str]]:
        merged = {label: list(others) for label, others in self.synonyms.items()}
        for label, texts in phrasings.items():
            merged.setdefault(label, []).extend(sorted(texts))
        return merged

    def _type(self, record: Any) -> str:
        return parse_spec(self.spec or getattr(record, "label_type", None) or "class")[0]

    def _group(self, record: Any) -> Any:
        return (getattr(record, "meta", None) or {}).get(self.group_key)

    def __call__(self, record: Any) -> Verifier:
        """The verifier for one record (anything with ``label``, ``label_type`` and ``meta``, e.g. a `Prompt`)."""
        kind = self._type(record)
        meta = getattr(record, "meta", None) or {}
        if kind == "class" and self.spec in (None, "class") and self._group(record) in self._class:
            return self._class[self._group(record)]
        choices = tuple(meta.get("choices") or ()) if VERIFIER_TYPES.get(kind) is ChoiceVerifier else ()
        key = (self.spec or getattr(record, "label_type", None) or "class", choices)
        if key not in self._cache:
            self._cache[key] = build_verifier(key[0], synonyms=self.synonyms or None, choices=list(choices) or None)
        return self._cache[key]

    def check(self, record: Any, answer: str) -> Verdict:
        """`answer` checked against `record.label` with the record's verifier."""
        return self(record)(answer, record.label)
