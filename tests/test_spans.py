import pytest
from transformers import AutoTokenizer

from spd_ray.core.spans import (
    NO_SPAN,
    NO_TOKEN,
    TRUNCATED,
    calibration_batches,
    correctness_spans,
    label_text,
    mark_labels,
    regex_spans,
    token_mask,
)
from spd_ray.tasks.testbed import make_split


def test_rules_on_the_papers_hub_formats():
    gsm = "Question: Natalia sold 48 clips.\nAnswer: She sold 48/2 = <<48/2=24>>24 clips.\n#### 72"
    (s, e), = correctness_spans(gsm, "final_number")  # the authors': after the last '#### ', to the end
    assert gsm[s:e] == "72"
    two = "#### 1\n#### 2 apples\n"
    assert [two[s:e] for s, e in correctness_spans(two, "final_number")] == ["2 apples\n"]
    mmlu = "Question: What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B"
    (s, e), = correctness_spans(mmlu, "answer_letter")  # after the last 'Answer:', space included
    assert mmlu[s:e] == " B"
    bbh = "Q: x\nA: (B)"
    assert [bbh[s:e] for s, e in correctness_spans(bbh, "answer_letter")] == [" (B)"]
    mbpp = ("Instruction: Write a function.\nYour code should pass these tests:\n"
            "assert f(1) == 2\nassert f(2) == 3\nCode: def f(x): return x + 1")
    spans = correctness_spans(mbpp, "asserts")
    assert [mbpp[s:e] for s, e in spans] == ["assert f(1) == 2", "assert f(2) == 3"]
    assert correctness_spans("abc", "full") == [(0, 3)]
    assert correctness_spans("no marker here", "final_number") == []
    with pytest.raises(ValueError, match="valid rules"):
        correctness_spans("x", "nope")


def test_token_inside_span_rule():
    # raw offsets, no trimming: a token is labeled iff its whole span lies inside a span
    assert token_mask([(0, 7), (7, 9)], [(7, 9)]) == [False, True]
    assert token_mask([(0, 3), (3, 6), (4, 6), (6, 7), (7, 7)], [(5, 7)]) == [False, False, False, True, False]
    # a whitespace token inside counts; one that sticks out past the end (as "'\n") does not
    assert token_mask([(10, 11), (11, 13)], [(5, 12)]) == [True, False]


def _labeled(tokenizer, text, rule):
    batches, skipped = calibration_batches(tokenizer, [text], [correctness_spans(text, rule)], batch_size=1, max_length=256)
    ids, labels = batches[0]["input_ids"][0], batches[0]["labels"][0]
    return [tokenizer.decode([int(t)]) for t, lab in zip(ids, labels) if lab != -100]


@pytest.mark.parametrize("text, rule, tokens", [
    # the testbed's three domains (spd_ray/tasks/testbed.py layouts)
    ("Question: Omar has 3 books. Omar buys 31 more. How many books does Omar have now?\nAnswer: "
     "3 + 31 = 34.\n#### 34", "final_number", ["3", "4"]),
    ("Question: What is the opposite of early?\nA. down\nB. old\nC. late\nD. closed\nAnswer: C",
     "answer_letter", [" C"]),
    ("Instruction: Write a function process(x) that returns True if x is even.\nYour code should pass "
     "these tests:\nassert process(3) == False\nassert process(12) == True\nCode:\ndef process(x):\n"
     "    return x % 2 == 0\n", "asserts",
     ["assert", " process", "(", "3", ")", " ==", " False", "assert", " process", "(", "1", "2", ")", " ==",
      " True"]),
    # the hub formats: GSM8K (thousands separator), MMLU, MBPP with a string assert whose last
    # token "'\n" sticks out of the span and whose spaces before numbers are tokens of their own
    ("Question: How many corn plants?\nAnswer: 3 * 450 = <<3*450=1350>>1,350 corn plants.\n#### 1,350",
     "final_number", ["1", ",", "3", "5", "0"]),
    ("Question: Which property of a mineral?\nA. luster\nB. mass\nC. weight\nD. hardness\nAnswer: A",
     "answer_letter", [" A"]),
    ("Instruction: Reverse a string.\nYour code should pass these tests:\nassert f('ab') == 'ba'\n"
     "assert f((1, 2)) == 3\nCode: def f(s): return s[::-1]", "asserts",
     ["assert", " f", "('", "ab", "')", " ==", " '", "ba",  # not "'\n"
      "assert", " f", "((", "1", ",", " ", "2", ")", ")", " ==", " ", "3"]),  # v2.2's BPE merges "(("
])
def test_labeled_tokens_per_domain_and_hub_format(testbed_tokenizer, text, rule, tokens):
    assert _labeled(testbed_tokenizer, text, rule) == tokens


def test_labels_from_a_real_fast_tokenizer(testbed_tokenizer):
    texts = ["Question: 1 + 2?\nAnswer: 1 + 2 = 3.\n#### 3", "Question: x\nA. a\nB. b\nAnswer: B",
             "no correctness span at all"]
    rules = ["final_number", "answer_letter", "final_number"]
    batches, skipped = calibration_batches(testbed_tokenizer, texts, [correctness_spans(t, r) for t, r in zip(texts, rules)],
                                           batch_size=2, max_length=128)
    assert skipped == 1
    labeled = [testbed_tokenizer.decode(b["input_ids"][r][b["labels"][r] != -100])
               for b in batches for r in range(len(b["input_ids"]))]
    assert [s.strip() for s in labeled] == ["3", "B"]
    first = batches[0]
    assert (first["labels"][first["attention_mask"] == 0] == -100).all()  # padding is never labeled


def test_errors_for_slow_tokenizer_and_empty_calibration(testbed_tokenizer, testbed_model_path):
    with pytest.raises(ValueError, match="no calibration example of task math has a labeled token"):
        calibration_batches(testbed_tokenizer, ["nothing"], [[]], batch_size=1,
                            max_length=32, task="math")

    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="not a fast tokenizer.*offset"):
        calibration_batches(Slow(), ["x"], [[(0, 1)]], batch_size=1, max_length=8)
    assert AutoTokenizer.from_pretrained(testbed_model_path).is_fast


def _authors_spans(item) -> list[tuple[int, int]]:
    """The authors' spans, written independently of spans.py: str.find, not regexes."""
    text = item.text
    if item.domain == "code":  # every occurrence of every test string
        spans = []
        for test in item.tests:
            start = text.find(test)
            while start != -1:
                spans.append((start, start + len(test)))
                start = text.find(test, start + 1)
        return spans
    marker = "#### " if item.domain == "math" else "Answer:"
    return [(text.rfind(marker) + len(marker), len(text))]


@pytest.mark.parametrize("domain", ["math", "mcq", "code"])
def test_labels_equal_the_authors_rule_on_the_testbed_calibration_sets(testbed_tokenizer, domain):
    items = make_split(domain, "calibration", 50)
    batches, skipped = calibration_batches(testbed_tokenizer, [it.text for it in items],
                                           [it.correctness_spans() for it in items], batch_size=50, max_length=256)
    assert skipped == 0
    for row, item in enumerate(items):
        enc = testbed_tokenizer(item.text, return_offsets_mapping=True, truncation=True, max_length=256)
        spans = _authors_spans(item)
        want = [i for i, (ts, te) in enumerate(enc["offset_mapping"])
                if i > 0 and te > ts and any(ts >= cs and te <= ce for cs, ce in spans)]
        got = (batches[0]["labels"][row] != -100).nonzero().flatten().tolist()
        assert got == want, item.id


def test_regex_spans_take_group_1_of_the_last_or_every_match():
    text = "a=1 b= c=22 d=3"
    assert [text[s:e] for s, e in regex_spans(text, r"=(\d*)", "all")] == ["1", "22", "3"]  # b's is empty
    assert [text[s:e] for s, e in regex_spans(text, r"=(\d*)")] == ["3"]
    assert regex_spans("x=", r"=(\d*)") == []  # the last match's group is empty: no span
    assert regex_spans("ab", r"(a)|b", "all") == [(0, 1)]  # b's match leaves group 1 unused
    assert regex_spans("nothing", r"=(\d)") == []
    with pytest.raises(ValueError, match=r"the regex '\\d\+' has no capture group: put the part"):
        regex_spans("1", r"\d+")
    with pytest.raises(ValueError, match="does not compile"):
        regex_spans("1", "(")
    with pytest.raises(ValueError, match="valid values"):
        regex_spans("1", "(1)", "first")


def test_label_text_says_why_a_text_has_no_labeled_token(testbed_tokenizer):
    text = "Question: 1 + 2?\nAnswer: 1 + 2 = 3.\n#### 3"
    spans = correctness_spans(text, "final_number")
    ok = label_text(testbed_tokenizer, text, spans, max_length=64)
    assert (ok.skip, ok.n_labeled, ok.truncated, ok.covered) == ("", 1, False, len(text))
    assert label_text(testbed_tokenizer, text, [], max_length=64).skip == NO_SPAN
    cut = label_text(testbed_tokenizer, text, spans, max_length=5)
    assert (cut.skip, cut.truncated, len(cut.input_ids)) == (TRUNCATED, True, 5)
    assert cut.covered == cut.offsets[-1][1] < len(text)
    inside = text.index("Answer") + 1  # "nswer": inside the one token "Answer"
    assert label_text(testbed_tokenizer, text, [(inside, inside + 5)], max_length=64).skip == NO_TOKEN
    # a span the cut leaves whole still labels: only spans past it make TRUNCATED
    head = label_text(testbed_tokenizer, text, [(8, 11), spans[0]], max_length=5)  # ": 1"
    assert (head.skip, head.n_labeled, head.truncated) == ("", 3, True)


def test_mark_labels_wraps_labeled_tokens(testbed_tokenizer):
    text = "Instruction: x\nassert f(1) == 2\nassert f(2) == 3\nCode: pass"
    labeled = label_text(testbed_tokenizer, text, correctness_spans(text, "asserts"), max_length=64)
    assert mark_labels(text, labeled) == ("Instruction: x\n⟦assert f(1) == 2⟧\n⟦assert f(2) == 3⟧\nCode: pass")
    assert mark_labels(text, labeled, context=3) == "… x\n⟦assert f(1) == 2⟧\n⟦assert f(2) == 3⟧\nCo…"
    cut = label_text(testbed_tokenizer, text, correctness_spans(text, "asserts"), max_length=12)
    assert mark_labels(text, cut) == "Instruction: x\n⟦assert f(1) == 2⟧…"  # the cut: after the 12th token
