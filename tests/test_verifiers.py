"""Verifiers (videollm.selftrain.verifiers): one interface, (answer, label) -> Verdict, for every label type."""

from __future__ import annotations

import pytest

from videollm.data.formats import LabelledRecord
from videollm.selftrain.verifiers import (
    BoxVerifier,
    CallableVerifier,
    ChoiceVerifier,
    ClassVerifier,
    NumberVerifier,
    RecordVerifiers,
    TimeSpanVerifier,
    Verdict,
    build_verifier,
    get_verifier,
    numbers,
    parse_spec,
    split_letter,
)

DIRECTIONS = ["left", "right", "up", "down"]


# ---- the interface ----------------------------------------------------------------------------------------------------


def test_a_verdict_is_true_when_right_and_carries_a_score_and_a_reason():
    right = ClassVerifier()("it moves left", "left")
    failed = ClassVerifier()("it moves right", "left")
    assert isinstance(right, Verdict) and right and right.score == 1.0
    assert not failed and failed.score == 0.0 and failed.reason == "label not named"
    assert failed.to_dict() == {"correct": False, "score": 0.0, "reason": "label not named"}


# ---- classes ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        ("It moves LEFT.", "left", True),
        ("left", "left", True),
        ("The shape is moving to the left side", "left", True),
        ("leftover paint", "left", False),  # the label inside another word
        ("a bright circle", "right", False),
        ("upward", "up", False),  # not a synonym unless given
        ("it is bored", "red", False),
        ("Not left.", "left", False),  # negation
        ("it is not moving left", "left", False),
        ("It isn't going left", "left", False),
        ("it doesn't move left, it moves right", "right", True),  # the negation stays in its clause
        ("it doesn't move left, it moves right", "left", False),
        ("it does not go left but right", "right", True),
        ("neither left nor right", "right", False),
        ("no idea", "left", False),
        ("", "left", False),
        ("turns left then stops", "turns left", True),  # multi-word labels match as a phrase
        ("left turns", "turns left", False),
    ],
)
def test_class_label_as_whole_words_and_not_negated(answer, label, expected):
    assert bool(ClassVerifier()(answer, label)) is expected


def test_class_label_space_makes_the_check_exclusive():
    exclusive = ClassVerifier(DIRECTIONS)
    assert exclusive("It moves left.", "left")
    verdict = exclusive("left or right", "left")
    assert not verdict and verdict.reason == "also names right"
    assert exclusive("not right but left", "left")  # a negated class is not named
    assert not exclusive("up", "left")
    assert ClassVerifier()("left or right", "left")  # without the label space only the label is checked


def test_class_synonyms_count_as_the_label_and_as_other_classes():
    verifier = ClassVerifier(DIRECTIONS, synonyms={"up": ["upwards", "upward"], "down": ["downwards"]})
    assert verifier("it moves upwards", "up")
    assert not verifier("not upwards", "up")
    assert not verifier("upwards then downwards", "up")  # a synonym of another class names it
    assert ClassVerifier(aliases={"upwards": "up"})("upwards", "up")  # the inverse form kept for existing callers


# ---- multiple choice --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        ("B", "B", True),
        ("B.", "B", True),
        ("(b)", "B", True),
        ("b) right", "B", True),
        ("B. right", "B. right", True),
        ("The answer is B.", "B", True),
        ("option b", "B", True),
        ("right", "B", True),  # option text for a letter label
        ("B", "right", True),  # letter for an option text label
        ("It moves right", "B. right", True),
        ("A", "B", False),
        ("A. right", "B", False),  # the letter of another option, even with the right text
        ("B. left", "B", False),  # the right letter with another option's text
        ("left", "B", False),
        ("left or right", "B", False),
        ("not right", "B", False),
        ("E", "B", False),  # no such option
        ("A circle", "A", False),  # "A" starting a sentence is not a letter
        # letters as models write them: markdown, "is:", "option is", a reason after the letter
        ("**B**", "B", True),
        ("The answer is: B", "B", True),
        ("The correct option is B.", "B", True),
        ("The answer is B because the man walks right.", "B", True),
        # ... where the stated letter is wrong, a text naming the right option does not rescue it
        ("The answer is C because the man walks right.", "B", False),
        ("The correct option is C, since he walks right.", "B", False),
        ("The answer is: C. He walks right", "B", False),
        ("**C**. He walks right.", "B", False),
        ("The best option is a left turn", "A", True),  # "is a" is an article, not option A
    ],
)
def test_choice_letter_or_option_text(answer, label, expected):
    verifier = ChoiceVerifier(["left", "right", "up", "down"])
    assert bool(verifier(answer, label)) is expected


def test_choice_without_options_compares_letters_with_letters_and_texts_with_texts():
    verifier = ChoiceVerifier()
    assert verifier("B", "B. right") and verifier("B. right", "B. right") and verifier("right", "B. right")
    assert not verifier("C", "B. right") and not verifier("B. left", "B. right")
    assert not verifier("B", "right")  # a letter cannot be mapped without the options
    assert verifier("D) right", "right")  # ... but its text can be checked


def test_letters_are_read_from_the_start_or_from_a_stated_answer():
    assert split_letter("C) up") == ("C", "up")
    assert split_letter("D going down") == ("D", "going down")
    assert split_letter("I think it is up") == (None, "I think it is up")
    assert split_letter("My answer: (c)") == ("C", "My answer: (c)")
    assert split_letter("The answer is a red circle") == (None, "The answer is a red circle")


# ---- numbers ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        ("about 10.5 people", 10, True),
        ("11", 10, True),  # 10% relative error: the bound is included
        ("9", 10, True),
        ("11.01", 10, False),
        ("8.99", 10, False),
        ("12", 10, False),
        ("three people", 3, True),
        ("1,000 birds", 1000, True),
        ("-5 degrees", -5, True),
        ("5 degrees", -5, False),
        ("0", 0, True),
        ("0.01", 0, False),
        ("no number here", 3, False),
        ("3 people, 20 cars", 20, False),  # the first number is the answer
    ],
)
def test_number_within_relative_tolerance(answer, label, expected):
    assert bool(NumberVerifier()(answer, label)) is expected


def test_number_tolerance_settings_and_score():
    assert NumberVerifier(tolerance=0.05)("10.5", 10) and not NumberVerifier(tolerance=0.04)("10.5", 10)
    assert NumberVerifier(absolute_tolerance=0.1)("0.05", 0)
    assert NumberVerifier()("9.5", 10).score == pytest.approx(0.95)
    assert not NumberVerifier()("15", 10) and NumberVerifier()("15", 10).score == pytest.approx(0.5)
    with pytest.raises(ValueError, match="tolerances"):
        NumberVerifier(tolerance=-1)


def test_numbers_parses_ranges_clock_times_and_words():
    assert numbers("from 1-3 s") == [1.0, 3.0]  # a dash between numbers is no minus sign
    assert numbers("from 0:05 to 1:02.5", clock=True) == [5.0, 62.5]
    assert numbers("two then 7", words=True) == [2.0, 7.0]


# ---- IoU: time spans and boxes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "label", "expected", "iou"),
    [
        ("from 1.0 s to 3 s", [1.5, 3.0], True, 0.75),
        ("between 0 and 2", [1, 3], False, 1 / 3),
        ("0 to 4 seconds", [0, 2], False, 0.5),  # IoU exactly 0.5 is not > 0.5
        ("0 to 3.9 seconds", [0, 2], True, 2 / 3.9),
        ("3 to 1", [1, 3], True, 1.0),  # either order
        ("0:10 - 0:20", [10, 20], True, 1.0),  # m:ss
        ("at 5 s", [1, 3], False, 0.0),  # one number is no span
        ("from 0 to 1", "1.5-3.0", False, 0.0),  # a label given as text
    ],
)
def test_time_span_iou_threshold(answer, label, expected, iou):
    verdict = TimeSpanVerifier()(answer, label)
    assert bool(verdict) is expected and verdict.score == pytest.approx(iou)


def test_time_span_threshold_is_configurable_and_validated():
    assert TimeSpanVerifier(threshold=0.3)("between 0 and 2", [1, 3])
    with pytest.raises(ValueError, match="threshold"):
        TimeSpanVerifier(threshold=1.5)


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        ("[10, 10, 50, 50]", [12, 10, 50, 52], True),
        ("[0, 0, 10, 10]", [12, 10, 50, 52], False),
        ("box: 50, 50, 10, 10", [10, 10, 50, 50], True),  # corners in either order
        ("[0, 0, 10, 20]", [0, 0, 10, 10], False),  # IoU 0.5 exactly
        ("[0, 0, 10, 19]", [0, 0, 10, 10], True),
        ("[1, 2, 3]", [0, 0, 10, 10], False),
    ],
)
def test_box_iou_threshold(answer, label, expected):
    assert bool(BoxVerifier()(answer, label)) is expected


# ---- callables, specs, registry ---------------------------------------------------------------------------------------


def starts_with_label(answer: str, label: str, prefix_only: bool = True) -> bool:
    return answer.startswith(label) if prefix_only else label in answer


def similarity(answer: str, label: str) -> float:
    shared = set(answer.split()) & set(label.split())
    return len(shared) / max(len(set(label.split())), 1)


def test_any_callable_by_dotted_path():
    verifier = build_verifier(f"{__name__}:starts_with_label")
    assert verifier("left it goes", "left") and not verifier("it goes left", "left")
    loose = CallableVerifier(f"{__name__}.starts_with_label", prefix_only=False)
    assert loose("it goes left", "left")
    scored = CallableVerifier(similarity, threshold=0.5)
    assert scored("a red ball", "red ball") and scored("a red ball", "red ball").score == 1.0
    assert not scored("a blue cube", "red ball")
    with pytest.raises(ValueError, match="cannot import"):
        build_verifier("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="has no attribute"):
        build_verifier(f"{__name__}:nope")


def test_specs_carry_settings_and_unknown_types_are_refused():
    assert parse_spec("number:tolerance=0.05") == ("number", {"tolerance": 0.05})
    assert build_verifier("number:tolerance=0.05")("10.4", 10)
    assert not build_verifier("number:tolerance=0.03")("10.4", 10)
    assert build_verifier("time_range:threshold=0.3")("between 0 and 2", [1, 3])
    with pytest.raises(ValueError, match="not key=value"):
        build_verifier("number:0.05")
    with pytest.raises(ValueError, match="no verifier"):
        get_verifier("sentence")
    assert isinstance(get_verifier(None), ClassVerifier)
    assert get_verifier("class", classes=DIRECTIONS)("left", "left")


def record(i: int, label, label_type=None, **meta) -> LabelledRecord:
    return LabelledRecord(id=f"r{i}", question="q", label=label, label_type=label_type, videos=[], source="t", meta=meta)


def test_record_verifiers_build_class_spaces_per_group_and_choices_per_record():
    records = [
        record(0, "left", type="direction"), record(1, "right", type="direction"),
        record(2, "red", type="color"), record(3, "blue", type="color"),
        record(4, "B", "choice", choices=["left", "right"]), record(5, 7, "number"),
    ]  # fmt: skip
    verifiers = RecordVerifiers(records, synonyms={"left": ["leftwards"]})
    assert verifiers.check(records[0], "leftwards") and not verifiers.check(records[0], "left or right")
    assert verifiers.check(records[2], "red, moving left")  # "left" is not a colour class
    assert verifiers(records[0]) is verifiers(records[1])  # one object per class space
    assert verifiers.check(records[4], "right") and not verifiers.check(records[4], "A")
    assert verifiers.check(records[5], "seven")
    override = RecordVerifiers(records, spec=f"{__name__}:starts_with_label")
    assert override.check(records[0], "left!") and not override.check(records[0], "go left")
