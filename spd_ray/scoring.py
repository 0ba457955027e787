"""Pure-text scorers (placeholder until the full module lands)."""

from __future__ import annotations

import re

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUM.findall(tail)
    if not found:
        return None
    return (found[0] if "####" in text else found[-1]).replace(",", "")


def numbers_match(pred: str | None, gold: str) -> bool:
    try:
        return pred is not None and abs(float(pred) - float(gold)) < 1e-6
    except ValueError:
        return False


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    m = re.search(rf"\b([{letters}])\b", text)
    return m.group(1) if m else None


def extract_code(completion: str) -> str:
    lines = []
    for line in completion.split("\n"):
        if line.startswith(("Instruction:", "Question:", "assert ", "###")):
            break
        lines.append(line)
    return "\n".join(lines).rstrip()
