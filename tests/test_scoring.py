import pytest

from spd_ray.tasks.scoring import (
    extract_choice,
    extract_code,
    extract_number,
    numbers_match,
    score_choice,
    score_exact,
    score_math,
    score_normalized,
    score_regex,
)


@pytest.mark.parametrize(
    "text, number",
    [
        (" 3 + 5 = 8.\n#### 8", "8"),
        ("#### 1,234", "1234"),
        ("#### $1,234,567.", "1234567"),
        ("#### -5", "-5"),
        ("#### 7.50", "7.5"),
        ("#### 8.0", "8"),
        ("#### 0.0", "0"),
        ("#### .5", "0.5"),
        ("first #### 3 then #### 4 and 9", "4"),  # the last marker wins, its first number
        ("#### 12\n\nQuestion: Tom has 3 apples", "12"),  # the model went on with a new question
        ("The answer is 12.", "12"),
        ("5 + 7 = 12. So 12 apples.", "12"),
        ("It dropped by -3 degrees", "-3"),
        ("pages 3-5", "5"),  # a hyphen between numbers is not a sign
        ("1,2,3", "3"),  # not a thousands separator
        ("no number at all", None),
        ("#### none", None),
        ("", None),
    ],
)
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize(
    "pred, gold, same",
    [
        ("8", "8", True),
        ("8", "8.0", True),
        ("1234", "1,234", True),
        ("0.5", ".5", True),
        ("-5", "-5", True),
        ("7", "8", False),
        (None, "8", False),
        ("5", "-5", False),
        ("0.1", "0.1000000001", True),
    ],
)
def test_numbers_match(pred, gold, same):
    assert numbers_match(pred, gold) is same


@pytest.mark.parametrize(
    "text, letter",
    [
        (" B", "B"),
        ("B.", "B"),
        ("(D)", "D"),
        (" C) slow", "C"),
        ("C", "C"),
        (" **A**", "A"),
        ("answer: C", "C"),
        ("Answer: (B)", "B"),
        ("The answer is A", "A"),
        ("The correct answer is D.", "D"),
        (" (B)\nQuestion: next\nAnswer: C", "B"),  # the first answer, not the next question's
        (" A car is fast. The answer is C", "C"),  # "A car": an article, not an answer
        ("none", None),
        (" E", None),
        ("", None),
        ("The answer is a trick", None),
        ("Cats", None),
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_extract_choice_other_letters():
    assert extract_choice(" E", letters="ABCDE") == "E"
    assert extract_choice(" (J)", letters="ABCDEFGHIJ") == "J"


@pytest.mark.parametrize(
    "completion, code",
    [
        ("\ndef f(x):\n    return x\nInstruction: Write more", "def f(x):\n    return x"),
        ("Sure:\n```python\ndef f(x):\n    return 1\n```\nbye", "def f(x):\n    return 1"),
        ("```\ndef f(x):\n    return 2", "def f(x):\n    return 2"),  # an unclosed fence
        ("def f(x):\n    return x\nassert f(1) == 1", "def f(x):\n    return x"),
        ("def f(x):\n\n    return x\n\n\nprint('junk')", "def f(x):\n\n    return x"),
        ("def f(x):\n    return x\n### Instruction:\nnext", "def f(x):\n    return x"),
    ],
)
def test_extract_code(completion, code):
    assert extract_code(completion) == code


def test_score_helpers():
    assert score_math("3 + 4 = 7\n#### 7", "7") and not score_math("#### 8", "7")
    assert (
        score_choice(" C. Paris", "C") and score_choice(" C", "(C)") and not score_choice(" A", "C")
    )


@pytest.mark.parametrize(
    "completion, gold, correct",
    [
        (" Paris", "Paris", True),
        (" Paris.\nQuestion: and Rome?", "Paris", True),  # cut at the clause end, first line
        (" It is in France, so the answer is Paris. Next", "Paris", True),
        (" paris", "Paris", False),  # strict: case counts (normalized would take it)
        (" (B)", "B", False),
        (" 3.5 apples", "3.5", False),
        ("", "Paris", False),
    ],
)
def test_score_exact_is_strict(completion, gold, correct):
    assert score_exact(completion, gold) is correct


def test_exact_and_normalized_differ_on_case_and_options():
    assert score_normalized(" paris", "Paris") and not score_exact(" paris", "Paris")
    assert score_normalized(" B.", "(B)") and not score_exact(" B.", "(B)")


@pytest.mark.parametrize(
    "completion, gold, correct",
    [
        (" Final: Yes\nQ: next\nFinal: No", "yes", True),  # the first match, normalized
        (" Final: No\nQ: next\nFinal: Yes", "yes", False),  # later matches are made-up questions'
        (" Final: Yes.", "yes", True),
        (" Yes", "yes", False),  # no match: wrong
        (" Final: nothing", "yes", False),
    ],
)
def test_score_regex(completion, gold, correct):
    assert score_regex(completion, gold, r"Final: *(\w+)") is correct


def test_score_regex_group_outside_the_match_is_wrong():
    assert not score_regex(" None", "none", r"Final: (\w+)|None")
