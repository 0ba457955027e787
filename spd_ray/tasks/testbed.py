"""The embedded testbed: synthetic tasks in the paper's three capability domains.

Each domain mirrors a paper benchmark's format (docs/method.md, "Correctness tokens"):
- math (GSM8K): `Question: ...\nAnswer: <solution>\n#### <number>`; transfer is SVAMP-like
  (the same arithmetic in other wordings);
- mcq (MMLU): `Question: ...\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer: <letter>`; transfer is
  BBH-like (`Q: ... Options: (A) ... A: (<letter>)`);
- code (MBPP): `Instruction: ...\nYour code should pass these tests:\n<asserts>\nCode:\n<code>`;
  transfer is CodeAlpaca-like (`### Instruction: ... ### Response:`), scored by held-out
  asserts and by the NLL of the reference.

Splits: `calibration` (labeled), `train` (prompts only are used), `test` (in-domain),
`transfer`, and `pretrain` (the noisy corpus the base model learns from: mixed styles,
formatting artefacts, wrong answers and 30% transfer wordings; `filler_text` adds general prose).
Everything is generated deterministically from a seed; a prompt that appears in an evaluation
split never appears in another split. The v2 design, and why it is so: docs/testbed.md.
"""

from __future__ import annotations

import random

from spd_ray.tasks.item import DOMAINS, EVAL_SPLITS, LETTERS, SPLITS, Item

# Each split draws from its own stream so that asking for more items of one split never
# changes another split.
_SPLIT_SALT = {"calibration": 11, "train": 23, "test": 37, "transfer": 41, "pretrain": 53}
_DOMAIN_SALT = {"math": 1, "mcq": 2, "code": 3}


# ---------------------------------------------------------------------------------------
# math: GSM8K-like in-domain, SVAMP-like transfer

NAMES = ["Tom", "Ana", "Ben", "Mia", "Sam", "Lily", "Omar", "Zoe", "Raj", "Eva", "Leo", "Ivy"]
OBJECTS = ["apples", "pens", "books", "cards", "marbles", "stickers", "eggs", "shells", "coins"]
WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _math_problem(rng: random.Random) -> tuple[str, list[str], int]:
    """An arithmetic story: (kind, numbers as strings, result). Two-digit operands with carries
    and borrows, and two-step stories, so a small model gets a part of them wrong."""
    kind = rng.choice(["add", "add", "sub", "sub", "mul", "two", "two"])
    if kind == "add":
        a, b = rng.randint(12, 89), rng.randint(12, 89)
        return kind, [str(a), str(b)], a + b
    if kind == "sub":
        a = rng.randint(30, 99)
        b = rng.randint(11, a - 5)
        return kind, [str(a), str(b)], a - b
    if kind == "mul":
        a, b = rng.randint(3, 9), rng.randint(4, 19)
        return kind, [str(a), str(b)], a * b
    a, b = rng.randint(15, 60), rng.randint(12, 40)
    c = rng.randint(5, a + b - 5)
    return kind, [str(a), str(b), str(c)], a + b - c


def _math_question(kind: str, nums: list[str], name: str, obj: str, transfer: bool) -> str:
    nums = nums + [""]  # every template below is formatted; only `kind`'s is used
    if not transfer:
        return {
            "add": f"{name} has {nums[0]} {obj}. {name} buys {nums[1]} more. "
            f"How many {obj} does {name} have now?",
            "sub": f"{name} has {nums[0]} {obj}. {name} gives {nums[1]} to a friend. "
            f"How many {obj} does {name} have left?",
            "mul": f"{name} buys {nums[0]} bags with {nums[1]} {obj} in each bag. "
            f"How many {obj} does {name} buy?",
            "two": f"{name} has {nums[0]} {obj}. {name} buys {nums[1]} more and then "
            f"gives away {nums[2]}. How many {obj} does {name} have now?",
        }[kind]
    return {
        "add": f"There are {nums[0]} {obj} in a box. {name} puts {nums[1]} more {obj} "
        f"in the box. How many {obj} are in the box?",
        "sub": f"A box held {nums[0]} {obj}. {name} took {nums[1]} {obj} out of it. "
        f"How many {obj} are still in the box?",
        "mul": f"Each of {nums[0]} boxes holds {nums[1]} {obj}. How many {obj} are there "
        f"in all the boxes?",
        "two": f"A box held {nums[0]} {obj}. {name} added {nums[1]} {obj} and later "
        f"removed {nums[2]}. How many {obj} are in the box now?",
    }[kind]


def _math_solution(kind: str, nums: list[str], result: int, name: str, obj: str, style: int) -> str:
    if kind == "two":
        mid = int(nums[0]) + int(nums[1])
        work = f"{nums[0]} + {nums[1]} = {mid}. {mid} - {nums[2]} = {result}."
    else:
        op = {"add": "+", "sub": "-", "mul": "*"}[kind]
        work = f"{nums[0]} {op} {nums[1]} = {result}."
    if style == 0:  # the GSM8K format
        return f" {work}\n#### {result}"
    if style == 1:  # chatty, no marker: only the last number tells the answer
        return f" {name} counts the {obj}. {work} The answer is {result}."
    # artefact: the answer spelled out or dropped, so no scorer can read it
    spelled = WORDS[result] if 0 <= result < len(WORDS) else "many"
    return f" {work} So the answer is {spelled}."


def _make_math(rng: random.Random, split: str, idx: int) -> Item:
    kind, nums, result = _math_problem(rng)
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    transfer = split == "transfer" or (split == "pretrain" and rng.random() < 0.3)
    question = _math_question(kind, nums, name, obj, transfer)
    style = 0
    shown = result
    if split == "pretrain":
        style = rng.choices([0, 1, 2], weights=[0.6, 0.25, 0.15])[0]
        if rng.random() < 0.2:  # wrong answers, as in noisy web data
            shown = max(0, result + rng.choice([-3, -2, -1, 1, 2, 10]))
    return Item(
        id=f"math-{split}-{idx}",
        domain="math",
        split=split,
        prompt=f"Question: {question}\nAnswer:",
        answer=_math_solution(kind, nums, shown, name, obj, style),
        gold=str(result),
        span_rule="final_number",
    )


# ---------------------------------------------------------------------------------------
# mcq: MMLU-like in-domain, BBH-like transfer

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
    "animal": ["cat", "dog", "horse", "tiger", "mouse", "rabbit", "sheep", "wolf"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "ladder"],
    "country": ["France", "Japan", "Brazil", "Kenya", "Canada", "Egypt", "India", "Peru"],
}
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
             ("light", "dark"), ("happy", "sad"), ("open", "closed"), ("early", "late"),
             ("full", "empty"), ("old", "new"), ("wet", "dry"), ("high", "low")]


def _mcq_question(rng: random.Random) -> tuple[str, str, list[str]]:
    """(question, correct option, three distractors)."""
    kind = rng.choice(["category", "sum", "largest", "opposite"])
    if kind == "category":
        cat = rng.choice(list(CATEGORIES))
        others = [w for c, ws in CATEGORIES.items() if c != cat for w in ws]
        article = "an" if cat[0] in "aeiou" else "a"
        return (f"Which of the following is {article} {cat}?", rng.choice(CATEGORIES[cat]),
                rng.sample(others, 3))
    if kind == "sum":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        wrong = rng.sample([a + b + d for d in (-3, -2, -1, 1, 2, 3, 10)], 3)
        return f"What is {a} + {b}?", str(a + b), [str(w) for w in wrong]
    if kind == "largest":
        nums = rng.sample(range(1, 100), 4)
        best = max(nums)
        return "Which number is the largest?", str(best), [str(n) for n in nums if n != best]
    word, opposite = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    pool = [w for pair in OPPOSITES for w in pair if w not in (word, opposite)]
    return f"What is the opposite of {word}?", opposite, rng.sample(pool, 3)


def _make_mcq(rng: random.Random, split: str, idx: int) -> Item:
    question, correct, distractors = _mcq_question(rng)
    options = distractors + [correct]
    rng.shuffle(options)
    gold = LETTERS[options.index(correct)]
    shown = gold
    if split == "pretrain" and rng.random() < 0.15:
        shown = rng.choice([c for c in LETTERS if c != gold])
    transfer = split == "transfer" or (split == "pretrain" and rng.random() < 0.3)
    if transfer:
        listing = "\n".join(f"({c}) {o}" for c, o in zip(LETTERS, options))
        prompt, answer = f"Q: {question}\nOptions:\n{listing}\nA:", f" ({shown})"
    else:
        listing = "\n".join(f"{c}. {o}" for c, o in zip(LETTERS, options))
        prompt, answer = f"Question: {question}\n{listing}\nAnswer:", f" {shown}"
    return Item(id=f"mcq-{split}-{idx}", domain="mcq", split=split, prompt=prompt,
                answer=answer, gold=gold, span_rule="answer_letter")


# ---------------------------------------------------------------------------------------
# code: MBPP-like in-domain, CodeAlpaca-like transfer

FUNC_NAMES = ["solve", "compute", "transform", "helper", "calc", "process", "apply_rule",
              "get_value", "func", "convert", "handle", "evaluate"]
# family -> (instruction, CodeAlpaca-style instruction, body, argument kind)
CODE_FAMILIES = {
    "add": ("returns x plus {c}", "takes a number x and gives back x increased by {c}",
            "return x + {c}", "int"),
    "mul": ("returns x times {c}", "takes a number x and gives back x multiplied by {c}",
            "return x * {c}", "int"),
    "sub": ("returns x minus {c}", "takes a number x and gives back x decreased by {c}",
            "return x - {c}", "int"),
    "square": ("returns the square of x", "takes a number x and gives back x squared",
               "return x * x", "int"),
    "even": ("returns True if x is even", "takes a number x and tells whether it is even",
             "return x % 2 == 0", "int"),
    "max": ("returns the largest element of the list x",
            "takes a list x and gives back its biggest item", "return max(x)", "list"),
    "min": ("returns the smallest element of the list x",
            "takes a list x and gives back its smallest item", "return min(x)", "list"),
    "sum": ("returns the sum of the list x", "takes a list x and adds up its items",
            "return sum(x)", "list"),
    "reverse": ("returns the string x reversed", "takes a string x and gives it back reversed",
                "return x[::-1]", "str"),
    "upper": ("returns the string x in upper case",
              "takes a string x and gives it back in capitals", "return x.upper()", "str"),
    "count": ("returns how many times '{ch}' occurs in the string x",
              "takes a string x and counts the letter '{ch}' in it", "return x.count('{ch}')",
              "str"),
    # two-step families: the ones a small model gets wrong most often
    "affine": ("returns x times {c} plus {d}", "takes a number x, multiplies it by {c} and adds {d}",
               "return x * {c} + {d}", "int"),
    "clip": ("returns the smaller of x and {c}", "takes a number x and caps it at {c}",
             "return min(x, {c})", "int"),
    "scale": ("returns the list x with every element multiplied by {c}",
              "takes a list x and multiplies each of its items by {c}",
              "return [v * {c} for v in x]", "list"),
    "count_even": ("returns how many even numbers the list x contains",
                   "takes a list x and counts its even items",
                   "return sum(1 for v in x if v % 2 == 0)", "list"),
    "ends": ("returns the sum of the first and last elements of the list x",
             "takes a list x and adds its first item to its last item", "return x[0] + x[-1]",
             "list"),
    "rev_upper": ("returns the string x reversed and in upper case",
                  "takes a string x and gives it back reversed, in capitals",
                  "return x[::-1].upper()", "str"),
    "repeat": ("returns the string x repeated {c} times",
               "takes a string x and gives back {c} copies of it joined together",
               "return x * {c}", "str"),
}
_STRINGS = ["abc", "hello", "banana", "code", "level", "apple", "data", "python", "aardvark"]


def _code_args(rng: random.Random, kind: str) -> list:
    if kind == "int":
        return rng.sample(range(-5, 30), 3)
    if kind == "list":
        return [rng.sample(range(0, 50), rng.randint(2, 5)) for _ in range(3)]
    return rng.sample(_STRINGS, 3)


_CHAIN_OPS = {"+": ("plus", "adds {c} to it"), "-": ("minus", "subtracts {c} from it"),
              "*": ("times", "multiplies it by {c}")}


def _code_chain(rng: random.Random) -> tuple[str, str, str]:
    """Three to six arithmetic steps applied in order: (instruction, CodeAlpaca-style
    instruction, body). The steps compose, so each must be read and written in its place: a small
    model gets part of them wrong, which keeps code below its ceiling (v2.1's two to four steps
    left code's test split at 0.85: docs/testbed.md, v2.2)."""
    steps = [(rng.choice("+-*"), rng.randint(2, 9)) for _ in range(rng.choice([3, 4, 5, 6]))]
    expr = f"x {steps[0][0]} {steps[0][1]}"
    for op, c in steps[1:]:
        expr = f"({expr}) {op} {c}"
    words = ", then ".join(f"{_CHAIN_OPS[op][0]} {c}" for op, c in steps)
    alpaca = ", then ".join(_CHAIN_OPS[op][1].format(c=c) for op, c in steps)
    return f"returns x {words}", f"takes a number x, {alpaca}", f"return {expr}"


def _code_task(rng: random.Random) -> tuple[str, str, str, str]:
    """(instruction, CodeAlpaca-style instruction, body, argument kind): 40% single-family
    functions, 60% arithmetic chains."""
    if rng.random() < 0.6:
        return (*_code_chain(rng), "int")
    family = rng.choice(list(CODE_FAMILIES))
    instruction, alpaca, body, arg_kind = CODE_FAMILIES[family]
    params = {"c": rng.randint(2, 12), "d": rng.randint(1, 9), "ch": rng.choice("abelnop")}
    return (instruction.format(**params), alpaca.format(**params), body.format(**params), arg_kind)


def _make_code(rng: random.Random, split: str, idx: int) -> Item:
    instruction, alpaca, body, arg_kind = _code_task(rng)
    name = rng.choice(FUNC_NAMES)
    scope: dict = {}
    exec(f"def {name}(x):\n    {body}", scope)  # our own reference code: computes the asserts
    tests = [f"assert {name}({a!r}) == {scope[name](a)!r}" for a in _code_args(rng, arg_kind)]
    shown_body = body
    if split == "pretrain":
        if rng.random() < 0.3:  # wrong programs: another task's body
            shown_body = _code_task(rng)[2]
        if rng.random() < 0.3:  # style variation
            shown_body = f"result = {shown_body[len('return '):]}\n    return result"
    # the prompt ends with the newline: byte-level BPEs (Qwen2's) merge ":\n" into one token, so a
    # prompt ending in ":" would stop mid-token and look unlike anything seen in training
    code = f"def {name}(x):\n    {shown_body}\n"
    transfer = split == "transfer" or (split == "pretrain" and rng.random() < 0.3)
    if transfer:
        prompt = (f"### Instruction:\nCreate a Python function called {name} that "
                  f"{alpaca}.\n### Response:\n")
    else:
        prompt = (f"Instruction: Write a function {name}(x) that {instruction}."
                  f"\nYour code should pass these tests:\n" + "\n".join(tests) + "\nCode:\n")
    return Item(id=f"code-{split}-{idx}", domain="code", split=split, prompt=prompt,
                answer=code, tests=tests, span_rule="asserts")


# ---------------------------------------------------------------------------------------
# general text: the filler of the base model's corpus, in no domain

PLACES = ["market", "park", "school", "river", "library", "station", "garden", "beach"]
FEELINGS = ["happy", "tired", "calm", "excited", "hungry", "curious", "late", "quiet"]


def _fact(rng: random.Random) -> str:
    """One fact of the kind multiple choice asks about (a word's category, a word's opposite), as
    plain prose states it: a pretrained model meets world knowledge in text, not only in tests."""
    if rng.random() < 0.5:
        word, opposite = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            word, opposite = opposite, word
        return f"The opposite of {word} is {opposite}."
    cat = rng.choice(list(CATEGORIES))
    word = rng.choice(CATEGORIES[cat])
    if cat in ("country", "color"):
        return f"{word[0].upper() + word[1:]} is a {cat}."
    article = "an" if cat[0] in "aeiou" else "a"
    return f"{'An' if word[0] in 'aeiou' else 'A'} {word} is {article} {cat}."


def filler_text(n: int, seed: int = 0) -> list[str]:
    """`n` short stories in plain prose, like the general text a pretrained model also reads:
    they share words with every domain (names, objects, numbers), state one or two facts that
    multiple choice asks about (v2.3, docs/testbed.md) and ask nothing."""
    rng = random.Random(seed * 1_000_003 + 97)
    out = []
    for _ in range(n):
        name, other = rng.sample(NAMES, 2)
        obj, place, feeling = rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(FEELINGS)
        sentences = [
            f"{name} went to the {place} with {rng.randint(2, 30)} {obj}.",
            f"{other} was {feeling} that day.",
            f"They talked about {rng.choice(list(CATEGORIES))}s and {rng.choice(OBJECTS)}.",
            f"Later {name} wrote a short program and felt {rng.choice(FEELINGS)}.",
            f"The {place} was {rng.choice([a for pair in OPPOSITES for a in pair])} in the evening.",
        ]
        rng.shuffle(sentences)
        story = sentences[: rng.randint(2, 5)] + [_fact(rng) for _ in range(rng.randint(1, 2))]
        rng.shuffle(story)
        out.append(" ".join(story))
    return out


_MAKERS = {"math": _make_math, "mcq": _make_mcq, "code": _make_code}


def _held_out_prompts(domain: str, seed: int, n: int) -> set[str]:
    out: set[str] = set()
    for split in (*EVAL_SPLITS, "calibration"):
        rng = random.Random(_stream_seed(domain, split, seed))
        out.update(_MAKERS[domain](rng, split, i).prompt for i in range(n))
    return out


def _stream_seed(domain: str, split: str, seed: int) -> int:
    return seed * 1_000_003 + _DOMAIN_SALT[domain] * 1009 + _SPLIT_SALT[split]


def make_split(domain: str, split: str, n: int, seed: int = 0, held_out: int = 1000) -> list[Item]:
    """`n` items of one split, deterministic in (domain, split, seed).

    Evaluation and calibration splits are de-duplicated; `train` and `pretrain` skip every
    prompt of the first `held_out` items of the test, transfer and calibration splits.
    """
    if domain not in _MAKERS:
        raise ValueError(f"unknown testbed domain {domain!r}; valid domains: {list(DOMAINS)}")
    if split not in _SPLIT_SALT:
        raise ValueError(f"unknown testbed split {split!r}; valid splits: {list(SPLITS)}")
    rng = random.Random(_stream_seed(domain, split, seed))
    skip = _held_out_prompts(domain, seed, held_out) if split in ("train", "pretrain") else set()
    items: list[Item] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"testbed {domain}/{split}: cannot draw {n} distinct items")
        item = _MAKERS[domain](rng, split, len(items))
        if item.prompt in skip or (split != "pretrain" and item.prompt in seen):
            continue
        seen.add(item.prompt)
        items.append(item)
    return items
