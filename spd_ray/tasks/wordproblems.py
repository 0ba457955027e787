"""One-step arithmetic word problems in natural language: the in-band math domain of the real
model (docs/real-model.md, which gives the pilot that chose them: SmolLM2-135M-Instruct solves
problems of two and three steps almost never, and one-step problems with small numbers about
half the time).

Two families of wording share one arithmetic (an addition or a subtraction of numbers below
ten, or a product of two numbers from 2 to 5):
- `story` (calibration, training and test rows): a person's own things ("Tom has 7 apples and
  buys 5 more. ...");
- `scene` (the transfer split): other situations, subjects and question forms (pages read, a
  bus, birds in a tree, rows of chairs, savings).
Each problem has a worked answer, `a + b = c` then `#### c` (GSM8K's form): the calibration
examples' reference answers. Everything is drawn from one `random.Random`, so a seed gives the
same problems on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# (name, subject pronoun)
PEOPLE = [(n, "she") for n in ["Ana", "Mia", "Lily", "Zoe", "Eva", "Ivy", "Nora", "Emma", "Sara", "Lena",
                                "Rosa", "Kate"]] + \
         [(n, "he") for n in ["Tom", "Ben", "Sam", "Omar", "Raj", "Leo", "Max", "Carlos", "Jack", "Luis",
                              "Noah", "Ali"]]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards",
          "coins", "balloons", "buttons", "crayons", "candies", "toy cars", "pens"]
FAMILIES = ("story", "scene")


@dataclass
class Problem:
    question: str
    answer: str  # worked: "a op b = c" then "#### c"
    gold: str
    op: str  # add, sub or mul


def _numbers(rng: random.Random, op: str) -> tuple[int, int, int, str]:
    """(a, b, result, sign) of one operation."""
    if op == "add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return a, b, a + b, "+"
    if op == "sub":
        a = rng.randint(3, 9)
        b = rng.randint(1, a - 1)
        return a, b, a - b, "-"
    a, b = rng.randint(2, 5), rng.randint(2, 5)
    return a, b, a * b, "x"


def _story(op: str, a: int, b: int, name: str, he: str, thing: str) -> str:
    return {"add": f"{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have now?",
            "sub": f"{name} had {a} {thing}. {he.capitalize()} lost {b} of them. How many {thing} "
                   f"does {name} have left?",
            "mul": f"{name} has {a} boxes. Each box holds {b} {thing}. How many {thing} does {name} "
                   "have?"}[op]


_SCENES: dict[str, list[Callable[..., str]]] = {
    "add": [lambda a, b, name: f"{name} read {a} pages on Monday and {b} pages on Tuesday. How many "
                               f"pages did {name} read in total?",
            lambda a, b, name: f"A bus has {a} people on it. At the next stop, {b} more people get on. "
                               "How many people are on the bus now?"],
    "sub": [lambda a, b, name: f"A tree in {name}'s garden has {a} birds in it. {b} birds fly away. "
                               "How many birds are still in the tree?"],
    "mul": [lambda a, b, name: f"There are {a} rows of chairs in {name}'s classroom, with {b} chairs "
                               "in each row. How many chairs are there?",
            lambda a, b, name: f"{name} saves {b} dollars every week. How many dollars does {name} "
                               f"save in {a} weeks?"],
}


def problem(rng: random.Random, family: str, op: str) -> Problem:
    """One problem of the operation `op` (add, sub, mul) in the wording of `family`."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}; valid families: {list(FAMILIES)}")
    if op not in _SCENES:
        raise ValueError(f"op={op!r}; valid operations: {list(_SCENES)}")
    a, b, result, sign = _numbers(rng, op)
    name, he = rng.choice(PEOPLE)
    if family == "story":
        question = _story(op, a, b, name, he, rng.choice(THINGS))
    else:
        question = rng.choice(_SCENES[op])(a, b, name)
    return Problem(question, f"{a} {sign} {b} = {result}\n#### {result}", str(result), op)


def problems(n: int, family: str, seed: int, exclude: set[str] = frozenset()) -> list[Problem]:
    """`n` distinct problems of `family`, the operations in turn (add, sub, mul), none whose
    question is in `exclude` (the other splits': splits never share a question)."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    ops = list(_SCENES)
    while len(out) < n:
        p = problem(rng, family, ops[len(out) % len(ops)])
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out
