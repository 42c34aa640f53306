"""When two candidate solutions reach the same answer: answers compared as numbers where they are numbers ("1,200",
"$1200", "1200.0" and "1.2e3" agree; "2, 3" and "23" do not), exactly, else as text with case and spacing ignored;
an empty answer agrees with none. Candidates of one question are the rows with the same question text (spacing
ignored)."""
import re
from decimal import Decimal, InvalidOperation

import numpy as np
import pandas as pd

SPACES = re.compile(r"\s+")
CURRENCY = re.compile(r"^([-+]?)\s*\$\s*")  # "$1,200", "-$5"
THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def question_key(question: str) -> str:
    return SPACES.sub(" ", str(question)).strip()


def answer_key(answer: str) -> str:
    """A canonical form of an answer: equal keys are equal answers. "" for an empty answer."""
    text = SPACES.sub(" ", str(answer)).strip()
    number = _number_key(text)
    return text.lower() if number is None else number


def _number_key(text: str) -> str | None:
    """The number `text` writes, as significant digits and an exponent ("1200.0" → "12e2"), exactly and without a
    decimal context (no rounding, no overflow); None if it is not a finite number."""
    text = CURRENCY.sub(r"\1", text)
    if THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    try:
        number = Decimal(text)
    except InvalidOperation:
        return None
    if not number.is_finite():
        return None
    sign, digits, exponent = number.as_tuple()
    significant = "".join(map(str, digits)).lstrip("0")
    if not significant:
        return "0"
    stripped = significant.rstrip("0")
    return f"{'-' if sign else ''}{stripped}e{exponent + len(significant) - len(stripped)}"


def candidate_groups(questions: pd.Series | np.ndarray,
                     answers: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the id of its question (rows with the same question text share it) and the id of its answer among
    that question's candidates (-1 for an empty answer, which agrees with no other)."""
    question_ids = pd.factorize(pd.Series([question_key(q) for q in questions], dtype=object))[0]
    answer_keys = [answer_key(a) for a in answers]
    answer_ids = pd.factorize(pd.Series([f"{q}\x00{a}" for q, a in zip(question_ids, answer_keys)], dtype=object))[0]
    answer_ids[np.array([a == "" for a in answer_keys], dtype=bool)] = -1
    return question_ids.astype(np.int64), answer_ids.astype(np.int64)
