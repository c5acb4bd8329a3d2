"""Scoring functions for offline VQA evaluation (stdlib only).

This module is deliberately free of numpy / pyarrow / ray so that it can be imported anywhere (driver,
Ray workers, notebooks, tests) and so that every number it produces can be checked by hand.

Metrics
-------
``vqa``      VQAv2 accuracy with the official leave-one-out averaging (see below).
``exact``    1.0 if the prediction equals any answer after lowercasing and whitespace collapsing.
``anls``     Average Normalized Levenshtein Similarity (DocVQA / InfoVQA); similarities below the
             threshold (default 0.5) count as 0.
``relaxed``  ChartQA relaxed accuracy: numbers within a relative tolerance (default 5%), else exact
             case-insensitive string match.

Every metric has the uniform signature ``fn(prediction, answers) -> float`` in ``METRICS`` and scores one
question.  A question with no reference answers scores 0.0 for every metric.

VQA accuracy
------------
For N human answers the official VQAv2 accuracy is the mean over the N leave-one-out subsets of
``min(1, #answers in the subset equal to the prediction / 3)``.  With the usual N == 10 that gives:
0 matches -> 0.0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.  Leave-one-out is done by *position*:
the official code removes the left-out answer by comparing answer dicts, which carry a unique
``answer_id``, so duplicated answer strings are still only left out once.  For N == 1 there is nothing
left after leaving one out (the literal formula would always give 0), so a single answer is scored as a
plain match: 1.0 if the normalized strings are equal, else 0.0.  For 2 <= N < 10 the general formula is
applied unchanged (so with N == 2 the maximum is 1/3, exactly as the official code would give).

Two normalization variants are offered (``normalization=``):

``"official"`` -- reproduces GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``:

* The prediction: ``\\n`` and ``\\t`` become spaces, surrounding whitespace is stripped, then
  :func:`process_punctuation`, then :func:`process_digits_and_articles` (lowercase, number words to
  digits, articles dropped, contractions restored).  This is :func:`normalize_answer`.
* The human answers are compared *raw* -- no stripping, no lowercasing, no digit/article processing --
  except that, when the answers are not all identical (``len(set(answers)) > 1``), each one goes through
  :func:`process_punctuation` only.  Consequences (all intentional, all tested):
  prediction "two" vs ten identical answers "two" scores 0.0 (the prediction became "2", the answers
  were left alone); prediction "yes" vs ten identical "yes." scores 0.0, but if the answers disagree the
  period is stripped from them and "yes" can match; an upper-case or article-carrying answer ("Yes",
  "a dog") never matches because only the prediction is lowercased and article-stripped.

``"lmms"`` -- the symmetric variant used by lmms-eval / MMF-style evaluators: :func:`normalize_answer`
(whitespace, punctuation, digits/articles/contractions) is applied to the prediction *and* to every
human answer, always.  Under this variant "two" vs ["two"] * 10 scores 1.0.  The punctuation step used
here is this module's :func:`process_punctuation` (the official one), not MMF's regex re-implementation,
which differs in corner cases.

Punctuation processing (:func:`process_punctuation`), as in the official evaluator:

1. For each character in :data:`PUNCTUATION` (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` -- note that
   ``' : % $ & * # ^ ~`` and ``.`` are *not* in the list): if the ORIGINAL input contains that character
   followed by a space or preceded by a space, OR the original input contains a digit-comma-digit
   sequence anywhere, every occurrence of the character is deleted; otherwise every occurrence is
   replaced by a space.  The tests are always made against the original input, not the partially
   processed text.  So "hello, world" -> "hello world" (deleted), "hello,world" -> "hello world"
   (replaced), "1,000" -> "1000", and "left-right 1,5" -> "leftright 15" (one digit-comma-digit makes
   every punctuation character be deleted).
2. Periods not followed by a digit are removed: "yes." -> "yes", "2.5" stays, "3." -> "3".  The official
   pattern ``(?!<=\\d)(\\.)(?!\\d)`` looks like it also wanted a "not preceded by a digit" condition, but
   ``(?!<=`` is a lookahead for the literal text "<=", which can never match at a ".", so the only
   effective condition is "not followed by a digit".  The official call also passes ``re.UNICODE`` in
   the position of ``count``, so at most 32 periods are removed; that cap is reproduced.

Digit / article processing (:func:`process_digits_and_articles`): lowercase, split on whitespace, map
the number words in :data:`NUMBER_WORDS` to digits (including the official "none" -> "0"), drop the
articles "a", "an", "the", map words found in :data:`CONTRACTIONS` (e.g. "dont" -> "don't"), and join
with single spaces.  The contractions table is the official one verbatim; its few capitalised keys
("Im", "Ive", ...) can never match because words are lowercased first, exactly as in the original.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "METRICS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "VQA_NORMALIZATIONS",
    "aggregate",
    "anls",
    "exact_match",
    "get_metric",
    "levenshtein",
    "normalize_answer",
    "parse_answers",
    "process_digits_and_articles",
    "process_punctuation",
    "relaxed_accuracy",
    "score_prediction",
    "vqa_accuracy",
]

VQA_NORMALIZATIONS: tuple[str, ...] = ("official", "lmms")

# ---------------------------------------------------------------------------------------------------------
# Data tables from the official VQA evaluator (facts, reproduced as data).
# ---------------------------------------------------------------------------------------------------------

PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# "none" -> "0" is in the official map too; it makes "none" match a "0" answer for counting questions.
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip

# A comma with a digit on each side anywhere in the text switches punctuation handling to "delete".
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# Effective meaning of the official period pattern: a period that is not followed by a digit.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official evaluator passes re.UNICODE (== 32) positionally, i.e. as the substitution count.
_OFFICIAL_PERIOD_LIMIT = 32


# ---------------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------------


def process_punctuation(text: str) -> str:
    """Apply the official VQA punctuation rules (see the module docstring for the exact rules).

    Whitespace is not collapsed here: "black / white" becomes "black  white" (two spaces).  That matters
    for the official variant, where human answers only get this step and are then compared verbatim.
    """
    delete_everywhere = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for char in PUNCTUATION:
        # The decision looks at the original text on purpose: the official loop does the same, so a
        # space created by replacing an earlier character does not change how a later one is treated.
        next_to_space = (char + " ") in text or (" " + char) in text
        if next_to_space or delete_everywhere:
            out = out.replace(char, "")
        else:
            out = out.replace(char, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_LIMIT)


def process_digits_and_articles(text: str) -> str:
    """Lowercase, map number words to digits, drop articles, restore contractions; single-space join."""
    kept: list[str] = []
    for word in text.lower().split():
        # Number words are mapped before the article test, as in the official code ("one" is not dropped).
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        kept.append(CONTRACTIONS.get(word, word))
    return " ".join(kept)


def _clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces, then surrounding whitespace is stripped (official prediction step)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full VQA normalization: whitespace cleanup, punctuation, then digits/articles/contractions.

    This is what the official evaluator does to a prediction, and what the "lmms" variant does to both the
    prediction and the human answers.
    """
    return process_digits_and_articles(process_punctuation(_clean_whitespace(text)))


def _collapse(text: str) -> str:
    """Lowercase and collapse whitespace runs to single spaces (strips the ends too)."""
    return " ".join(text.split()).lower()


def _check_answers(answers: Iterable[str]) -> list[str]:
    """Return ``answers`` as a list, refusing a bare string.

    A bare string is iterable, so without this check "yes" would silently be scored as ["y", "e", "s"].
    """
    if isinstance(answers, str):
        raise ValueError("answers must be a list of strings, not a single string; use parse_answers() first")
    return list(answers)


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def _official_reference_forms(answers: list[str]) -> list[str]:
    """The human answers as the official evaluator compares them: punctuation only, only if they differ."""
    if len(set(answers)) > 1:
        return [process_punctuation(answer) for answer in answers]
    return list(answers)


def vqa_accuracy(prediction: str, answers: list[str], normalization: str = "official") -> float:
    """VQAv2 accuracy of one prediction against N human answers (leave-one-out, min(matches / 3, 1)).

    ``normalization`` is "official" (asymmetric, reproduces the official evaluator) or "lmms" (the same
    full normalization on both sides); see the module docstring.  N == 1 is scored as a plain match and
    N == 0 as 0.0.
    """
    if normalization not in VQA_NORMALIZATIONS:
        raise ValueError(
            f"unknown VQA normalization {normalization!r}; choose one of {list(VQA_NORMALIZATIONS)}"
        )
    answers = _check_answers(answers)
    if not answers:
        return 0.0

    predicted = normalize_answer(prediction)
    if normalization == "official":
        references = _official_reference_forms(answers)
    else:
        references = [normalize_answer(answer) for answer in answers]

    matches = [reference == predicted for reference in references]
    if len(matches) == 1:
        return 1.0 if matches[0] else 0.0

    total_matches = sum(matches)
    subset_scores = []
    for left_out_matches in matches:
        # Matches among the other N - 1 answers: the total minus the left-out answer's own match (0 or 1).
        others = total_matches - int(left_out_matches)
        subset_scores.append(min(1.0, others / 3.0))
    return sum(subset_scores) / len(subset_scores)


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 if the prediction equals any answer after lowercasing and collapsing whitespace, else 0.0."""
    answers = _check_answers(answers)
    predicted = _collapse(prediction)
    return 1.0 if any(_collapse(answer) == predicted for answer in answers) else 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        # Keep the shorter string along the row so the two rows stay as small as possible.
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, char_b in enumerate(b, start=1):
            substitution = previous[j - 1] + (0 if char_a == char_b else 1)
            deletion = previous[j] + 1
            insertion = current[j - 1] + 1
            current[j] = min(substitution, deletion, insertion)
        previous = current
    return previous[len(b)]


def _similarity(a: str, b: str) -> float:
    """1 - normalized Levenshtein distance; two empty strings are identical (1.0)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(a, b) / longest


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS for one question: best similarity over the answers, zeroed when it is below ``threshold``.

    Strings are lowercased and whitespace-collapsed first, as in the DocVQA / InfoVQA evaluators.  A
    similarity exactly equal to the threshold is kept (only "below" is zeroed).
    """
    answers = _check_answers(answers)
    if not answers:
        return 0.0
    predicted = _collapse(prediction)
    best = max(_similarity(predicted, _collapse(answer)) for answer in answers)
    return best if best >= threshold else 0.0


# Plain decimal numbers only: optional sign, digits with optional 3-digit comma grouping, optional
# fraction.  float() alone would also accept "nan", "inf", "1e5" and "1_000", which are not chart answers.
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")


def _parse_number(text: str) -> float | None:
    """Parse "1,234.5", " 12 ", "45%" (the percent sign is dropped, the value is NOT divided by 100)."""
    text = text.strip()
    if text.endswith("%"):
        text = text[:-1].strip()
    if not _NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def relaxed_accuracy(prediction: str, answers: list[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: numeric answers within ``tolerance`` relative error, else exact match.

    When both sides parse as numbers the prediction is correct if |pred - gt| / |gt| <= tolerance, and
    must equal gt exactly when gt is 0 (a relative error is undefined there).  Otherwise the stripped
    strings are compared case-insensitively.  "45%" is read as 45, so it matches an answer "45";
    pix2struct's reference implementation divides by 100 instead, which would make it match "0.45".
    """
    answers = _check_answers(answers)
    predicted_number = _parse_number(prediction)
    predicted_text = prediction.strip().lower()
    for answer in answers:
        answer_number = _parse_number(answer)
        if predicted_number is not None and answer_number is not None:
            if answer_number == 0.0:
                correct = predicted_number == 0.0
            else:
                correct = abs(predicted_number - answer_number) / abs(answer_number) <= tolerance
        else:
            correct = predicted_text == answer.strip().lower()
        if correct:
            return 1.0
    return 0.0


# ---------------------------------------------------------------------------------------------------------
# Answer parsing, registry, scoring and aggregation
# ---------------------------------------------------------------------------------------------------------


def parse_answers(value: object) -> list[str]:
    """Turn a dataset's answer column value into a list of answer strings.

    Accepted: None (-> []), a single string (-> [it]), or any non-string iterable (list, tuple, numpy or
    pandas array, generator) whose elements are strings or VQAv2-style dicts with an "answer" key.
    Anything else raises ValueError, so malformed data fails loudly instead of scoring 0.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [str(value)]
    if isinstance(value, (bytes, bytearray)):
        raise ValueError(f"answers must be text, got {type(value).__name__}; decode it first")
    if isinstance(value, Mapping):
        raise ValueError(
            "answers must be a string or a sequence of strings / {'answer': ...} dicts, got a single dict; "
            "wrap it in a list"
        )
    if not isinstance(value, Iterable):
        raise ValueError(f"answers must be a string or a sequence, got {type(value).__name__}: {value!r}")

    parsed: list[str] = []
    for index, item in enumerate(value):
        if isinstance(item, Mapping):
            if "answer" not in item:
                raise ValueError(f"answer #{index} is a dict without an 'answer' key: {dict(item)!r}")
            item = item["answer"]
        if not isinstance(item, str):
            raise ValueError(f"answer #{index} must be a string, got {type(item).__name__}: {item!r}")
        # str() turns numpy.str_ and other str subclasses into plain str.
        parsed.append(str(item))
    return parsed


METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "vqa": vqa_accuracy,
    "exact": exact_match,
    "anls": anls,
    "relaxed": relaxed_accuracy,
}


def get_metric(name: str, vqa_normalization: str = "official") -> Callable[[str, list[str]], float]:
    """Return the metric called ``name`` as ``fn(prediction, answers) -> float``."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid choices are {sorted(METRICS)}")
    if vqa_normalization not in VQA_NORMALIZATIONS:
        raise ValueError(
            f"unknown VQA normalization {vqa_normalization!r}; valid choices are {list(VQA_NORMALIZATIONS)}"
        )
    if name == "vqa" and vqa_normalization != "official":
        return functools.partial(vqa_accuracy, normalization=vqa_normalization)
    return METRICS[name]


# What each metric compares on the prediction side; shown next to the score so a reader can see why.
_PREDICTION_FORMS: dict[str, Callable[[str], str]] = {
    "vqa": normalize_answer,
    "exact": _collapse,
    "anls": _collapse,
    "relaxed": lambda text: text.strip().lower(),
}


def score_prediction(
    metric_name: str, prediction: str, answers: list[str], vqa_normalization: str = "official"
) -> tuple[float, str]:
    """Score one prediction and return ``(score, normalized_prediction)``.

    ``normalized_prediction`` is the form of the prediction the metric compared: ``normalize_answer`` for
    vqa (in both variants), lowercased/whitespace-collapsed for exact and anls, stripped/lowercased for
    relaxed.
    """
    metric = get_metric(metric_name, vqa_normalization)
    return metric(prediction, answers), _PREDICTION_FORMS[metric_name](prediction)


def _percent(total: float, count: int) -> float:
    return round(100.0 * total / count, 2) if count else 0.0


def aggregate(scores: list[float], groups: list[dict[str, str]] | None = None) -> dict:
    """Average per-question scores into percentages (0-100, 2 decimals), overall and per group.

    ``groups`` has one dict per score, e.g. ``{"answer_type": "yes/no", "question_type": "is the"}``;
    every column seen gets per-value ``{"score": ..., "n": ...}`` entries in first-seen order.  Failed
    rows are expected to arrive as 0.0 scores, so nothing is dropped here.  With no scores the overall
    value is reported as 0.0 with ``n == 0``.
    """
    scores = [float(score) for score in scores]
    result: dict = {"overall": _percent(sum(scores), len(scores)), "n": len(scores), "groups": {}}
    if groups is None:
        return result
    if len(groups) != len(scores):
        raise ValueError(f"groups has {len(groups)} rows but scores has {len(scores)}; they must match")

    sums: dict[str, dict[str, list[float]]] = {}
    for score, row in zip(scores, groups):
        for column, value in row.items():
            per_value = sums.setdefault(column, {})
            per_value.setdefault(value, []).append(score)
    result["groups"] = {
        column: {
            value: {"score": _percent(sum(vals), len(vals)), "n": len(vals)}
            for value, vals in per_value.items()
        }
        for column, per_value in sums.items()
    }
    return result
