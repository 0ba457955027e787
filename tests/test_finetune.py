import copy

import pytest
import torch

from spd_ray.config import FinetuneConfig
from spd_ray.core.recipe import (
    build_examples,
    collate,
    finished_model,
    optimizer_and_schedule,
    pack,
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


def test_a_long_row_loses_the_start_of_its_prompt_not_its_completion(testbed_tokenizer):
    tok = testbed_tokenizer
    passage = "Question: " + " ".join(f"word{i}" for i in range(200)) + "\nAnswer:"
    completion = " The answer is 7.\n#### 7"
    n_completion = len(tok(completion + tok.eos_token)["input_ids"])
    row = build_examples(tok, [passage], [completion], max_length=48, loss_on="completion")[0]
    assert len(row["input_ids"]) == 48 and row["prompt_cut"] > 0 and row["completion_cut"] == 0
    assert tok.decode(row["input_ids"]).endswith(completion + tok.eos_token)  # the completion, whole
    learned = [t for t in row["labels"] if t != -100]
    assert len(learned) >= n_completion - 1 and tok.decode(learned).endswith("#### 7" + tok.eos_token)
    short = build_examples(tok, ["Q: 1?\nA:"], [completion], max_length=48)[0]
    assert short["prompt_cut"] == short["completion_cut"] == 0
    alone = build_examples(tok, ["Q:"], [completion * 20], max_length=16)[0]  # a completion too long alone
    assert len(alone["input_ids"]) == 16 and alone["completion_cut"] > 0


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


@pytest.mark.parametrize(("attn", "one_sequence"), [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_loss_and_gradients_equal_unpacked(testbed_model, testbed_tokenizer, attn, one_sequence):
    tok = testbed_tokenizer
    prompts = ["Question: " + " ".join(["bee"] * (2 + 9 * (i % 4))) + "?\nAnswer:" for i in range(8)]
    completions = [f" {i} + {i} = {2 * i}.{' ok' * (3 * i % 5)}\n#### {2 * i}" for i in range(8)]
    rows = build_examples(tok, prompts, completions, max_length=96)
    total = sum(len(r["input_ids"]) for r in rows)
    packed = pack(rows, tok.pad_token_id, total if one_sequence else None)
    padded = collate(rows, tok.pad_token_id)
    assert len({len(r["input_ids"]) for r in rows}) > 3  # mixed lengths, so that packing packs
    if one_sequence:
        assert packed["input_ids"].shape == (1, total)
    else:
        assert 1 < packed["input_ids"].shape[0] < len(rows)
        assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1]  # never wider
    # every real token is there once, and every label but each row's first one
    assert (packed["input_ids"] != tok.pad_token_id).sum() == (padded["input_ids"] != tok.pad_token_id).sum()
    assert (packed["labels"] != -100).sum() == (padded["labels"][:, 1:] != -100).sum()
    model = copy.deepcopy(testbed_model).float()
    model.config._attn_implementation = attn

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss_p, grads_p = loss_and_grads(packed)
    loss_u, grads_u = loss_and_grads(padded)
    assert loss_p == pytest.approx(loss_u, abs=1e-5)
    for gp, gu in zip(grads_p, grads_u, strict=True):
        torch.testing.assert_close(gp, gu, atol=1e-5, rtol=1e-4)
    # the test can fail: the same rows concatenated with running positions attend across rows
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert abs(model(**leaky).loss.item() - loss_u) > 1e-3


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
    opt, sched = optimizer_and_schedule(model, cfg, total_steps=16, steps_per_epoch=2)
    model.train()
    for _ in range(8):  # epochs; at 4, LoRA moved the v2.2 model to 0.80x its loss, at the line
        for i in range(0, len(rows), cfg.batch_size):
            model(**collate(rows[i:i + cfg.batch_size], tok.pad_token_id)).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    trained = finished_model(model.eval())
    assert type(trained) is type(testbed_model)  # LoRA is merged back into a plain HF model
    assert loss(trained) < 0.8 * loss(testbed_model)


def test_rows_that_share_no_sequence_are_padded_as_collate_pads_them(testbed_tokenizer):
    tok = testbed_tokenizer
    rows = build_examples(tok, ["Question: 1 + 1?\nAnswer:", "Question: 2 + 2?\nAnswer:"], [" 2", " 4"],
                          max_length=32)
    packed, padded = pack(rows, tok.pad_token_id), collate(rows, tok.pad_token_id)
    assert packed.keys() == padded.keys() and all(torch.equal(packed[k], padded[k]) for k in padded)
    # with room for both, they share one sequence
    assert pack(rows, tok.pad_token_id, 64)["input_ids"].shape[0] == 1
