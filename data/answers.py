"""When two candidate solutions reach the same answer: answers compared as numbers where they are numbers
("1,200", "$1200" and "1200.0" agree), else as text with case and spacing ignored; an empty answer agrees with none.
Candidates of one question are the rows with the same question text (spacing ignored)."""
import re
from decimal import Decimal, InvalidOperation

import numpy as np
import pandas as pd

SPACES = re.compile(r"\s+")
NUMBER_DECORATION = re.compile(r"[,$\s]")


def answer_key(answer: str) -> str:
    """A canonical form of an answer: equal keys are equal answers. "" for an empty answer."""
    text = SPACES.sub(" ", str(answer)).strip()
    try:
        number = Decimal(NUMBER_DECORATION.sub("", text))
    except InvalidOperation:
        return text.lower()
    if not number.is_finite():
        return text.lower()
    return format(number.normalize() + 0, "f")  # + 0 turns -0 into 0


def candidate_groups(questions: pd.Series | np.ndarray,
                     answers: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the id of its question (rows with the same question text share it) and the id of its answer among
    that question's candidates (-1 for an empty answer, which agrees with no other)."""
    question_keys = [SPACES.sub(" ", str(q)).strip() for q in questions]
    answer_keys = [answer_key(a) for a in answers]
    question_ids = pd.factorize(pd.Series(question_keys))[0]
    answer_ids = pd.factorize(pd.Series([f"{q}\x00{a}" for q, a in zip(question_ids, answer_keys)]))[0]
    answer_ids[np.array([a == "" for a in answer_keys], dtype=bool)] = -1
    return question_ids.astype(np.int64), answer_ids.astype(np.int64)
