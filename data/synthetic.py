"""The embedded default dataset: grade-school word problems with worked solutions, half of them wrong.

Each problem is a short program of arithmetic steps. A solution shows one sentence per step ("... so
3 * 12 = 36 pens.") and ends with "The answer is 36." An incorrect solution carries one realistic mistake,
and every later step works on from the flawed value, as a real solver's would:
- slip:      one step's result is miscalculated (7 * 8 = 54);
- operation: one step uses the wrong operation (3 + 12 where 3 * 12 was meant), its arithmetic right;
- dropped:   one step is left out (a purchase forgotten, weeks never turned into days);
- final:     the work is right but the final answer disagrees with it.
Same seed, same rows. `write_default` writes the committed sample under data/default/.
"""

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

# A final answer at odds with the work is the one kind SmolLM2-135M learns from the few hundred rows a 2-core CPU
# trains in minutes (bench/RESULTS.md); slips, wrong operations and dropped steps need thousands of rows, so
# they stay a small share that keeps the task from being only that.
MISTAKE_SHARES = {"slip": 0.05, "operation": 0.05, "dropped": 0.05, "final": 0.85}
MAX_VALUE = 999  # every number shown stays within three digits

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
TRAIN_ROWS, TRAIN_SEED = 4000, 1
TEST_ROWS, TEST_SEED = 300, 2

WRONG_OPERATIONS = {"+": ("-", "*"), "-": ("+",), "*": ("+",), "/": ("*", "-")}


@dataclass(frozen=True)
class R:
    """The result of an earlier step, by index."""

    step: int


Operand = int | R


@dataclass(frozen=True)
class Step:
    """One line of work: `a op b`, told by `say` ({calc} is "a op b = c"; {a}, {b}, {c} are the values).

    `keep` names the operand (0 for a, 1 for b) that stands in for the result when the step is dropped;
    None where no solver would plausibly skip it.
    """

    op: str
    a: Operand
    b: Operand
    say: str
    keep: int | None = None


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Mistake:
    kind: str  # a key of MISTAKE_SHARES
    step: int  # the step it touches (for "final", the last)
    value: int | str = 0  # slip: the wrong result; operation: the wrong operator; final: the claimed answer


@dataclass(frozen=True)
class Example:
    question: str
    solution: str
    answer: int
    true_answer: int
    mistake: str | None  # None for a correct solution
    group: int


def apply(op: str, a: int, b: int) -> int | None:
    """`a op b` when it is a whole number in 1..MAX_VALUE, else None."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    elif a % b:
        return None
    else:
        c = a // b
    return c if 0 < c <= MAX_VALUE else None


Line = tuple[str, int, int, int]  # op, a, b, c as a solution shows them


def work(problem: Problem, mistake: Mistake | None = None) -> tuple[list[Line | None], int] | None:
    """Each step as shown (None where dropped) and the result of the last step, with the mistake made;
    None if a value leaves 1..MAX_VALUE or a division is not whole."""
    results: list[int] = []
    shown: list[Line | None] = []
    for i, step in enumerate(problem.steps):
        a, b = (results[x.step] if isinstance(x, R) else x for x in (step.a, step.b))
        here = mistake if mistake is not None and mistake.step == i else None
        if here and here.kind == "dropped":
            results.append((a, b)[step.keep])
            shown.append(None)
            continue
        op = here.value if here and here.kind == "operation" else step.op
        c = apply(op, a, b)
        if c is None:
            return None
        if here and here.kind == "slip":
            c = here.value
        results.append(c)
        shown.append((op, a, b, c))
    return shown, results[-1]


def write_solution(problem: Problem, shown: list[Line | None], answer: int) -> str:
    lines = []
    for step, line in zip(problem.steps, shown):
        if line is None:
            continue
        op, a, b, c = line
        lines.append(step.say.format(calc=f"{a} {op} {b} = {c}", a=a, b=b, c=c))
    lines.append(f"The answer is {answer}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Problem families. Each draws numbers so that the correct work stays whole and within range.

NAMES = [
    ("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("David", "he"), ("Emma", "she"), ("Finn", "he"),
    ("Grace", "she"), ("Hugo", "he"), ("Isla", "she"), ("Jack", "he"), ("Kira", "she"), ("Leo", "he"),
    ("Maya", "she"), ("Noah", "he"), ("Olivia", "she"), ("Omar", "he"), ("Priya", "she"), ("Ravi", "he"),
    ("Sara", "she"), ("Tom", "he"), ("Uma", "she"), ("Victor", "he"), ("Wendy", "she"), ("Yusuf", "he"),
]
SELF = {"she": "herself", "he": "himself"}


def person(rng: random.Random, avoid: tuple[str, ...] = ()) -> tuple[str, str, str]:
    """A name, its pronoun and its reflexive pronoun."""
    name, pronoun = rng.choice([n for n in NAMES if n[0] not in avoid])
    return name, pronoun, SELF[pronoun]


def names(rng: random.Random, n: int) -> list[str]:
    """n different names."""
    chosen: list[str] = []
    for _ in range(n):
        chosen.append(person(rng, tuple(chosen))[0])
    return chosen


def packs(rng: random.Random) -> Problem:
    name, he, _ = person(rng)
    item = rng.choice(["pens", "stickers", "marbles", "cards", "crayons", "balloons", "candies"])
    n, k = rng.randint(2, 9), rng.randint(3, 12)
    g = rng.randint(2, n * k - 2)
    steps = [
        Step("*", n, k, f"{name} buys {{a}} packs of {{b}} {item}, so {{calc}} {item}."),
        Step("-", R(0), g, f"After giving away {{b}}, {he} has {{calc}} {item}.", keep=0),
    ]
    question = (
        f"{name} buys {n} packs of {item} with {k} {item} in each pack. "
        f"{he.capitalize()} gives {g} {item} to a friend."
    )
    if rng.random() < 0.5:
        m = rng.randint(2, 30)
        steps.append(Step("+", R(1), m, f"Then {he} buys {{b}} more, so {{calc}} {item}.", keep=0))
        question += f" Then {he} buys {m} more {item}."
    return Problem(question + f" How many {item} does {name} have now?", tuple(steps))


def change(rng: random.Random) -> Problem:
    name, he, _ = person(rng)
    item, extra = rng.sample(["notebook", "sandwich", "toy car", "ball", "comic", "mug", "kite"], 2)
    n, p, q = rng.randint(2, 8), rng.randint(2, 15), rng.randint(2, 20)
    bill = next(b for b in (20, 50, 100, 200) if b > n * p + q)
    steps = (
        Step("*", n, p, f"The {item}s cost {{calc}} dollars."),
        Step("+", R(0), q, f"With the {extra}, {he} spends {{calc}} dollars.", keep=0),
        Step("-", bill, R(1), "The change is {calc} dollars.", keep=1),
    )
    question = (
        f"{name} buys {n} {item}s for ${p} each and a {extra} for ${q}. "
        f"{he.capitalize()} pays with a ${bill} bill. How much change does {he} get?"
    )
    return Problem(question, steps)


def reading(rng: random.Random) -> Problem:
    name, he, _ = person(rng)
    weeks, per_day = rng.randint(2, 4), rng.randint(3, 15)
    steps = [
        Step("*", weeks, 7, "There are {calc} days in {a} weeks.", keep=0),
        Step("*", R(0), per_day, f"{name} reads {{calc}} pages."),
    ]
    question = f"{name} reads {per_day} pages every day."
    read = weeks * 7 * per_day
    if rng.random() < 0.5 and read < 900:
        book = read + rng.randint(10, min(200, MAX_VALUE - read))
        steps.append(Step("-", book, R(1), "So {calc} pages are left.", keep=1))
        question += f" {he.capitalize()} is reading a {book}-page book."
        question += f" How many pages are left after {weeks} weeks?"
        return Problem(question, tuple(steps))
    return Problem(question + f" How many pages does {he} read in {weeks} weeks?", tuple(steps))


def factory(rng: random.Random) -> Problem:
    machine = rng.choice(["machine", "robot", "bakery oven", "printer"])
    item = {"machine": "toys", "robot": "boxes", "bakery oven": "loaves", "printer": "posters"}[machine]
    box = rng.randint(2, 6)
    rate, hours, days = box * rng.randint(1, 4), rng.randint(2, 6), rng.randint(2, 5)
    steps = [
        Step("*", rate, hours, f"Each day it makes {{calc}} {item}.", keep=0),
        Step("*", R(0), days, f"In {{b}} days it makes {{calc}} {item}."),
    ]
    question = f"A {machine} makes {rate} {item} every hour and runs {hours} hours a day."
    if rng.random() < 0.5:
        steps.append(Step("/", R(1), box, "That fills {calc} crates.", keep=0))
        question += f" The {item} are packed in crates of {box}. How many crates are filled in {days} days?"
        return Problem(question, tuple(steps))
    return Problem(question + f" How many {item} does it make in {days} days?", tuple(steps))


def sharing(rng: random.Random) -> Problem:
    name, he, himself = person(rng)
    item = rng.choice(["apples", "cookies", "shells", "beads", "grapes", "coins"])
    each, friends = rng.randint(2, 12), rng.randint(2, 8)
    if rng.random() < 0.5:
        kept = rng.randint(1, 15)
        total = each * friends + kept
        steps = (
            Step("-", total, kept, f"After keeping {{b}}, {he} has {{calc}} {item} to share.", keep=0),
            Step("/", R(0), friends, f"Each friend gets {{calc}} {item}."),
        )
        question = (
            f"{name} has {total} {item}. {he.capitalize()} keeps {kept} for {himself} and shares the rest "
            f"equally among {friends} friends. How many {item} does each friend get?"
        )
        return Problem(question, steps)
    size = rng.choice([k for k in range(2, 13) if (each * friends) % k == 0 and k < each * friends])
    bags = each * friends // size
    steps = (
        Step("*", bags, size, f"{name} has {{calc}} {item}."),
        Step("/", R(0), friends, f"Each friend gets {{calc}} {item}."),
    )
    question = (
        f"{name} has {bags} bags with {size} {item} in each bag. {he.capitalize()} shares them equally "
        f"among {friends} friends. How many {item} does each friend get?"
    )
    return Problem(question, steps)


def ages(rng: random.Random) -> Problem:
    a, b, c = names(rng, 3)
    x, times = rng.randint(3, 15), rng.randint(2, 4)
    younger = rng.randint(1, x * times - 2)
    steps = [
        Step("*", x, times, f"{b} is {{calc}} years old."),
        Step("-", R(0), younger, f"{c} is {{calc}} years old.", keep=0),
    ]
    question = f"{a} is {x} years old. {b} is {times} times as old as {a}."
    question += f" {c} is {younger} years younger than {b}."
    if rng.random() < 0.5:
        later = rng.randint(2, 10)
        steps.append(Step("+", R(1), later, f"In {{b}} years, {c} will be {{calc}}.", keep=0))
        return Problem(question + f" How old will {c} be in {later} years?", tuple(steps))
    return Problem(question + f" How old is {c}?", tuple(steps))


def wages(rng: random.Random) -> Problem:
    name, he, _ = person(rng)
    thing = rng.choice(["a game", "shoes", "a jacket", "books", "a gift"])
    wage, monday, tuesday = rng.randint(5, 15), rng.randint(2, 6), rng.randint(2, 6)
    earned = wage * (monday + tuesday)
    spent = rng.randint(5, earned - 5)
    steps = (
        Step("+", monday, tuesday, f"{name} works {{calc}} hours.", keep=0),
        Step("*", R(0), wage, f"{he.capitalize()} earns {{calc}} dollars."),
        Step("-", R(1), spent, f"After buying {thing}, {he} has {{calc}} dollars left.", keep=0),
    )
    question = (
        f"{name} earns ${wage} an hour. {he.capitalize()} works {monday} hours on Monday and {tuesday} hours "
        f"on Tuesday. Then {he} spends ${spent} on {thing}. How much money does {he} have left?"
    )
    return Problem(question, steps)


def travel(rng: random.Random) -> Problem:
    vehicle = rng.choice(["car", "bus", "train", "truck"])
    v1, t1, v2, t2 = rng.randint(20, 70), rng.randint(2, 5), rng.randint(20, 70), rng.randint(2, 4)
    steps = (
        Step("*", v1, t1, "First it goes {calc} miles."),
        Step("*", v2, t2, "Then it goes {calc} miles."),
        Step("+", R(0), R(1), "In all it travels {calc} miles."),
    )
    question = (
        f"A {vehicle} travels at {v1} miles per hour for {t1} hours and then at {v2} miles per hour for "
        f"{t2} hours. How many miles does it travel in all?"
    )
    return Problem(question, steps)


def savings(rng: random.Random) -> Problem:
    name, he, _ = person(rng)
    item = rng.choice(["bike", "tablet", "guitar", "scooter", "camera"])
    weekly, weeks, has = rng.randint(3, 25), rng.randint(2, 12), rng.randint(5, 80)
    price = has + weekly * weeks
    steps = (
        Step("-", price, has, f"{name} still needs {{calc}} dollars.", keep=0),
        Step("/", R(0), weekly, "That takes {calc} weeks."),
    )
    question = (
        f"{name} wants a {item} that costs ${price}. {he.capitalize()} has ${has} and saves ${weekly} each "
        f"week. How many weeks will it take to have enough?"
    )
    return Problem(question, steps)


def garden(rng: random.Random) -> Problem:
    name, _, _ = person(rng)
    plant = rng.choice(["tulips", "tomato plants", "roses", "carrots", "sunflowers"])
    rows, per_row = rng.randint(3, 12), rng.randint(4, 15)
    died, planted = rng.randint(2, rows * per_row // 2), rng.randint(3, 25)
    steps = (
        Step("*", rows, per_row, f"At first there are {{calc}} {plant}."),
        Step("-", R(0), died, "After {b} die, {calc} are left.", keep=0),
        Step("+", R(1), planted, f"With {{b}} new ones, there are {{calc}} {plant}.", keep=0),
    )
    question = (
        f"A garden has {rows} rows with {per_row} {plant} in each row. {died} of them die, and {name} plants "
        f"{planted} new ones. How many {plant} are in the garden now?"
    )
    return Problem(question, steps)


def collections(rng: random.Random) -> Problem:
    a, b, c = names(rng, 3)
    item = rng.choice(["stamps", "shells", "coins", "rocks", "badges"])
    x, times = rng.randint(4, 30), rng.randint(2, 4)
    fewer = rng.randint(1, x * times - 1)
    steps = (
        Step("*", x, times, f"{b} has {{calc}} {item}."),
        Step("-", R(0), fewer, f"{c} has {{calc}} {item}."),
        Step("+", x, R(0), f"{a} and {b} have {{calc}} {item}."),
        Step("+", R(2), R(1), f"All three have {{calc}} {item}.", keep=0),
    )
    question = (
        f"{a} has {x} {item}. {b} has {times} times as many as {a}, and {c} has {fewer} fewer than {b}. "
        f"How many {item} do they have altogether?"
    )
    return Problem(question, steps)


def school(rng: random.Random) -> Problem:
    classes, team, teams = rng.randint(3, 9), rng.randint(2, 6), rng.randint(5, 40)
    present = team * teams
    per_class = -(-present // classes) + rng.randint(0, 5)
    absent = classes * per_class - present
    if absent < 1:
        per_class += 1
        absent += classes
    steps = (
        Step("*", classes, per_class, "The school has {calc} students."),
        Step("-", R(0), absent, "Today {calc} students are present.", keep=0),
        Step("/", R(1), team, "They make {calc} teams."),
    )
    question = (
        f"A school has {classes} classes with {per_class} students in each class. "
        f"{absent} students are absent today. The rest are put into teams of {team}. "
        "How many teams are there?"
    )
    return Problem(question, steps)


FAMILIES: dict[str, Callable[[random.Random], Problem]] = {
    f.__name__: f
    for f in (packs, change, reading, factory, sharing, ages, wages, travel, savings, garden, collections,
              school)
}


# ---------------------------------------------------------------------------------------------------------
# Mistakes


def slipped(c: int, rng: random.Random) -> int:
    """A plausible miscalculation of c: off by one or two, by ten or a hundred, or two digits swapped."""
    options = {c + d for d in (-2, -1, 1, 2, -10, 10)}
    if c >= 100:
        options |= {c - 100, c + 100}
    digits = str(c)
    swapped = digits[:-2] + digits[-1:] + digits[-2:-1]
    if len(digits) >= 2 and not swapped.startswith("0"):
        options.add(int(swapped))
    return rng.choice(sorted(v for v in options if 0 < v <= MAX_VALUE and v != c))


def draw_mistake(kind: str, problem: Problem, correct: list[Line], rng: random.Random) -> Mistake:
    last = len(problem.steps) - 1
    if kind == "slip":
        step = rng.randrange(len(problem.steps))
        return Mistake(kind, step, slipped(correct[step][3], rng))
    if kind == "operation":
        step = rng.randrange(len(problem.steps))
        return Mistake(kind, step, rng.choice(WRONG_OPERATIONS[problem.steps[step].op]))
    if kind == "dropped":
        return Mistake(kind, rng.choice([i for i, s in enumerate(problem.steps) if s.keep is not None]))
    # final: the work is right, the stated answer is another number from the work or a slip of the answer
    answer = correct[last][3]
    elsewhere = {v for line in correct[:-1] for v in (line[1], line[2], line[3])} - {answer}
    if elsewhere and rng.random() < 0.5:
        return Mistake(kind, last, rng.choice(sorted(elsewhere)))
    return Mistake(kind, last, slipped(answer, rng))


def make_incorrect(problem: Problem, kind: str, rng: random.Random, group: int) -> Example | None:
    """The problem with one mistake of this kind, or None when a few tries find none that stays whole."""
    if kind == "dropped" and all(s.keep is None for s in problem.steps):
        return None
    correct, true_answer = work(problem)
    for _ in range(8):
        mistake = draw_mistake(kind, problem, correct, rng)
        if kind == "final":
            shown, answer = correct, int(mistake.value)
        else:
            flawed = work(problem, mistake)
            if flawed is None:
                continue
            shown, answer = flawed
        if answer != true_answer:
            solution = write_solution(problem, shown, answer)
            return Example(problem.question, solution, answer, true_answer, kind, group)
    return None


def make_correct(problem: Problem, group: int) -> Example:
    shown, answer = work(problem)
    return Example(problem.question, write_solution(problem, shown, answer), answer, answer, None, group)


def draw_incorrect(kind: str, rng: random.Random, group: int) -> tuple[Problem, Example]:
    """A problem and an incorrect solution to it with this kind of mistake."""
    for _ in range(100):
        family = FAMILIES[rng.choice(sorted(FAMILIES))]
        for _ in range(20):
            problem = family(rng)
            wrong = make_incorrect(problem, kind, rng, group)
            if wrong is not None:
                return problem, wrong
    raise RuntimeError(f"no family yields a {kind!r} mistake")


def split_counts(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Whole counts in these shares that add up to total (largest remainders get the leftovers)."""
    raw = {k: total * s for k, s in shares.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: counts[k] - raw[k])[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def generate_examples(n_rows: int, seed: int) -> list[Example]:
    """n_rows examples in shuffled order: each problem (group) once solved correctly and once with a
    mistake (for odd n_rows one problem only with the mistake); mistake kinds in MISTAKE_SHARES.

    Pairs teach from few rows: a fine-tuned SmolLM2-135M learned markedly faster from them than from
    rows whose problems appear only once.
    """
    rng = random.Random(seed)
    kinds = [k for k, n in split_counts(n_rows - n_rows // 2, MISTAKE_SHARES).items() for _ in range(n)]
    rng.shuffle(kinds)
    examples: list[Example] = []
    for group, kind in enumerate(kinds):
        problem, wrong = draw_incorrect(kind, rng, group)
        examples.append(wrong)
        if len(examples) < n_rows:
            examples.append(make_correct(problem, group))
    rng.shuffle(examples)
    return examples


def generate(n_rows: int, seed: int) -> pd.DataFrame:
    """Training rows in the competition's columns, plus `group` (one id per underlying problem)."""
    examples = generate_examples(n_rows, seed)
    return pd.DataFrame(
        {
            "question": [e.question for e in examples],
            "answer": [str(e.answer) for e in examples],
            "solution": [e.solution for e in examples],
            "is_correct": [e.mistake is None for e in examples],
            "group": [e.group for e in examples],
        }
    )


def write_default(directory: Path = DEFAULT_DIR) -> None:
    """Write the committed sample: train.csv (labelled, with group), test.csv (ID, no labels) and
    test_labels.csv (ID, is_correct)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generate(TRAIN_ROWS, TRAIN_SEED).to_csv(directory / "train.csv", index=False)
    test = generate(TEST_ROWS, TEST_SEED).drop(columns="group")
    test.insert(0, "ID", range(len(test)))
    test.drop(columns="is_correct").to_csv(directory / "test.csv", index=False)
    test[["ID", "is_correct"]].to_csv(directory / "test_labels.csv", index=False)


if __name__ == "__main__":
    write_default()
