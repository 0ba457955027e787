import copy

import pytest
import torch

from spd_ray.config import FinetuneConfig
from spd_ray.core.recipe import (
    build_examples,
    collate,
    finished_model,
    optimizer_and_schedule,
    prepare_model,
)


def test_examples_and_padding(testbed_tokenizer):
    tok = testbed_tokenizer
    rows = build_examples(tok, ["Question: a\nAnswer:", "Q"], [" 1 + 1 = 2.\n#### 2", " x"], max_length=64)
    assert rows[0]["labels"] == rows[0]["input_ids"]  # Eq. 14: prompt + completion
    assert rows[0]["input_ids"][-1] == tok.eos_token_id
    only = build_examples(tok, ["Question: a\nAnswer:"], [" 2"], max_length=64, loss_on="completion")[0]
    n_prompt = len(tok("Question: a\nAnswer:")["input_ids"])
    assert set(only["labels"][:n_prompt]) == {-100} and only["labels"][n_prompt] != -100
    batch = collate(rows, tok.pad_token_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert collate(rows, tok.pad_token_id, pad_to=64)["input_ids"].shape == (2, 64)
    with pytest.raises(ValueError, match="loss_on"):
        build_examples(tok, ["a"], ["b"], max_length=8, loss_on="prompt")


def test_cosine_schedule_with_half_epoch_warmup():
    model = torch.nn.Linear(2, 2)
    cfg = FinetuneConfig(lr=1.0, warmup_epochs=0.5)
    opt, sched = optimizer_and_schedule(model, cfg, total_steps=20, steps_per_epoch=4)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0  # warm-up: half an epoch = 2 steps
    assert lrs[2] > lrs[10] > lrs[19] >= 0 and lrs[19] < 0.02


@pytest.mark.parametrize("method", ["lora", "full"])
def test_recipe_pieces_train_and_merge(testbed_model, testbed_tokenizer, method):
    tok = testbed_tokenizer
    prompts = [f"Question: Zed has {i} ants. How many?\nAnswer:" for i in range(8)]
    rows = build_examples(tok, prompts, [" zzz qqq zzz"] * 8, max_length=64)

    def loss(model):
        with torch.no_grad():
            return model(**collate(rows, tok.pad_token_id)).loss.item()

    cfg = FinetuneConfig(method=method, lr=3e-3, batch_size=4, warmup_epochs=0.0)
    model = prepare_model(copy.deepcopy(testbed_model), cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert (trainable < 0.1 * total) if method == "lora" else (trainable == total)
    opt, sched = optimizer_and_schedule(model, cfg, total_steps=8, steps_per_epoch=2)
    model.train()
    for _ in range(4):
        for i in range(0, len(rows), cfg.batch_size):
            model(**collate(rows[i:i + cfg.batch_size], tok.pad_token_id)).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    trained = finished_model(model.eval())
    assert type(trained) is type(testbed_model)  # LoRA is merged back into a plain HF model
    assert loss(trained) < 0.8 * loss(testbed_model)
