"""Evaluation: greedy completions scored per domain, and the NLL of reference answers.

The paper evaluates with greedy decoding, projection off, raw prompts (SPD_METHOD.md step 9).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spd_ray.config import EvalConfig
from spd_ray.core.generation import generate
from spd_ray.tasks.item import Item
from spd_ray.tasks.sandbox import run_many
from spd_ray.tasks.scoring import extract_code, score_choice, score_exact, score_math

_TEXT_SCORERS = {"number": score_math, "choice": score_choice, "exact": score_exact}


def score(items: Sequence[Item], completions: Sequence[str], ev: EvalConfig | None = None) -> list[bool]:
    """Per-item correctness by the item's metric: final number (GSM8K, SVAMP), answer letter
    (MMLU), normalized exact match (BBH), asserts run to the end (MBPP; its setup runs first)
    in the `ev.sandbox` sandbox with `ev.code_timeout_s` per program."""
    ev = ev or EvalConfig()
    results: list[bool | None] = [None] * len(items)
    code_rows = [i for i, it in enumerate(items) if it.metric == "asserts"]
    if code_rows:
        jobs = [(extract_code(completions[i]), items[i].tests, items[i].setup) for i in code_rows]
        for i, res in zip(code_rows, run_many(jobs, mode=ev.sandbox, timeout_s=ev.code_timeout_s)):
            results[i] = res.passed
    for i, it in enumerate(items):
        if it.metric in _TEXT_SCORERS:
            results[i] = _TEXT_SCORERS[it.metric](completions[i], it.gold)
        elif it.metric != "asserts":
            raise ValueError(f"item {it.id} has no accuracy scorer (metric {it.metric!r}); "
                             f"valid metrics: {[*_TEXT_SCORERS, 'asserts']}")
    return [bool(r) for r in results]


@torch.no_grad()
def reference_nll(model, tokenizer, items: Sequence[Item], batch_size: int = EvalConfig.batch_size,
                  max_length: int = 512) -> float:
    """Mean per-token NLL of each item's reference answer given its prompt (CodeAlpaca metric)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompt_lens = [len(tokenizer(it.prompt)["input_ids"]) for it in chunk]
        tokenizer.padding_side = "right"
        enc = tokenizer([it.text for it in chunk], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length).to(device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        for row, n in enumerate(prompt_lens):
            labels[row, :n] = -100  # score the answer only
        logits = model(**enc).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum",
                                                ignore_index=-100)
        total += nll.item()
        count += int((target != -100).sum())
    return total / max(1, count)


def split_metrics(splits: dict[str, Sequence[Item]], completions: dict[str, Sequence[str]],
                  nll: dict[str, float], ev: EvalConfig) -> dict[str, float]:
    """Accuracy per split from its greedy completions (none for NLL-only splits), plus the
    reference NLL where computed."""
    metrics = {}
    scored = accuracy_splits(splits)
    for name, items in splits.items():
        if name in scored:
            correct = score(items, completions[name], ev)
            metrics[f"{name}/accuracy"] = sum(correct) / len(correct)
        if name in nll:
            metrics[f"{name}/nll"] = nll[name]
    return metrics


def accuracy_splits(splits: dict[str, Sequence[Item]]) -> list[str]:
    """Splits scored from greedy completions: all but the NLL-only ones (CodeAlpaca)."""
    return [name for name, items in splits.items() if items and items[0].metric != "nll"]


def nll_splits(splits: dict[str, Sequence[Item]]) -> list[str]:
    """Splits scored by reference NLL too: code (the paper's CodeAlpaca metric)."""
    return [name for name, items in splits.items() if items and items[0].domain == "code"]


def evaluate_model(model, tokenizer, splits: dict[str, Sequence[Item]], cfg: EvalConfig) -> dict[str, float]:
    """In-process evaluation: greedy completions, projection off, raw prompts."""
    completions = {name: generate(model, tokenizer, [it.prompt for it in splits[name]],
                                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
                   for name in accuracy_splits(splits)}
    nll = {name: reference_nll(model, tokenizer, splits[name], cfg.batch_size) for name in nll_splits(splits)}
    return split_metrics(splits, completions, nll, cfg)
