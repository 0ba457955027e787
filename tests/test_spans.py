import pytest
from transformers import AutoTokenizer

from spd_ray.spans import calibration_batches, correctness_spans, token_mask


def test_rules_on_the_papers_hub_formats():
    gsm = "Question: Natalia sold 48 clips.\nAnswer: She sold 48/2 = <<48/2=24>>24 clips.\n#### 72"
    (s, e), = correctness_spans(gsm, "final_number")
    assert gsm[s:e] == "72"
    mmlu = "Question: What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B"
    (s, e), = correctness_spans(mmlu, "answer_letter")
    assert mmlu[s:e] == "B"
    mbpp = ("Instruction: Write a function.\nYour code should pass these tests:\n"
            "assert f(1) == 2\nassert f(2) == 3\nCode: def f(x): return x + 1")
    spans = correctness_spans(mbpp, "asserts")
    assert [mbpp[s:e] for s, e in spans] == ["assert f(1) == 2", "assert f(2) == 3"]
    assert correctness_spans("abc", "full") == [(0, 3)]
    assert correctness_spans("no marker here", "final_number") == []
    with pytest.raises(ValueError, match="valid rules"):
        correctness_spans("x", "nope")


def test_token_inside_span_rule():
    text = "Answer: B"
    spans = correctness_spans(text, "answer_letter")
    # " B" (leading space trimmed) is inside; "Answer:" is not; a partial overlap is not
    assert token_mask(text, [(0, 7), (7, 9)], spans) == [False, True]
    assert token_mask("#### 72", [(0, 3), (3, 6), (4, 6), (6, 7)], [(5, 7)]) == [False, False, True, True]


def test_labels_from_a_real_fast_tokenizer(testbed_tokenizer):
    texts = ["Question: 1 + 2?\nAnswer: 1 + 2 = 3.\n#### 3", "Question: x\nA. a\nB. b\nAnswer: B",
             "no correctness span at all"]
    batches, skipped = calibration_batches(testbed_tokenizer, texts, ["final_number", "answer_letter",
                                           "final_number"], batch_size=2, max_length=128)
    assert skipped == 1
    labeled = [testbed_tokenizer.decode(b["input_ids"][r][b["labels"][r] != -100])
               for b in batches for r in range(len(b["input_ids"]))]
    assert [s.strip() for s in labeled] == ["3", "B"]
    first = batches[0]
    assert (first["labels"][first["attention_mask"] == 0] == -100).all()  # padding is never labeled


def test_errors_for_slow_tokenizer_and_empty_calibration(testbed_tokenizer, testbed_model_path):
    with pytest.raises(ValueError, match="no calibration example of task math.*final_number"):
        calibration_batches(testbed_tokenizer, ["nothing"], ["final_number"], batch_size=1,
                            max_length=32, task="math")

    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="not a fast tokenizer.*offset"):
        calibration_batches(Slow(), ["x"], ["full"], batch_size=1, max_length=8)
    assert AutoTokenizer.from_pretrained(testbed_model_path).is_fast
