"""Text scorers for the paper's benchmarks: final number, answer letter, code to execute."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CHOICE_PATTERNS = [
    re.compile(r"^\s*\(?([A-J])\)?(?:[\s.):,]|$)"),  # " C", "C.", "(C)", "C) text"
    re.compile(r"answer(?: is)?:?\s*\(?([A-J])\)?\b", re.IGNORECASE),  # "The answer is C"
]
_CODE_STOP = re.compile(r"^(Instruction:|Question:|Your code should|###|assert\s)")


def _normalize_number(text: str) -> str:
    text = text.replace(",", "").rstrip(".")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def extract_number(text: str) -> str | None:
    """The number after the last `####` (GSM8K), else the last number in the text."""
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        return _normalize_number(found.group()) if found else None
    found = _NUMBER.findall(text)
    return _normalize_number(found[-1]) if found else None


def numbers_match(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    try:
        return abs(float(pred) - float(_normalize_number(gold))) < 1e-6
    except ValueError:
        return False


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The answer letter of a completion (" C", "C.", "(C)", "The answer is C"), or None."""
    for pattern in _CHOICE_PATTERNS:
        found = pattern.search(text)
        if found and found.group(1) in letters:
            return found.group(1)
    return None


def normalize_answer(text: str) -> str:
    """BBH-style normalisation for exact match: case, spaces and wrapping punctuation."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" .,:;!?()[]\"'")


def extract_code(completion: str) -> str:
    """The program in a raw completion: a fenced block if any, else the text up to the first line
    that leaves the code (a new instruction, a test, or two blank lines)."""
    fenced = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", completion, re.DOTALL)
    if fenced:
        return fenced.group(1).rstrip()
    lines: list[str] = []
    for line in completion.split("\n"):
        if _CODE_STOP.match(line) or (not line.strip() and lines[-1:] == [""]):
            break
        lines.append("" if not line.strip() else line)
    return "\n".join(lines).rstrip()
