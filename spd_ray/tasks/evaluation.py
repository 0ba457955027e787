"""Evaluation: greedy completions scored by each item's metric, and the NLL of reference answers.

The paper evaluates with greedy decoding, projection off, raw prompts (docs/method.md,
"Evaluation").
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence

import torch

from spd_ray.config import SCORERS, ConfigError, EvalConfig
from spd_ray.core.generation import generate
from spd_ray.core.spans import span_regex
from spd_ray.tasks.item import Item
from spd_ray.tasks.sandbox import Program, run_many
from spd_ray.tasks.scoring import (
    extract_code,
    score_choice,
    score_exact,
    score_math,
    score_normalized,
    score_regex,
)

# scorer name (config.SCORERS) -> fn(items, completions, ev) -> whether each completion is right
_SCORE_FNS: dict[str, Callable[[Sequence[Item], Sequence[str], EvalConfig], list[bool]]] = {}


def register_scorer(name: str):
    """Decorator: `fn(items, completions, ev) -> list[bool]` is the function of the built-in
    scorer `name`, declared (with what it reads) in config.SCORERS; one function per name."""
    def add(fn):
        if name not in accuracy_scorers():
            raise ValueError(f"scorer {name!r} is not an accuracy scorer of config.SCORERS "
                             f"({accuracy_scorers()}): declare it there first")
        if name in _SCORE_FNS:
            raise ValueError(f"scorer {name!r} is registered twice")
        _SCORE_FNS[name] = fn
        return fn
    return add


def text_scorer(name: str):
    """Decorator: `fn(completion, item) -> bool`, read from the completion's text alone, is the
    function of scorer `name` (`register_scorer`), applied item by item."""
    def add(fn):
        register_scorer(name)(lambda items, completions, ev: [
            fn(completion, it) for it, completion in zip(items, completions, strict=True)])
        return fn
    return add


def accuracy_scorers() -> list[str]:
    """The built-in scorers that give accuracy (all but nll)."""
    return [name for name, scorer in SCORERS.items() if scorer.accuracy]


@text_scorer("exact")
def _exact(completion: str, it: Item) -> bool:
    return score_exact(completion, it.gold)


@text_scorer("normalized")
def _normalized(completion: str, it: Item) -> bool:
    return score_normalized(completion, it.gold)


@text_scorer("number")
def _number(completion: str, it: Item) -> bool:
    return score_math(completion, it.gold)


@text_scorer("choice")
def _choice(completion: str, it: Item) -> bool:
    return score_choice(completion, it.gold)


@text_scorer("regex")
def _regex(completion: str, it: Item) -> bool:
    return score_regex(completion, it.gold, it.pattern)


@register_scorer("asserts")
def _asserts(items: Sequence[Item], completions: Sequence[str], ev: EvalConfig) -> list[bool]:
    """The programs run in parallel in the `ev.sandbox` sandbox (`run_many`)."""
    programs = [Program(extract_code(completion), it.tests, it.setup)
                for it, completion in zip(items, completions, strict=True)]
    return [res.passed for res in run_many(programs, mode=ev.sandbox, timeout_s=ev.code_timeout_s)]


_unregistered = [name for name in accuracy_scorers() if name not in _SCORE_FNS]
if _unregistered:  # declared in config.SCORERS, and nothing here runs it
    raise ImportError(f"the scorers {_unregistered} of config.SCORERS have no function: "
                      "register one")


def score(items: Sequence[Item], completions: Sequence[str], ev: EvalConfig | None = None) -> list[bool]:
    """Per-item correctness by the item's metric (`Item.metric`):
    - exact: the completion's answer (`extract_answer`) is the gold, character for character;
    - normalized: BBH's normalized match, option targets "(B)" read as answer letters;
    - number: the final number (GSM8K, SVAMP); choice: the answer letter (MMLU);
    - regex: group 1 of the first match of `Item.pattern`, normalized, is the gold;
    - asserts: the program runs its asserts to the end (MBPP; its setup runs first) in the
      `ev.sandbox` sandbox with `ev.code_timeout_s` per program;
    - module:function: the user function `resolve_scorer` imports, fn(completion, gold) -> bool,
      run in-process on the driver with the job's credentials (no sandbox, unlike asserts).
    nll items have no accuracy: asking for it is an error."""
    ev = ev or EvalConfig()
    rows_of: dict[str, list[int]] = {}  # a metric's items scored together (asserts: in parallel)
    for i, it in enumerate(items):
        if it.metric not in _SCORE_FNS and ":" not in it.metric:
            raise ValueError(f"item {it.id} has no accuracy scorer (metric {it.metric!r}); "
                             f"valid metrics: {accuracy_scorers()} or module:function")
        rows_of.setdefault(it.metric, []).append(i)
    results = [False] * len(items)
    for metric, rows in rows_of.items():
        fn = _SCORE_FNS.get(metric, _user_scores)
        correct = fn([items[i] for i in rows], [completions[i] for i in rows], ev)
        for i, right in zip(rows, correct, strict=True):
            results[i] = bool(right)
    return results


@functools.cache
def resolve_scorer(name: str) -> Callable[[str, str], bool]:
    """The user scorer `name` ("module:function"), imported once: called as
    `fn(completion: str, gold: str) -> bool` for every item of its splits.

    Opt-in, and trusted: unlike the asserts scorer's sandbox, it runs IN-PROCESS on the driver,
    with the job's credentials (its files, cloud keys and network). The module must be
    importable there: on PYTHONPATH or in the job's working_dir. Raises ConfigError naming the
    problem (not importable, no such function, not callable with two arguments) and the fix."""
    module_name, _, function = name.partition(":")
    if not (module_name and function):
        raise ConfigError(f"scorer {name!r} is neither built in ({list(SCORERS)}) nor module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # user code: importing it may raise anything
        absent = isinstance(err, ModuleNotFoundError) and err.name is not None and (
            f"{module_name}.".startswith(f"{err.name}."))
        fix = (f"put {module_name.replace('.', '/')}.py on PYTHONPATH or in the job's working_dir" if absent
               else "fix the module, or install what it imports")
        raise ConfigError(f"scorer {name!r}: cannot import {module_name} ({type(err).__name__}: {err}); {fix}") from err
    if not hasattr(module, function):
        raise ConfigError(f"scorer {name!r}: {module.__file__} has no {function!r}; define "
                          f"`def {function}(completion: str, gold: str) -> bool` there")
    fn = getattr(module, function)
    if not callable(fn):
        raise ConfigError(f"scorer {name!r}: {module_name}.{function} is a {type(fn).__name__}, not a "
                          "function of (completion: str, gold: str) -> bool")
    try:
        inspect.signature(fn).bind("completion", "gold")
    except TypeError:
        raise ConfigError(f"scorer {name!r}: {module_name}.{function}{inspect.signature(fn)} cannot be "
                          "called as fn(completion, gold); give it exactly those two arguments") from None
    except ValueError:  # no signature to read (some builtins): the first call tells
        pass
    return fn


def _user_scores(items: Sequence[Item], completions: Sequence[str], ev: EvalConfig) -> list[bool]:
    return [_user_score(it, completion) for it, completion in zip(items, completions, strict=True)]


def _user_score(item: Item, completion: str) -> bool:
    fn = resolve_scorer(item.metric)
    try:
        correct = fn(completion, item.gold)
    except Exception as err:
        raise RuntimeError(f"scorer {item.metric} raised {type(err).__name__} on item {item.id}: {err}") from err
    if correct not in (True, False):  # a truthy string ("no") must not count as right
        raise TypeError(f"scorer {item.metric} returned {correct!r} on item {item.id}; it must return True or False")
    return bool(correct)


def check_scorers(splits: Mapping[str, Sequence[Item]]) -> None:
    """Every split's scorer can run, checked before any compute: one metric per split, a known
    one (`SCORERS`, or a user function `resolve_scorer` imports), a regex pattern that compiles
    and has a capture group, tests for the asserts scorer and reference answers for nll.
    Raises ConfigError naming the split and the fix."""
    for name, items in splits.items():
        metrics = sorted({it.metric for it in items})
        if len(metrics) > 1:
            raise ConfigError(f"split {name} mixes the scorers {metrics}: give each split one")
        if not items:
            continue
        metric = metrics[0]
        where = f"split {name} (scorer {metric!r})"
        if ":" in metric:
            try:
                resolve_scorer(metric)
            except ConfigError as err:
                raise ConfigError(f"split {name}: {err}") from err.__cause__
        elif metric not in SCORERS:
            raise ConfigError(f"{where}: no such scorer; valid ones: {list(SCORERS)} or module:function")
        elif metric == "regex":
            for pattern in sorted({it.pattern for it in items}):
                _check_pattern(where, pattern)
        elif metric == "asserts" and (bare := next((it for it in items if not it.tests), None)):
            raise ConfigError(f"{where}: item {bare.id} has no tests, so any program that runs would pass; "
                              "give every item its assert lines (or use another scorer)")
        elif metric == "nll" and not any(it.answer for it in items):
            raise ConfigError(f"{where}: no item has a reference answer to take the NLL of; fill the answers")


def _check_pattern(where: str, pattern: str) -> None:
    if not pattern:
        raise ConfigError(f"{where}: no pattern to match; set one (task.files.scorer_regex), its group 1 "
                          r"the answer, e.g. 'answer: (\S+)'")
    try:
        span_regex(pattern)  # the same rule as a span regex: it compiles, and group 1 is the answer
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def reference_nll(model, tokenizer, items: Sequence[Item], batch_size: int = EvalConfig.batch_size,
                  max_length: int = 512, max_logits: int = 2**26) -> float:
    """Mean per-token NLL of each item's reference answer given its prompt (CodeAlpaca metric),
    over all the answers' tokens (`answer_logprobs`)."""
    scored = answer_logprobs(model, tokenizer, [it.prompt for it in items], [it.answer for it in items],
                             batch_size, max_length, max_logits)
    return -sum(lp for lp, _ in scored) / max(1, sum(n for _, n in scored))


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompts: Sequence[str], answers: Sequence[str],
                    batch_size: int = EvalConfig.batch_size, max_length: int = 512,
                    max_logits: int = 2**26) -> list[tuple[float, int]]:
    """Per (prompt, answer): the log-probability of the answer's tokens given the prompt,
    teacher-forced (their sum), and how many tokens that is (an answer cut by `max_length`:
    its tokens within it).

    Each batch runs in chunks of rows whose logits hold at most `max_logits` numbers: a batch of
    64 x 512 tokens over a 152k vocabulary would hold 10 GiB of bf16 logits and 37 GiB more of
    float32 copies at once; a chunk of rows holds under 1 GiB."""
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    out: list[tuple[float, int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(len(prompts), start + batch_size))
        prompt_lens = [len(tokenizer(prompts[i])["input_ids"]) for i in chunk]
        tokenizer.padding_side = "right"
        enc = tokenizer([prompts[i] + answers[i] for i in chunk], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length).to(device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        for row, n in enumerate(prompt_lens):
            labels[row, :n] = -100  # score the answer only
        rows = max(1, max_logits // (labels.shape[1] * vocab))
        for r in range(0, len(chunk), rows):
            part = {k: v[r : r + rows] for k, v in enc.items()}
            logits = model(**part).logits[:, :-1].float()
            target = labels[r : r + rows, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none",
                                                    ignore_index=-100)
            out += [(-float(row_nll.sum()), int(n)) for row_nll, n in zip(nll, (target != -100).sum(1), strict=True)]
    return out


def split_metrics(splits: dict[str, Sequence[Item]], completions: dict[str, Sequence[str]],
                  nll: dict[str, float], ev: EvalConfig) -> dict[str, float]:
    """Accuracy per split from its greedy completions (none for NLL-only splits), plus the
    reference NLL where computed."""
    return metrics_of(score_splits(splits, completions, ev), nll)


def score_splits(splits: dict[str, Sequence[Item]], completions: dict[str, Sequence[str]],
                 ev: EvalConfig) -> dict[str, list[bool]]:
    """Each item's correctness, by split, for the splits scored from completions."""
    return {name: score(splits[name], completions[name], ev) for name in accuracy_splits(splits)}


def metrics_of(correct: dict[str, Sequence[bool]], nll: dict[str, float]) -> dict[str, float]:
    """`<split>/accuracy` from the items' correctness and `<split>/nll`, split by split."""
    metrics = {}
    for name in dict.fromkeys([*correct, *nll]):
        if name in correct:
            metrics[f"{name}/accuracy"] = sum(correct[name]) / len(correct[name])
        if name in nll:
            metrics[f"{name}/nll"] = nll[name]
    return metrics


def accuracy_splits(splits: dict[str, Sequence[Item]]) -> list[str]:
    """Splits scored from greedy completions: all but the NLL-only ones (CodeAlpaca)."""
    return [name for name, items in splits.items() if items and items[0].metric != "nll"]


def nll_splits(splits: dict[str, Sequence[Item]]) -> list[str]:
    """Splits scored by reference NLL: those of the nll metric, and code besides its accuracy
    where its items have reference answers (the paper's CodeAlpaca metric)."""
    return [name for name, items in splits.items()
            if items and (items[0].metric == "nll" or items[0].domain == "code" and any(it.answer for it in items))]


def evaluate_model(model, tokenizer, splits: dict[str, Sequence[Item]], cfg: EvalConfig) -> dict[str, float]:
    """In-process evaluation: greedy completions, projection off, raw prompts; the scorers are
    checked first (`check_scorers`)."""
    check_scorers(splits)
    completions = {name: generate(model, tokenizer, [it.prompt for it in splits[name]],
                                  max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
                   for name in accuracy_splits(splits)}
    nll = {name: reference_nll(model, tokenizer, splits[name], cfg.batch_size) for name in nll_splits(splits)}
    return split_metrics(splits, completions, nll, cfg)
