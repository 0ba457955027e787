"""Text scorers: final number, answer letter, exact and normalized (BBH's) match of the stated
answer, a regex's capture; and the program in a completion, for the sandbox to run."""

from __future__ import annotations

import re
import string

# A number: optional sign (not a hyphen between digits, as in "3-5"), then digits with proper
# thousands separators ("1,234", but "1,2,3" is three numbers), then an optional decimal part.
_NUMBER = re.compile(r"(?:(?<![\d)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<!\d)-?\.\d+")
_CODE_STOP = re.compile(r"^(Instruction:|Question:|Your code should|###|assert\s)")
_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)  # an unclosed fence runs to the end
_STATED = re.compile(r"answer is:?\s*(.*)", re.IGNORECASE)
_CLAUSE_END = re.compile(r"[.,;:!?](?=\s|$)")  # punctuation before a space: not the dot of "3.5"
_OPTION = re.compile(r"\([A-Z]\)")  # BBH multiple-choice targets: "(A)"


def _normalize_number(text: str) -> str:
    text = text.replace(",", "").rstrip(".")
    if "." in text:  # "8.0" -> "8", "7.50" -> "7.5"
        text = text.rstrip("0").rstrip(".")
    if text.startswith("-."):
        text = "-0" + text[1:]
    elif text.startswith("."):
        text = "0" + text
    return "0" if text in ("", "-", "-0") else text


def extract_number(text: str) -> str | None:
    """The first number after the last `####` (GSM8K), else the last number in the text."""
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        return _normalize_number(found.group()) if found else None
    found = _NUMBER.findall(text)
    return _normalize_number(found[-1]) if found else None


def numbers_match(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    pred, gold = _normalize_number(pred.strip()), _normalize_number(gold.strip())
    try:
        return abs(float(pred) - float(gold)) < 1e-6
    except ValueError:  # not plain numbers: fall back to the normalised text
        return pred == gold


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The answer letter of a completion (" C", "C.", "(C)", " C) foo", "The answer is C"), or None.

    A letter opening the completion wins (a model that goes on with the next few-shot question
    would otherwise be scored on that question's "Answer: X"), except "A"/"I" followed by a
    lowercase word, which read as an article or pronoun ("A car is ...")."""
    cls = f"[{re.escape(letters)}]"
    leading = re.match(rf"[\s*(\[]*({cls})(?=[\s*).\]:,]|$)", text)
    if leading and not re.match(r"\s*[AI] [a-z]", text):
        return leading.group(1)
    stated = re.search(rf"\banswer(?: is)?\s*:?\s*[*(\[]*({cls})(?!\w)", text, re.IGNORECASE)
    if stated and stated.group(1) in letters:  # IGNORECASE also lets lowercase letters through
        return stated.group(1)
    return None


def extract_code(completion: str) -> str:
    """The program in a raw completion: the first fenced block if any, else the text up to the
    first line that leaves the code (a new instruction, a test, or two blank lines in a row)."""
    fenced = _FENCE.search(completion)
    if fenced:
        return fenced.group(1).rstrip()
    lines: list[str] = []
    for line in completion.split("\n"):
        if not lines and not line.strip():
            continue  # leading blank lines are not the "two blank lines" that end the code
        if _CODE_STOP.match(line) or (not line.strip() and lines[-1:] == [""]):
            break
        lines.append(line if line.strip() else "")
    return "\n".join(lines).rstrip()


def score_math(completion: str, gold: str) -> bool:
    return numbers_match(extract_number(completion), gold)


def score_choice(completion: str, gold_letter: str, letters: str = "ABCD") -> bool:
    return extract_choice(completion, letters) == gold_letter.strip(" ()").upper()


def extract_answer(text: str) -> str:
    """The answer of a free-form completion: what follows its first "answer is", else its first
    non-empty line; cut at the end of the first clause ("No, because ..." -> "No")."""
    stated = _STATED.search(text)
    line = stated.group(1) if stated else next((ln for ln in text.split("\n") if ln.strip()), "")
    return _CLAUSE_END.split(line, 1)[0].strip()


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation dropped, spacing collapsed: " (A)" -> "a", "True." -> "true"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def score_exact(completion: str, gold: str) -> bool:
    """Strict match: the completion's answer (`extract_answer`) is the gold, character for
    character (surrounding spaces aside)."""
    return extract_answer(completion) == gold.strip()


def score_normalized(completion: str, target: str) -> bool:
    """BBH's normalized exact match of the completion's answer against the target ("True",
    "valid", "yes"). A multiple-choice target "(B)" matches the option letter however it is
    written (" (B)", "B.", "(B) 12/14/1937"), read as `extract_choice` reads MMLU letters."""
    answer = extract_answer(completion)
    if _OPTION.fullmatch(target.strip()):
        return score_choice(answer, target, letters=string.ascii_uppercase)
    return normalize_answer(answer) == normalize_answer(target)


def score_regex(completion: str, gold: str, pattern: str) -> bool:
    """Group 1 of the FIRST match of `pattern` in the completion, normalized, against the gold:
    a raw completion runs on past its answer (into made-up next questions), so the first match
    is the model's own. No match, or group 1 not taking part in it: wrong."""
    found = re.search(pattern, completion)
    return bool(found and found.group(1) is not None
                and normalize_answer(found.group(1)) == normalize_answer(gold))
