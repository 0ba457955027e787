"""task.prompt_format=chat: every prompt of every part in the model's chat template, with the
correctness spans still on the answer tokens (and on the prompt's asserts, for code)."""

import shutil

import pytest
from transformers import AutoTokenizer

from spd_ray.config import ConfigError, load_config
from spd_ray.core.spans import calibration_batches
from spd_ray.tasks.task import load_task

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture
def chat_tokenizer_path(tmp_path, testbed_model_path):
    return _model_with(tmp_path / "chat", testbed_model_path, chat_template=TEMPLATE)


def _model_with(folder, testbed_model_path, **tokenizer_settings) -> str:
    """A copy of the testbed model whose tokenizer has `tokenizer_settings`."""
    shutil.copytree(testbed_model_path, folder)
    tok = AutoTokenizer.from_pretrained(testbed_model_path)
    for name, value in tokenizer_settings.items():
        setattr(tok, name, value)
    tok.save_pretrained(folder)
    return str(folder)


def _labeled(tokenizer, items):
    batches, skipped = calibration_batches(tokenizer, [it.text for it in items],
                                           [it.correctness_spans() for it in items], batch_size=64, max_length=256)
    assert skipped == 0
    return [tokenizer.decode(b["input_ids"][r][b["labels"][r] != -100]) for b in batches for r in range(len(b["input_ids"]))]


@pytest.mark.parametrize("domain", ["math", "mcq", "code"])
def test_chat_format_wraps_every_prompt_and_labels_the_same_tokens(chat_tokenizer_path, domain):
    overrides = [f"model.path={chat_tokenizer_path}", f"task.domain={domain}", "task.n_calibration=6",
                 "task.n_train_prompts=3", "task.n_eval=2"]
    raw = load_task(load_config(None, overrides))
    chat = load_task(load_config(None, [*overrides, "task.prompt_format=chat", "task.system_prompt=Be brief."]))
    parts = lambda task: [*task.calibration, *task.train_items, *(it for v in task.eval_splits.values() for it in v)]  # noqa: E731
    for r, c in zip(parts(raw), parts(chat), strict=True):
        assert c.prompt == f"<|system|>\nBe brief.<|end|>\n<|user|>\n{r.prompt}<|end|>\n<|assistant|>\n"
        assert c.answer == r.answer
    tok = AutoTokenizer.from_pretrained(chat_tokenizer_path)
    # the rule reads the raw prompt + answer: the template's own tokens are never labeled
    assert _labeled(tok, chat.calibration) == _labeled(tok, raw.calibration)


def test_chat_format_needs_a_chat_template(testbed_model_path):
    cfg = load_config(None, [f"model.path={testbed_model_path}", "task.prompt_format=chat"])
    with pytest.raises(ConfigError, match="has no chat template.*task.prompt_format=raw"):
        load_task(cfg)
    with pytest.raises(ConfigError, match="system_prompt needs task.prompt_format=chat"):
        load_config(None, ["task.system_prompt=hi"])


def test_a_template_that_writes_the_bos_token_gets_no_second_one(tmp_path, testbed_model_path):
    # a tokenizer that adds BOS itself, with a template that writes it too
    path = _model_with(tmp_path / "bos", testbed_model_path, bos_token="<|endoftext|>", add_bos_token=True,
                       chat_template="{{ bos_token }}" + TEMPLATE)
    task = load_task(load_config(None, [f"model.path={path}", "task.prompt_format=chat",
                                        "task.n_calibration=2", "task.n_train_prompts=1", "task.n_eval=1"]))
    prompt = task.train_items[0].prompt
    assert prompt.startswith("<|user|>\n")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok(prompt)["input_ids"].count(tok.bos_token_id) == 1
