import pytest

from spd_ray.scoring import (
    extract_choice,
    extract_code,
    extract_number,
    normalize_answer,
    numbers_match,
)


@pytest.mark.parametrize("text, number", [
    (" 3 + 5 = 8.\n#### 8", "8"),
    ("#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("#### 7.50", "7.5"),
    ("#### 8.0", "8"),
    ("first #### 3 then #### 4 and 9", "4"),  # the last marker wins, its first number
    ("The answer is 12.", "12"),
    ("5 + 7 = 12. So 12 apples.", "12"),
    ("no number at all", None),
    ("#### none", None),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_numbers_match():
    assert numbers_match("8", "8") and numbers_match("8", "8.0") and numbers_match("1234", "1,234")
    assert not numbers_match(None, "8") and not numbers_match("7", "8")


@pytest.mark.parametrize("text, letter", [
    (" B", "B"), ("B.", "B"), ("(D)", "D"), (" C) slow", "C"), ("answer: C", "C"),
    ("The answer is A", "A"), (" (B)\nQ: next", "B"), ("none", None), (" E", None), ("", None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_normalize_answer():
    assert normalize_answer("  (True). ") == "true"
    assert normalize_answer("Hello   World") == "hello world"


def test_extract_code():
    assert extract_code("\ndef f(x):\n    return x\nInstruction: Write more") == "\ndef f(x):\n    return x"
    assert extract_code("Sure:\n```python\ndef f(x):\n    return 1\n```\nbye") == "def f(x):\n    return 1"
    assert extract_code("def f(x):\n    return x\nassert f(1) == 1") == "def f(x):\n    return x"
    assert extract_code("def f(x):\n\n    return x\n\n\nprint('junk')") == "def f(x):\n\n    return x"
