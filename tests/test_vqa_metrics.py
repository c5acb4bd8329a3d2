"""Hand-computed cases for pipeline.vqa_metrics (every expected number is worked out in a comment)."""

from __future__ import annotations

import pytest

from pipeline.vqa_metrics import (
    METRICS,
    aggregate,
    anls,
    exact_match,
    get_metric,
    levenshtein,
    normalize_answer,
    parse_answers,
    process_digits_and_articles,
    process_punctuation,
    relaxed_accuracy,
    score_prediction,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------------------------------------
# Punctuation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        # digit,digit anywhere -> every listed punctuation char is deleted: "1,000" -> "1000".
        ("1,000", "1000"),
        # ", " occurs, so the comma is deleted (not replaced by a space).
        ("hello, world", "hello world"),
        # No space next to the comma and no digit,digit -> the comma becomes a space.
        ("hello,world", "hello world"),
        # Trailing period (not followed by a digit) removed.
        ("yes.", "yes"),
        # Period followed by a digit kept.
        ("2.5", "2.5"),
        # The "not preceded by a digit" part of the official pattern is inert: "3." loses its period.
        ("3.", "3"),
        # Period inside a word is removed too ("a.m." -> "am").
        ("a.m.", "am"),
        # Slash with no space around it becomes a space.
        ("black/white", "black white"),
        # " /" occurs, so the slash is deleted and the two spaces around it remain.
        ("black / white", "black  white"),
        # "!" and "?" are in the list; "'" ":" "%" are not and survive untouched.
        ("what?!", "what  "),
        ("don't", "don't"),
        ("10:30", "10:30"),
        ("50%", "50%"),
    ],
)
def test_process_punctuation_single_rules(text, expected):
    assert process_punctuation(text) == expected


def test_digit_comma_digit_deletes_all_punctuation_even_far_away():
    # "1,5" contains digit,digit, so "-" is deleted instead of becoming a space: "leftright 15".
    assert process_punctuation("left-right 1,5") == "leftright 15"
    # Without the number the hyphen becomes a space.
    assert process_punctuation("left-right") == "left right"


def test_punctuation_decisions_use_the_original_text():
    # "/" (earlier in the list) has no space neighbour -> replaced by a space: "a ,b".  "," is then judged
    # against the ORIGINAL "a/,b" (no " ," there) -> also replaced by a space: "a  b" with two spaces.
    assert process_punctuation("a/,b") == "a  b"
    # "(" has no space neighbour -> space; ")" is followed by a space in the original -> deleted.
    assert process_punctuation("(a) b") == " a b"


def test_period_removal_is_capped_at_32_like_the_official_call():
    # 40 periods, all not followed by a digit; only the first 32 are removed -> 8 remain.
    assert process_punctuation("a" + "." * 40) == "a" + "." * 8


# ---------------------------------------------------------------------------------------------------------
# Digits, articles, contractions, case
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("two", "2"),
        ("ten", "10"),
        ("zero", "0"),
        ("none", "0"),  # official map quirk
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("Two Dogs", "2 dogs"),  # lowercased first, then mapped
        ("a dog", "dog"),
        ("an apple", "apple"),
        ("the cat on the mat", "cat on mat"),
        ("The", ""),
        ("one", "1"),  # mapped to "1", not treated as an article
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("whats", "what's"),
        ("Im", "im"),  # the table's key "Im" is unreachable after lowercasing
        ("  lots   of\tspace ", "lots of space"),
    ],
)
def test_process_digits_and_articles(text, expected):
    assert process_digits_and_articles(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # "\n" -> " ", strip -> "The Two dogs." -> punctuation -> "The Two dogs" -> "2 dogs".
        ("  The Two dogs.\n", "2 dogs"),
        ("Yes.", "yes"),
        # "!" has no space neighbour -> space; then "dont" -> "don't"; "I" -> "i".
        ("I dont know!", "i don't know"),
        # "-" -> space gives "two way" -> "2 way".
        ("two-way", "2 way"),
        ("1,000", "1000"),
        ("A\tDog", "dog"),
        # "/" deleted (space neighbour), double space collapsed by the word split.
        ("black / white", "black white"),
    ],
)
def test_normalize_answer_combines_all_steps(text, expected):
    assert normalize_answer(text) == expected


# ---------------------------------------------------------------------------------------------------------
# VQA accuracy: leave-one-out
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "matching, expected",
    [
        # 0 matches: every subset has 0 -> 0.0
        (0, 0.0),
        # 1 match: leaving it out -> 0/3 = 0; leaving out one of the 9 others -> 1/3.
        #   (1*0 + 9*(1/3)) / 10 = 3/10 = 0.3
        (1, 0.3),
        # 2 matches: leave out a match -> 1/3 (x2); leave out a non-match -> 2/3 (x8).
        #   (2/3 + 16/3) / 10 = 6/10 = 0.6
        (2, 0.6),
        # 3 matches: leave out a match -> 2/3 (x3); a non-match -> 3/3 = 1 (x7).  (2 + 7) / 10 = 0.9
        (3, 0.9),
        # 4 matches: at least 3 remain in every subset -> 1.0
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_leave_one_out_with_duplicated_answers(matching, expected):
    answers = ["red"] * matching + ["blue"] * (10 - matching)
    assert vqa_accuracy("red", answers) == pytest.approx(expected)
    assert vqa_accuracy("red", answers, normalization="lmms") == pytest.approx(expected)


def test_vqa_order_of_answers_does_not_matter():
    # 2 matches interleaved -> still 0.6.
    answers = ["blue", "red", "blue", "blue", "blue", "red", "blue", "blue", "blue", "blue"]
    assert vqa_accuracy("red", answers) == pytest.approx(0.6)


def test_vqa_small_answer_counts():
    # N == 1 is a plain match after normalization: "Two" -> "2" == "2".
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("Two", ["3"]) == 0.0
    # N == 2, both match: each subset has 1 match -> 1/3 each -> 1/3 (the literal official formula).
    assert vqa_accuracy("red", ["red", "red"]) == pytest.approx(1 / 3)
    # N == 4, all match: each subset has 3 matches -> 1.0.
    assert vqa_accuracy("red", ["red"] * 4) == 1.0
    # No answers at all -> 0.0.
    assert vqa_accuracy("red", []) == 0.0


def test_vqa_prediction_normalization_feeds_the_match():
    # Prediction "The Two." -> "2"; 3 of 10 answers are "2" -> 0.9 (as computed above).
    answers = ["2", "2", "2", "3", "3", "3", "3", "4", "4", "4"]
    assert vqa_accuracy("The Two.", answers) == pytest.approx(0.9)
    # Prediction "Yes" vs ten identical lowercase "yes": prediction is lowercased -> 1.0.
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    # Contraction restored on the prediction side: "dont know" -> "don't know".
    assert vqa_accuracy("dont know", ["don't know"] * 10) == 1.0


# ---------------------------------------------------------------------------------------------------------
# VQA accuracy: the official asymmetric normalization quirks vs "lmms"
# ---------------------------------------------------------------------------------------------------------


def test_official_does_not_digit_normalize_identical_answers():
    # Prediction "two" -> "2"; all answers are "two" (identical) -> left raw -> no match.
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    # lmms normalizes both sides: "2" == "2" in all 10 -> 1.0.
    assert vqa_accuracy("two", ["two"] * 10, normalization="lmms") == 1.0


def test_official_never_digit_normalizes_answers_even_when_they_differ():
    # Answers differ, so they get punctuation processing only; "two" stays "two", the prediction is "2".
    answers = ["two"] * 5 + ["three"] * 5
    assert vqa_accuracy("two", answers) == 0.0
    # lmms: 5 matches of 10 -> 1.0.
    assert vqa_accuracy("two", answers, normalization="lmms") == 1.0


def test_official_punctuation_applies_to_answers_only_when_they_differ():
    # Identical "yes." answers are left raw -> "yes" != "yes." -> 0.0.
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # Answers differ -> punctuation processing strips the period -> 3 matches of 10 -> 0.9.
    assert vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # lmms: identical answers are normalized too -> 1.0.
    assert vqa_accuracy("yes", ["yes."] * 10, normalization="lmms") == 1.0


def test_official_comma_between_digits_on_answers():
    # Answers differ -> "1,000" -> "1000"; prediction "1,000" -> "1000"; 2 matches of 10 -> 0.6.
    answers = ["1,000"] * 2 + ["999"] * 8
    assert vqa_accuracy("1,000", answers) == pytest.approx(0.6)
    # Identical "1,000" answers stay raw; the prediction became "1000" -> no match.
    assert vqa_accuracy("1,000", ["1,000"] * 10) == 0.0


def test_official_articles_and_case_on_answers_are_not_normalized():
    # Answers differ but only get punctuation processing: "a dog" keeps its article, prediction -> "dog".
    answers = ["a dog"] * 4 + ["cat"] * 6
    assert vqa_accuracy("a dog", answers) == 0.0
    assert vqa_accuracy("a dog", answers, normalization="lmms") == 1.0
    # Upper-case answers are never lowercased under official.
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["Yes"] * 10, normalization="lmms") == 1.0


def test_official_does_not_strip_whitespace_from_answers():
    # The official evaluator only cleans whitespace on the prediction; " yes" (all identical) stays raw.
    assert vqa_accuracy("yes", [" yes"] * 10) == 0.0
    assert vqa_accuracy("yes", [" yes"] * 10, normalization="lmms") == 1.0


def test_official_none_maps_to_zero_on_prediction_only():
    # Prediction "none" -> "0".  Answers "0" (identical, raw) -> match -> 1.0; answers "none" -> 0.0.
    assert vqa_accuracy("none", ["0"] * 10) == 1.0
    assert vqa_accuracy("none", ["none"] * 10) == 0.0


def test_vqa_rejects_bad_normalization_and_bare_string_answers():
    with pytest.raises(ValueError, match="official"):
        vqa_accuracy("yes", ["yes"], normalization="mmf")
    with pytest.raises(ValueError, match="parse_answers"):
        vqa_accuracy("yes", "yes")


# ---------------------------------------------------------------------------------------------------------
# Exact match
# ---------------------------------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match("  New   York ", ["new york"]) == 1.0
    assert exact_match("New\tYork", ["boston", "NEW YORK"]) == 1.0
    # No punctuation handling: the period makes it different.
    assert exact_match("new york.", ["new york"]) == 0.0
    assert exact_match("newyork", ["new york"]) == 0.0
    assert exact_match("x", []) == 0.0


# ---------------------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, distance",
    [
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("kitten", "sitting", 3),  # k->s, e->i, insert g
        ("flaw", "lawn", 2),  # delete f, insert n
        ("hello", "yellow", 2),  # h->y, insert w
    ],
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_anls_values():
    assert anls("invoice 42", ["invoice 42"]) == 1.0
    # One substitution in a 10-character string: 1 - 1/10 = 0.9.
    assert anls("abcdefghij", ["abcdefghiX"]) == pytest.approx(0.9)
    # kitten vs sitting: 1 - 3/7 = 4/7 ~= 0.571 (above 0.5, kept).
    assert anls("kitten", ["sitting"]) == pytest.approx(4 / 7)
    # Exactly at the threshold is kept: 2 edits over 4 chars -> 0.5.
    assert anls("abcd", ["abxy"]) == pytest.approx(0.5)
    # Below the threshold: 3 edits over 5 chars -> 0.4 -> 0.0.
    assert anls("abcde", ["abxyz"]) == 0.0
    # ... unless the threshold is lowered.
    assert anls("abcde", ["abxyz"], threshold=0.3) == pytest.approx(0.4)


def test_anls_best_over_answers():
    # "help": 2 edits / 5 -> 0.6; "hello world": 6 / 11 -> 0.4545 -> 0; "yellow": 2 / 6 -> 0.6667.
    assert anls("hello", ["help", "hello world", "yellow"]) == pytest.approx(2 / 3)


def test_anls_case_and_whitespace_insensitive_and_empty():
    assert anls(" Hello   World ", ["hello world"]) == 1.0
    assert anls("", [""]) == 1.0
    assert anls("   ", [""]) == 1.0  # collapses to empty
    assert anls("", ["abc"]) == 0.0
    assert anls("abc", []) == 0.0


# ---------------------------------------------------------------------------------------------------------
# Relaxed accuracy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("10.4", ["10"], 1.0),  # |0.4| / 10 = 0.04 <= 0.05
        ("10.5", ["10"], 1.0),  # 0.05 exactly: inclusive
        ("10.6", ["10"], 0.0),  # 0.06 > 0.05
        ("9.6", ["10"], 1.0),  # 0.04
        ("-5", ["-5.2"], 1.0),  # 0.2 / 5.2 ~= 0.038
        ("45%", ["45"], 1.0),  # percent sign dropped, value not rescaled
        (" 45 % ", ["46"], 1.0),  # 1 / 46 ~= 0.022
        ("45%", ["0.45"], 0.0),  # 45 vs 0.45: far apart
        ("1,000", ["1000"], 1.0),  # thousands separator
        ("1,020", ["1,000"], 1.0),  # 20 / 1000 = 0.02
        ("1,234,567.5", ["1234567"], 1.0),
        ("0", ["0.0"], 1.0),  # gt == 0: exact numeric equality
        ("0.01", ["0"], 0.0),  # gt == 0: anything else is wrong
        ("12", ["20", "12.5"], 1.0),  # best over answers: 0.5 / 12.5 = 0.04
        ("Yes", ["yes "], 1.0),  # non-numeric: case-insensitive match after strip
        ("no", ["yes"], 0.0),
        ("10 apples", ["10"], 0.0),  # not a number -> string comparison fails
        ("1,00", ["100"], 0.0),  # malformed grouping is not a number
        ("nan", ["nan"], 1.0),  # not parsed as a number; equal strings still match
        ("x", [], 0.0),
    ],
)
def test_relaxed_accuracy(prediction, answers, expected):
    assert relaxed_accuracy(prediction, answers) == expected


def test_relaxed_accuracy_custom_tolerance():
    # 0.06 relative error passes with a 10% tolerance.
    assert relaxed_accuracy("10.6", ["10"], tolerance=0.1) == 1.0


# ---------------------------------------------------------------------------------------------------------
# parse_answers
# ---------------------------------------------------------------------------------------------------------


class _FakeArray:
    """Iterable, sized, not a list: stands in for a numpy/pandas array without importing numpy."""

    def __init__(self, items):
        self._items = list(items)

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


def test_parse_answers_accepted_forms():
    assert parse_answers(None) == []
    assert parse_answers("yes") == ["yes"]
    assert parse_answers(["yes", "no"]) == ["yes", "no"]
    assert parse_answers(("yes", "no")) == ["yes", "no"]
    assert parse_answers([]) == []
    vqav2 = [
        {"answer": "2", "answer_confidence": "yes", "answer_id": 1},
        {"answer": "two", "answer_confidence": "maybe", "answer_id": 2},
    ]
    assert parse_answers(vqav2) == ["2", "two"]
    assert parse_answers(_FakeArray(["a", "b"])) == ["a", "b"]
    assert parse_answers(_FakeArray(vqav2)) == ["2", "two"]
    assert parse_answers(answer for answer in ["x", "y"]) == ["x", "y"]
    # Raw strings are kept as they are: the official metric depends on the unprocessed answers.
    assert parse_answers([" Yes. "]) == [" Yes. "]


def test_parse_answers_numpy_object_array():
    np = pytest.importorskip("numpy")
    arr = np.array([{"answer": "red", "answer_confidence": "yes", "answer_id": 1}], dtype=object)
    assert parse_answers(arr) == ["red"]
    parsed = parse_answers(np.array(["a", "b"]))
    assert parsed == ["a", "b"]
    assert all(type(item) is str for item in parsed)  # numpy.str_ converted to plain str


@pytest.mark.parametrize(
    "value, message",
    [
        ([{"text": "x"}], "'answer' key"),
        ([1, 2], "must be a string"),
        (["ok", None], "answer #1"),
        ([{"answer": None}], "must be a string"),
        ([["nested"]], "must be a string"),
        (42, "int"),
        (b"yes", "bytes"),
        ({"answer": "x"}, "single dict"),
    ],
)
def test_parse_answers_errors(value, message):
    with pytest.raises(ValueError, match=message):
        parse_answers(value)


# ---------------------------------------------------------------------------------------------------------
# Registry and score_prediction
# ---------------------------------------------------------------------------------------------------------


def test_metrics_registry_uniform_signature():
    assert set(METRICS) == {"vqa", "exact", "anls", "relaxed"}
    # Same call shape for all; expected values: vqa 10/10 match -> 1.0, exact -> 1.0, anls -> 1.0,
    # relaxed string match -> 1.0.
    for name, metric in METRICS.items():
        assert metric("yes", ["yes"] * 10) == 1.0, name
    # The registered vqa metric is the official variant: "two" vs identical "two" -> 0.0.
    assert METRICS["vqa"]("two", ["two"] * 10) == 0.0


def test_get_metric():
    assert get_metric("exact") is exact_match
    assert get_metric("vqa")("two", ["two"] * 10) == 0.0
    assert get_metric("vqa", vqa_normalization="lmms")("two", ["two"] * 10) == 1.0
    with pytest.raises(ValueError, match=r"'bleu'.*anls.*exact.*relaxed.*vqa"):
        get_metric("bleu")
    with pytest.raises(ValueError, match="official"):
        get_metric("vqa", vqa_normalization="mmf")


def test_score_prediction_returns_compared_form():
    assert score_prediction("vqa", " The Two ", ["2"] * 10) == (1.0, "2")
    assert score_prediction("vqa", "two", ["two"] * 10) == (0.0, "2")
    assert score_prediction("vqa", "two", ["two"] * 10, vqa_normalization="lmms") == (1.0, "2")
    assert score_prediction("exact", "  New  York ", ["new york"]) == (1.0, "new york")
    score, form = score_prediction("anls", " ABCDEFGHIJ ", ["abcdefghix"])
    assert (score, form) == (pytest.approx(0.9), "abcdefghij")
    assert score_prediction("relaxed", " 45% ", ["45"]) == (1.0, "45%")
    with pytest.raises(ValueError, match="unknown metric"):
        score_prediction("bleu", "x", ["x"])


# ---------------------------------------------------------------------------------------------------------
# aggregate
# ---------------------------------------------------------------------------------------------------------


def test_aggregate_with_groups():
    scores = [1.0, 1.0, 0.3, 0.0]
    groups = [
        {"answer_type": "yes/no", "question_type": "is the"},
        {"answer_type": "yes/no", "question_type": "are"},
        {"answer_type": "other", "question_type": "is the"},
        {"answer_type": "number", "question_type": "how many"},
    ]
    # overall: (1 + 1 + 0.3 + 0) / 4 = 0.575 -> 57.5
    # answer_type: yes/no (1 + 1) / 2 -> 100.0; other 0.3 -> 30.0; number 0 -> 0.0
    # question_type: "is the" (1 + 0.3) / 2 = 0.65 -> 65.0; "are" -> 100.0; "how many" -> 0.0
    assert aggregate(scores, groups) == {
        "overall": 57.5,
        "n": 4,
        "groups": {
            "answer_type": {
                "yes/no": {"score": 100.0, "n": 2},
                "other": {"score": 30.0, "n": 1},
                "number": {"score": 0.0, "n": 1},
            },
            "question_type": {
                "is the": {"score": 65.0, "n": 2},
                "are": {"score": 100.0, "n": 1},
                "how many": {"score": 0.0, "n": 1},
            },
        },
    }


def test_aggregate_rounding_and_edge_cases():
    # 1/3 -> 33.333... -> 33.33; (0.3 + 0.6 + 1.0) / 3 = 0.6333... -> 63.33; 2/3 -> 66.67.
    assert aggregate([1 / 3], None) == {"overall": 33.33, "n": 1, "groups": {}}
    assert aggregate([0.3, 0.6, 1.0])["overall"] == 63.33
    assert aggregate([2 / 3])["overall"] == 66.67
    assert aggregate([]) == {"overall": 0.0, "n": 0, "groups": {}}
    with pytest.raises(ValueError, match="must match"):
        aggregate([1.0, 0.0], [{"answer_type": "other"}])
