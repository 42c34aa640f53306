"""Training rows made from GSM8K's reference solutions (`gsm8k/train.jsonl`): each problem's correct solution, and a
wrong one made the way a solver goes wrong:
- slip:  one computed number is miscalculated and every later step works on from it, as a solver's would (the
         marks recomputed, the numbers the prose shows changed with them);
- final: the work is right but the final answer disagrees with it.
Rows take gsm8k_verify's form: calculator marks (`<<48/2=24>>`) kept, the last line `A: <answer>`, a `group` per
problem and a `source` per kind. A wrong answer keeps the form of the right one (whole and not negative where it
is), so that the form gives nothing away. `python -m data.gsm8k train.jsonl --out table.csv` writes them for
`run.py train --extra-data`.
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

import pandas as pd

from common.errors import UserError
from common.files import atomic_write

MARK = re.compile(r"<<([^=<>]*)=([^<>]*)>>")
NUMBER = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w.]*\d)")  # 1,250 too
SHOWN_SUM = re.compile(r"[\d.,$x×*/+\-()\s]*=\s*\$?\s*$")  # "32 + 22 = " just before a mark: its inputs
SAFE_EXPRESSION = re.compile(r"[\d.+\-*/() ]+")
FINAL = re.compile(r"\n#### *(.+?)\s*$")
KINDS = {"slip": 0.7, "final": 0.3}
SLIP_TRIES = 5  # marks tried before a problem gets a wrong final answer instead


def read_gsm8k(path: Path) -> list[dict]:
    """The problems of a GSM8K JSON Lines file (question, answer); a bad line is one UserError naming it."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"{path}: {err.strerror}") from None
    problems = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, answer = row["question"], row["answer"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: not a GSM8K line (a JSON object with question and answer)") from None
        if not (isinstance(question, str) and question.strip() and isinstance(answer, str)):
            raise UserError(f"{path}:{number}: question and answer must be text, the question not empty")
        final = FINAL.search(answer)
        if not final or _number(final.group(1)) is None:
            raise UserError(f"{path}:{number}: the answer does not end with '#### <number>'")
        problems.append({"question": question, "answer": answer})
    if not problems:
        raise UserError(f"{path}: no problems in it")
    return problems


def number_text(value: float) -> str:
    """As GSM8K writes numbers: whole ones without a point, others with at most two decimals."""
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _number(text: str) -> float | None:
    """The number `text` shows ("1,250", "$5", "2%" too); None if it shows none."""
    text = text.replace(",", "").replace("$", "").removesuffix("%").strip()
    return float(text) if re.fullmatch(r"-?\d+(?:\.\d+)?", text) else None


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
    """A plausible miscalculation of `value`: a little off, by a unit or by a tenth or so; whole if it was."""
    whole = abs(value - round(value)) < 1e-9
    for _ in range(20):
        wrong = value + rng.choice([-1, 1]) * (rng.randint(1, 9) if whole and abs(value) < 100
                                                else max(1, round(abs(value) * rng.uniform(0.05, 0.3))))
        if wrong != value and (wrong >= 0 or value < 0):
            return float(wrong)
    return value + 1


def _carries(value: float) -> bool:
    """Whether a later step's number equal to `value` is taken for it: not a one-digit whole number, which is as
    likely a constant of the problem (the 4 of 3/4) as an earlier result."""
    return abs(value) >= 10 or abs(value - round(value)) > 1e-9


def _swap(text: str, changed: dict[str, str]) -> str:
    """`text` with each number that a slip changed replaced by its new value."""
    return NUMBER.sub(lambda n: changed.get(number_text(_number(n.group())), n.group()), text)


def carry_slip(solution: str, rng: random.Random) -> tuple[str, str] | None:
    """(solution without its final line, final answer) with one calculator mark's result miscalculated and the later
    steps worked on from it; None when no slip reaches the final answer in a few tries, or would give it another
    form (a fraction or a negative number where the right answer is neither)."""
    marks = list(MARK.finditer(solution))
    results = [_number(mark.group(2)) for mark in marks]
    right = [i for i, mark in enumerate(marks)
             if results[i] is not None and _carries(results[i]) and (value := evaluate(mark.group(1))) is not None
             and abs(value - results[i]) < 1e-6]
    truth = _number(FINAL.search(solution).group(1))
    plain = truth is not None and truth >= 0 and abs(truth - round(truth)) < 1e-9
    for first in rng.sample(right, min(SLIP_TRIES, len(right))):
        slip = _slip_from(solution, marks, results, first, rng)
        if slip is not None and (not plain or _number(slip[1]) >= 0 and "." not in slip[1]):
            return slip
    return None


def _slip_from(solution: str, marks: list[re.Match], results: list[float | None], first: int,
               rng: random.Random) -> tuple[str, str] | None:
    if any(result is None for result in results[first:]):
        return None
    changed: dict[str, str] = {}  # old number text -> new, for every result the slip changed
    pieces, end = [], 0
    for i in range(first, len(marks)):
        mark, old = marks[i], number_text(results[i])
        line_start = max(end, solution.rfind("\n", 0, mark.start()) + 1)
        earlier = {k: v for k, v in changed.items() if _carries(_number(k))}
        pieces.append(_swap(solution[end:line_start], earlier))  # lines between marks, the rest of the last one
        if i == first:
            expression, new = mark.group(1), number_text(slipped(results[i], rng))
        else:
            expression = _swap(mark.group(1), earlier)
            value = evaluate(expression)
            if value is None:
                return None
            new = number_text(value)
        own = {**earlier, **({old: new} if new != old else {})}
        prose = solution[line_start : mark.start()]
        shown_sum = SHOWN_SUM.search(prose)  # its inputs: earlier results; before them, the result itself may stand
        split = shown_sum.start() if shown_sum else len(prose)
        pieces += [_swap(prose[:split], own), _swap(prose[split:], earlier), f"<<{expression}={new}>>"]
        if new != old:
            changed[old] = new
        end = mark.end()
        shown = NUMBER.match(solution, end)  # the result written again after the mark
        if shown and number_text(_number(shown.group())) == old:
            pieces.append(new)
            end = shown.end()
    final = FINAL.search(solution)
    pieces.append(_swap(solution[end : final.start()], {k: v for k, v in changed.items() if _carries(_number(k))}))
    old_final = number_text(_number(final.group(1)))
    if old_final not in changed:
        return None
    return "".join(pieces), changed[old_final]


def wrong_final(solution: str, final: str, rng: random.Random) -> str:
    """A final answer at odds with the work, of the same form as `final`: another number of the work, or the
    answer slightly off."""
    truth = _number(final)
    whole = abs(truth - round(truth)) < 1e-9
    others = sorted({number_text(v) for m in NUMBER.findall(solution) if (v := _number(m)) is not None
                     and v != truth and (not whole or abs(v - round(v)) < 1e-9)})
    if others and rng.random() < 0.5:
        return rng.choice(others)
    return number_text(slipped(truth, rng))


def gsm8k_rows(problems: list[dict], seed: int = 0) -> pd.DataFrame:
    """Per problem its correct row and a wrong one (slip where one reaches the answer, else final), in problem
    order; columns question, answer, solution, is_correct, source, group."""
    rng = random.Random(seed)
    rows = []
    for index, problem in enumerate(problems):
        final = FINAL.search(problem["answer"])
        work, answer = problem["answer"][: final.start()], number_text(_number(final.group(1)))
        group = f"gsm8k-{index}"
        rows.append((problem["question"], answer, f"{work}\nA: {answer}", True, "gsm8k_reference", group))
        slip = carry_slip(problem["answer"], rng) if rng.random() < KINDS["slip"] else None
        if slip is not None:
            wrong_work, wrong_answer = slip
            rows.append((problem["question"], wrong_answer, f"{wrong_work}\nA: {wrong_answer}", False, "gsm8k_slip",
                         group))
        else:
            wrong_answer = wrong_final(work, answer, rng)
            rows.append((problem["question"], wrong_answer, f"{work}\nA: {wrong_answer}", False, "gsm8k_final", group))
    return pd.DataFrame(rows, columns=["question", "answer", "solution", "is_correct", "source", "group"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.gsm8k", description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", type=Path, help="GSM8K problems, e.g. ../shared/data/gsm8k/train.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write (a new file, or one to replace)")
    parser.add_argument("--seed", type=int, default=0, help="fixes which mistakes are made (default 0)")
    args = parser.parse_args(argv)
    try:
        if args.seed < 0:
            raise UserError(f"--seed {args.seed}: must be non-negative")
        if args.out.is_dir():
            raise UserError(f"--out {args.out}: is a folder")
        if args.out.exists() and args.out.resolve() == args.jsonl.resolve():
            raise UserError(f"--out {args.out}: would overwrite the input")
        rows = gsm8k_rows(read_gsm8k(args.jsonl), args.seed)
        atomic_write(args.out, lambda f: rows.to_csv(f, index=False))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err.filename or args.out}: {err.strerror}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(rows)} rows ({rows['source'].value_counts().to_dict()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
