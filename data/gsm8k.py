"""Training rows made from GSM8K's reference solutions (`gsm8k/train.jsonl`): each problem's correct solution, and a
wrong one made the way a solver goes wrong:
- slip:  one computed number is miscalculated and every later step works on from it, as a solver's would;
- final: the work is right but the final answer disagrees with it.
Rows take gsm8k_verify's form: calculator marks (`<<48/2=24>>`) kept, the last line `A: <answer>`, a `group` per
problem and a `source` per kind. `python -m data.gsm8k train.jsonl --out table.csv` writes them for `--extra-data`.
"""
import argparse
import json
import random
import re
from pathlib import Path

import pandas as pd

from common.errors import UserError
from common.files import atomic_write

MARK = re.compile(r"<<([^=<>]*)=([^<>]*)>>")
NUMBER = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w.]*\d)")  # 1,250 too
SAFE_EXPRESSION = re.compile(r"[\d.+\-*/() ]+")
FINAL = re.compile(r"\n#### *(.+?)\s*$")
KINDS = {"slip": 0.7, "final": 0.3}


def read_gsm8k(path: Path) -> list[dict]:
    """The problems of a GSM8K JSON Lines file (question, answer); a bad line is one UserError naming it."""
    problems = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise UserError(f"{path}: {err.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, answer = row["question"], row["answer"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: not a GSM8K line (a JSON object with question and answer)") from None
        if not FINAL.search(answer):
            raise UserError(f"{path}:{number}: the answer does not end with '#### <final answer>'")
        problems.append({"question": question, "answer": answer})
    return problems


def number_text(value: float) -> str:
    """As GSM8K writes numbers: whole ones without a point, others with at most two decimals."""
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def evaluate(expression: str) -> float | None:
    """The value of a calculator mark's arithmetic; None for anything else."""
    expression = expression.replace("x", "*").replace(",", "").replace("$", "").strip()
    if not SAFE_EXPRESSION.fullmatch(expression) or "**" in expression:
        return None
    try:
        return float(eval(expression, {"__builtins__": {}}))  # digits, + - * / ( ) and points only
    except (ArithmeticError, SyntaxError, TypeError):
        return None


def slipped(value: float, rng: random.Random) -> float:
    """A plausible miscalculation of `value`: a little off, by a unit or by a tenth or so."""
    whole = abs(value - round(value)) < 1e-9
    for _ in range(20):
        wrong = value + rng.choice([-1, 1]) * (rng.randint(1, 9) if whole and abs(value) < 100
                                                else max(1, round(abs(value) * rng.uniform(0.05, 0.3))))
        if wrong != value and (wrong >= 0 or value < 0):
            return float(wrong)
    return value + 1


def carry_slip(solution: str, rng: random.Random) -> tuple[str, str] | None:
    """(solution without its final line, final answer) with one calculator mark's result miscalculated and the later
    marks recomputed from it (the sums the prose shows before them too); None when the slip would not reach the
    final answer or a later mark cannot be recomputed."""
    marks = list(MARK.finditer(solution))
    results = [_number(mark.group(2)) for mark in marks]
    right = [i for i, mark in enumerate(marks)
             if results[i] is not None and (value := evaluate(mark.group(1))) is not None
             and abs(value - results[i]) < 1e-6]
    if not right:
        return None
    first = rng.choice(right)
    if any(result is None for result in results[first:]):
        return None
    changed = {number_text(results[first]): number_text(slipped(results[first], rng))}
    pieces, end = [], 0
    for i in range(first, len(marks)):
        mark, old = marks[i], number_text(results[i])
        prose_start = max(end, solution.rfind("\n", 0, mark.start()) + 1)
        pieces.append(solution[end:prose_start])
        if i == first:
            expression, new = mark.group(1), changed[old]
            pieces.append(solution[prose_start : mark.start()])
        else:
            expression = _swap_numbers(mark.group(1), changed)
            value = evaluate(expression)
            if value is None:
                return None
            new = number_text(value)
            pieces.append(_swap_numbers(solution[prose_start : mark.start()], changed))
            if new != old:
                changed[old] = new
        pieces.append(f"<<{expression}={new}>>")
        end = mark.end()
        shown = NUMBER.match(solution, end)  # the result written again after the mark
        if shown and number_text(_number(shown.group())) == old:
            pieces.append(new)
            end = shown.end()
    pieces.append(solution[end:])
    text = "".join(pieces)
    final = FINAL.search(text)
    old_final = _number(final.group(1))
    if old_final is None or number_text(old_final) not in changed:
        return None
    return text[: final.start()], changed[number_text(old_final)]


def _number(text: str) -> float | None:
    text = text.replace(",", "").strip()
    return float(text) if re.fullmatch(r"-?\d+(?:\.\d+)?", text) else None


def _swap_numbers(text: str, changed: dict[str, str]) -> str:
    """`text` with each number that a slip changed replaced by its new value."""
    return NUMBER.sub(lambda n: changed.get(number_text(_number(n.group())), n.group()), text)


def wrong_final(solution: str, final: str, rng: random.Random) -> str:
    """A final answer at odds with the work: another number of the work, or the answer slightly off."""
    others = sorted({number_text(_number(m)) for m in NUMBER.findall(solution)} - {final})
    if others and rng.random() < 0.5:
        return rng.choice(others)
    value = _number(final)
    return number_text(slipped(value, rng)) if value is not None else final + "0"


def gsm8k_rows(problems: list[dict], seed: int = 0) -> pd.DataFrame:
    """Per problem its correct row and a wrong one (slip where one reaches the answer, else final), in problem
    order; columns question, answer, solution, is_correct, source, group."""
    rng = random.Random(seed)
    rows = []
    for index, problem in enumerate(problems):
        final = FINAL.search(problem["answer"])
        work, answer = problem["answer"][: final.start()], final.group(1).replace(",", "")
        group = f"gsm8k-{index}"
        rows.append((problem["question"], answer, f"{work}\nA: {answer}", True, "gsm8k_reference", group))
        kind = "slip" if rng.random() < KINDS["slip"] else "final"
        slip = carry_slip(problem["answer"], rng) if kind == "slip" else None
        if slip is not None:
            wrong_work, wrong_answer = slip
            rows.append((problem["question"], wrong_answer, f"{wrong_work}\nA: {wrong_answer}", False, "gsm8k_slip",
                         group))
        else:
            wrong_answer = wrong_final(work, answer, rng)
            rows.append((problem["question"], wrong_answer, f"{work}\nA: {wrong_answer}", False, "gsm8k_final", group))
    return pd.DataFrame(rows, columns=["question", "answer", "solution", "is_correct", "source", "group"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", type=Path, help="GSM8K problems, e.g. ../shared/data/gsm8k/train.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        rows = gsm8k_rows(read_gsm8k(args.jsonl), args.seed)
        if args.out.resolve() == args.jsonl.resolve():
            raise UserError(f"--out {args.out}: would overwrite the input")
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    atomic_write(args.out, lambda f: rows.to_csv(f, index=False))
    print(f"{args.out}: {len(rows)} rows ({rows['source'].value_counts().to_dict()})")


if __name__ == "__main__":
    main()
