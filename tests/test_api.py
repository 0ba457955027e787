"""The Python API (spd_ray.api): the README's example runs as written; spans and rules label the
same tokens; fold, hooks and save/load keep what they promise."""

import re
from pathlib import Path

import pytest
import torch

import spd_ray
from spd_ray.core.spans import correctness_spans
from spd_ray.tasks.testbed import make_split

README = Path(__file__).resolve().parents[1] / "README.md"
TEXTS = [it.text for it in make_split("math", "calibration", 6)]


def _readme_example() -> str:
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the README's Python API section should hold one python example"
    return blocks[0]


def _same(a: spd_ray.CapabilitySubspace, b: spd_ray.CapabilitySubspace, skip_meta=()) -> None:
    assert a.bases.keys() == b.bases.keys()
    for key in a.bases:
        torch.testing.assert_close(a.bases[key], b.bases[key])
        torch.testing.assert_close(a.singular_values[key], b.singular_values[key])
    assert a.energy == pytest.approx(b.energy)
    assert {k: v for k, v in a.meta.items() if k not in skip_meta} == \
        {k: v for k, v in b.meta.items() if k not in skip_meta}


@pytest.fixture(scope="module")
def subspace(testbed_model, testbed_tokenizer):
    return spd_ray.extract_subspace(testbed_model, testbed_tokenizer, TEXTS, rule="final_number")


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it saves the subspace in the working directory
    exec(compile(_readme_example(), str(README), "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "subspace" / "subspace.safetensors").exists()
    assert capsys.readouterr().out.strip()  # the completion it printed


def test_extract_records_the_layers_examples_and_ranks(subspace):
    # the testbed model: 6 layers (the paper's [L-1, L//2] = [5, 3]), kv_dim 128 (half rank 64)
    assert subspace.layers == [3, 5] and subspace.meta["layers"] == [5, 3]
    assert {tuple(b.shape) for b in subspace.bases.values()} == {(128, 64)}
    assert subspace.meta["n_calibration"] == len(TEXTS) and subspace.meta["skipped"] == 0
    assert subspace.meta["spans"] == "final_number"


def test_spans_and_rules_give_the_same_subspace(testbed_model, testbed_tokenizer, subspace):
    spans = [correctness_spans(text, "final_number") for text in TEXTS]
    by_spans = spd_ray.extract_subspace(testbed_model, testbed_tokenizer, TEXTS, spans=spans)
    by_rules = spd_ray.extract_subspace(testbed_model, testbed_tokenizer, TEXTS,
                                        rule=["final_number"] * len(TEXTS))
    _same(by_spans, subspace, skip_meta=("spans",))
    _same(by_rules, subspace, skip_meta=("spans",))
    assert by_spans.meta["spans"] == "explicit" and by_rules.meta["spans"] == ["final_number"]


def test_a_text_without_labeled_tokens_is_skipped_and_counted(testbed_model, testbed_tokenizer):
    texts = [*TEXTS, "Question: no answer here\nAnswer: none"]
    sub = spd_ray.extract_subspace(testbed_model, testbed_tokenizer, texts, rule="final_number")
    assert sub.meta["skipped"] == 1 and sub.meta["n_calibration"] == len(TEXTS)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "not neither"),
    ({"rule": "final_number", "spans": [[(0, 1)]] * len(TEXTS)}, "not both"),
    ({"spans": [[(0, 1)]]}, "spans has 1 entries for 6 texts"),
    ({"rule": ["final_number"]}, "rule has 1 entries for 6 texts"),
    ({"rule": "last_word"}, "unknown correctness-span rule 'last_word'"),
])
def test_bad_span_arguments_are_clear_errors(testbed_model, testbed_tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        spd_ray.extract_subspace(testbed_model, testbed_tokenizer, TEXTS, **kwargs)


def test_one_string_instead_of_a_list_is_an_error(testbed_model, testbed_tokenizer):
    with pytest.raises(TypeError, match="texts is one string"):
        spd_ray.extract_subspace(testbed_model, testbed_tokenizer, TEXTS[0], rule="final_number")


def test_fold_leaves_the_input_model_unchanged(testbed_model, subspace):
    before = {k: v.clone() for k, v in testbed_model.state_dict().items()}
    folded = spd_ray.fold(testbed_model, subspace)
    after = testbed_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    k_proj = "model.layers.3.self_attn.k_proj.weight"
    assert folded is not testbed_model
    assert not torch.equal(folded.state_dict()[k_proj], before[k_proj])


def test_hooks_project_inside_the_block_and_are_removed_after_it(testbed_model, subspace):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    plain = testbed_model(ids).logits
    with spd_ray.projection_hooks(testbed_model, subspace):
        projected = testbed_model(ids).logits
    with pytest.raises(RuntimeError), spd_ray.projection_hooks(testbed_model, subspace):
        raise RuntimeError("an error inside the block")
    assert not torch.allclose(projected, plain)
    torch.testing.assert_close(testbed_model(ids).logits, plain)
    assert not any(m._forward_hooks for m in testbed_model.modules())


def test_save_then_load_gives_the_same_subspace(subspace, tmp_path):
    subspace.save(tmp_path / "sub")
    _same(spd_ray.CapabilitySubspace.load(tmp_path / "sub"), subspace)
