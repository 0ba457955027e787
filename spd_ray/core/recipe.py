"""Distillation fine-tuning (paper Eq. 14): next-token loss on prompt + completion.

The pieces (tokenized examples, batches padded to their longest row or packed, LoRA/full
preparation, AdamW with cosine warm-up) are plain torch + peft; `spd_ray.stages.finetune` runs them under Ray Train +
DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from spd_ray.config import FinetuneConfig
from spd_ray.core.batching import padded_batch, right_pad


def build_examples(tokenizer, prompts: Sequence[str], completions: Sequence[str], *,
                   max_length: int, loss_on: str = FinetuneConfig.loss_on) -> list[dict]:
    """Token ids and labels per (prompt, completion); `loss_on=completion` masks the prompt.

    A row longer than `max_length` loses the start of its prompt (after the tokens the
    tokenizer puts before any text, e.g. BOS), not its completion, which is what stage 3
    distills; only a completion that alone exceeds `max_length` is cut at its end. Each row
    says how many tokens it lost: `prompt_cut`, `completion_cut`."""
    if loss_on not in ("all", "completion"):
        raise ValueError(f"finetune.loss_on={loss_on!r}; valid values: ['all', 'completion']")
    eos = tokenizer.eos_token or ""
    head = len(tokenizer("")["input_ids"])  # BOS and the like, kept at the start
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = tokenizer(prompt + completion + eos)["input_ids"]
        n_prompt = min(len(tokenizer(prompt)["input_ids"]), len(ids))
        prompt_cut = min(max(0, len(ids) - max_length), n_prompt - head)
        ids = ids[:head] + ids[head + prompt_cut:]
        n_prompt -= prompt_cut
        completion_cut = max(0, len(ids) - max_length)
        ids = ids[:max_length]
        labels = list(ids)
        if loss_on == "completion":
            labels[:n_prompt] = [-100] * min(n_prompt, len(ids))
        rows.append({"input_ids": ids, "labels": labels, "prompt_cut": prompt_cut,
                     "completion_cut": completion_cut})
    return rows


def collate(rows: Sequence[dict], pad_id: int, pad_to: int | None = None) -> dict:
    """Right-pad to the longest row (or to `pad_to`); padding is masked out of the loss."""
    return padded_batch([r["input_ids"] for r in rows], [r["labels"] for r in rows], pad_id, pad_to)


def pack(rows: Sequence[dict], pad_id: int, capacity: int | None = None) -> dict:
    """`rows` packed into as few sequences of at most `capacity` tokens as first-fit-decreasing
    finds. The default capacity, the longest row, never computes more than `collate`'s padding,
    whatever the attention kernel (a dense block-diagonal mask costs the square of the packed
    length); with variable-length attention (flash attention), where each row costs only its
    own, pass the rows' total for one sequence. Each row keeps its own positions (0, 1, ...)
    and there is no attention mask, which is how transformers reads packed sequences: it
    confines attention to each row (a block-diagonal causal mask under SDPA and eager,
    variable-length kernels under flash attention). A row's first label is masked, as the
    previous row's last token would predict it; unpacked, nothing predicts it either, so the loss
    is the same mean over the same tokens as `collate`'s. The batch says `use_cache=False`: with a
    KV cache, transformers would not look for packed sequences (and attend across rows). Where no
    two rows share a sequence, the batch is `collate`'s (its mask costs less than detecting
    packed rows)."""
    capacity = capacity or max(len(r["input_ids"]) for r in rows)
    bins: list[list[dict]] = []
    loads: list[int] = []
    for row in sorted(rows, key=lambda r: -len(r["input_ids"])):  # stable: the same rows, the same bins
        n = len(row["input_ids"])
        fit = next((b for b, load in enumerate(loads) if load + n <= capacity), None)
        if fit is None:
            bins.append([row])
            loads.append(n)
        else:
            bins[fit].append(row)
            loads[fit] += n
    if len(bins) == len(rows):
        return collate(rows, pad_id)
    width = max(loads)
    # padding gets position 0 per token: each pad is a sequence of its own, attending to itself
    return {"input_ids": right_pad([[t for r in b for t in r["input_ids"]] for b in bins], pad_id, width),
            "labels": right_pad([[t for r in b for t in [-100, *r["labels"][1:]]] for b in bins], -100, width),
            "position_ids": right_pad([[i for r in b for i in range(len(r["input_ids"]))] for b in bins], 0, width),
            "use_cache": False}


def prepare_model(model, cfg: FinetuneConfig):
    """LoRA adapters through peft (the paper's recipe) or all weights trainable."""
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def finished_model(model):
    """The plain HF model to evaluate or save: LoRA adapters merged into the weights."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def optimizer_and_schedule(model, cfg: FinetuneConfig, total_steps: int, steps_per_epoch: int):
    """AdamW and a cosine schedule with linear warm-up (half an epoch by default)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
