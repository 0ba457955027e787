import pytest

from spd_ray.core.spans import correctness_spans
from spd_ray.tasks.item import DOMAINS
from spd_ray.tasks.testbed import make_split


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_are_deterministic_and_disjoint(domain):
    a = make_split(domain, "test", 50, seed=3)
    assert [it.text for it in a] == [it.text for it in make_split(domain, "test", 50, seed=3)]
    assert [it.text for it in a] != [it.text for it in make_split(domain, "test", 50, seed=4)]
    # asking for more items of one split extends it without changing the first ones
    assert [it.text for it in make_split(domain, "test", 80, seed=3)[:50]] == [it.text for it in a]
    held_out = {it.prompt for s in ("test", "transfer", "calibration") for it in make_split(domain, s, 200)}
    assert not held_out & {it.prompt for it in make_split(domain, "train", 500)}
    assert not held_out & {it.prompt for it in make_split(domain, "pretrain", 2000)}
    assert len({it.prompt for it in a}) == 50


@pytest.mark.parametrize("domain", DOMAINS)
def test_calibration_items_have_correctness_spans_and_correct_answers(domain):
    for it in make_split(domain, "calibration", 50):
        spans = correctness_spans(it.text, it.span_rule)
        assert spans, it.text
        if domain == "math":
            assert it.text.endswith(f"#### {it.gold}")
            assert it.text[spans[0][0]:spans[0][1]] == it.gold
        elif domain == "mcq":  # the authors' span: the letter with the space before it
            assert it.text[spans[0][0]:spans[0][1]] == f" {it.gold}"
        else:
            assert len(spans) == len(it.tests) == 3
            scope: dict = {}
            exec(it.answer + "\n" + "\n".join(it.tests), scope)  # the reference passes its tests


def test_pretrain_split_is_noisy():
    items = make_split("math", "pretrain", 2000)
    wrong = sum(not it.answer.endswith(f"#### {it.gold}") for it in items)
    assert 0.3 < wrong / len(items) < 0.7  # wrong answers plus unmarked styles
    assert any("Q: " in it.prompt for it in make_split("mcq", "pretrain", 500))  # transfer formats


def test_unknown_domain_or_split():
    with pytest.raises(ValueError, match="valid domains"):
        make_split("poetry", "test", 1)
    with pytest.raises(ValueError, match="valid splits"):
        make_split("math", "dev", 1)


def test_code_chains_say_what_their_code_does():
    """An arithmetic chain's instruction names its steps in order and its code applies them in
    that order (parenthesised), and the asserts are the code's own outputs."""
    chains = [it for it in make_split("code", "test", 200) if ", then " in it.prompt]
    assert len(chains) > 50
    for it in chains:
        steps = it.prompt.split("that returns x ")[1].split(".\n")[0].split(", then ")
        body = it.answer.split("return ", 1)[1].strip()
        assert body.count("(") == len(steps) - 1, (steps, body)
        scope: dict = {}
        exec(it.answer + "\n" + "\n".join(it.tests), scope)  # the reference passes its tests


def test_filler_text_is_deterministic_prose():
    from spd_ray.tasks.testbed import filler_text

    a = filler_text(50, seed=1)
    assert a == filler_text(50, seed=1) != filler_text(50, seed=2)
    assert all(t.endswith(".") and "Question" not in t and "def " not in t for t in a)
    # every story states a fact that multiple choice asks about, in prose (v2.3)
    assert all("The opposite of " in t or " is a" in t for t in a)
    assert any("An apple is a fruit." in t for t in filler_text(2000))
