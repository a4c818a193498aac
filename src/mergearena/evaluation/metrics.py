"""Metrics: accuracy for multiple choice; ROUGE, exact match and numeric match for generation."""

from __future__ import annotations

import math
import re
import unicodedata
from functools import cache
from typing import Any

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


@cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # half a second to import: only for generation tasks

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F1 of one prediction against one reference (rouge-score, stemmed)."""
    scores = _rouge_scorer().score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def normalize(text: str) -> str:
    """Lower case, NFKC, punctuation at the ends stripped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(text.split()).strip(" .,;:!?\"'")


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def parse_number(text: str) -> float | None:
    """The last number in ``text`` (thousands separators and simple fractions allowed)."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    token = found[-1].replace(",", "")
    try:
        if "/" in token:
            numerator, denominator = token.split("/")
            return float(numerator) / float(denominator) if float(denominator) else None
        return float(token)
    except ValueError:
        return None


def numeric_match(prediction: str, reference: str) -> float:
    """1 when the last number in the prediction equals the reference's number."""
    expected, got = parse_number(reference), parse_number(prediction)
    if expected is None or got is None:
        return 0.0
    return float(math.isclose(expected, got, rel_tol=1e-6, abs_tol=1e-9))


def generation_metrics(prediction: str, reference: str) -> dict[str, float]:
    """Every generation metric of one example (the task picks its main one)."""
    return {
        **rouge(prediction, reference),
        "exact_match": exact_match(prediction, reference),
        "numeric_match": numeric_match(prediction, reference),
    }
