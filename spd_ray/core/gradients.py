"""Gradients of the correctness-aligned loss w.r.t. the K/V projections (paper Eqs. 6-8).

For each calibration example, the loss is its own mean cross-entropy over its correctness tokens
(labels != -100). We take d(loss)/d(output of k_proj / v_proj) at each target layer: pre-RoPE,
pre k-norm, the flattened kv_dim vector. Every non-pad token of every sequence is a row of G.
Batches sum the per-example losses, so each row equals its single-example gradient.

`accumulate_kv_gradient_stats` gives exactly the statistics of the paper's one-example-at-a-time
stacked G (`stacked_kv_gradients`), with less work, none of which changes a row:
- parameters are frozen while it runs, so no autograd graph is built below the lowest target
  k_proj / v_proj (nothing there needs a gradient) and no parameter gradient is ever formed;
- the output head (vocab-sized: 151,936 columns on Qwen), and the last decoder layer's MLP (whose
  output only the head reads), run only at the positions that predict a correctness token, not
  at every position;
- an example's positions after its last prediction position feed no loss (causal attention), so
  they are not computed: their rows of G are exactly zero and are only counted (they still shift
  the mean that centring subtracts);
- examples are re-batched sorted by the length they need, right-padded, with plain causal
  attention (a real position never sees a pad that comes after it), to limit padding.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spd_ray.core.batching import padded_batch
from spd_ray.core.modeling import decoder_layers, kv_linears
from spd_ray.core.subspace import SufficientStats


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _targets(model, layers: list[int]) -> dict[tuple[int, str], torch.nn.Module]:
    return {(layer, kind): m for layer in layers for kind, m in kv_linears(model, layer).items()}


def _no_labels_error(n: int) -> ValueError:
    return ValueError(
        f"{n} example(s) in this batch have no labeled (correctness) token after the causal "
        "shift: skip them before calibration"
    )


def _per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over each example's labeled positions (causal shift), shape (B,)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    n = (labels != -100).sum(1)
    if (n == 0).any():
        raise _no_labels_error(int((n == 0).sum()))
    return ce.sum(1) / n


@dataclass
class _Row:
    ids: torch.Tensor  # the input tokens the loss depends on: positions 0..need-1
    targets: torch.Tensor  # target of each of those positions (the next token), -100 if none
    tail: int  # non-pad positions after them: their gradient rows are exactly zero


def _rows(batches: Iterable[dict]) -> list[_Row]:
    """Each example's needed prefix, without padding (left or right)."""
    rows: list[_Row] = []
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        missing = 0
        for i in range(ids.shape[0]):
            keep = mask[i].bool()
            row_ids, targets = ids[i][keep].cpu(), labels[i][keep][1:].cpu()
            labeled = (targets != -100).nonzero()
            if len(labeled) == 0:
                missing += 1
                continue
            need = int(labeled[-1]) + 1  # the last position that predicts a labeled token, +1
            rows.append(_Row(row_ids[:need], targets[:need], len(row_ids) - need))
        if missing:
            raise _no_labels_error(missing)
    return rows


@contextmanager
def _frozen(model):
    """Eval mode and no parameter requiring grad (so no graph forms below the first probe);
    both restored afterwards."""
    params = list(model.parameters())
    flags, training = [p.requires_grad for p in params], model.training
    try:
        for p in params:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(training)


@contextmanager
def _last_mlp_only_at(model, select: dict):
    """Within the block the LAST decoder layer's MLP runs only at `select["mask"]` positions, and
    gives zeros elsewhere. Exact for the loss: the last layer's output is read only by the
    (per-position) final norm and head, at the selected positions. Left alone for a model whose
    last layer has no `mlp` module taking (batch, positions, hidden)."""
    try:
        mlp = getattr(decoder_layers(model)[-1], "mlp", None)
    except ValueError:
        mlp = None
    if not isinstance(mlp, torch.nn.Module):
        yield
        return
    shapes: list = []

    def pre(module, args, kwargs):
        mask = select["mask"]
        if not args or not torch.is_tensor(args[0]) or args[0].shape[:2] != mask.shape:
            shapes.append(None)  # an unexpected layout: run it as it is
            return None
        shapes.append(args[0].shape[:-1])
        return (args[0][mask][None], *args[1:]), kwargs

    def post(module, args, kwargs, out):
        shape = shapes.pop()
        if shape is None:
            return None
        full = out.new_zeros(*shape, out.shape[-1])
        return full.index_put((select["mask"],), out[0])

    handles = [mlp.register_forward_pre_hook(pre, with_kwargs=True),
               mlp.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _head_only_at(model, select: dict):
    """Within the block the output head sees only the hidden states at `select["mask"]` (B x T):
    its input becomes (1, N, hidden), so the logits are (1, N, vocab), and `select["gathered"]`
    says so. As a pre-hook on the head module, any logit post-processing of the model's own
    forward (e.g. soft-capping) still runs."""
    head = model.get_output_embeddings()

    def pre(module, args, kwargs):
        mask = select["mask"]
        if not args or not torch.is_tensor(args[0]) or args[0].shape[:2] != mask.shape:
            return None  # an unexpected layout: full logits, gathered afterwards
        select["gathered"] = True
        return (args[0][mask][None], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(pre, with_kwargs=True) if head is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@contextmanager
def _zero_probes(targets: dict[tuple[int, str], torch.nn.Module], probes: dict):
    """Within the block each target's output gets a fresh zero leaf added, kept in `probes`."""

    def hook(key):
        # out + a zero leaf: its gradient is d(loss)/d(out) through every path, including through
        # later target layers, and needs no parameter gradients (a detached copy would cut those)
        def fn(module, args, out):
            probes[key] = torch.zeros_like(out, requires_grad=True)
            return out + probes[key]

        return fn

    handles = [m.register_forward_hook(hook(key)) for key, m in targets.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _losses_and_probe_grads(
    model, ids: torch.Tensor, tgt: torch.Tensor, select: dict, probes: dict, keys: list
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward and backward of a right-padded batch: each example's mean loss over its
    targets (B,), and the gradient of their sum w.r.t. each key's probe (zeros if unreached)."""
    sel = tgt != -100
    select.update(mask=sel, gathered=False)
    probes.clear()
    with torch.enable_grad():
        # no attention mask: with right padding and causal attention no real position attends
        # to a pad, and pad positions feed no loss
        logits = model(input_ids=ids, use_cache=False).logits
        if not select["gathered"]:  # the head ran on every position
            logits = logits[sel][None]
        ce = F.cross_entropy(logits[0].float(), tgt[sel], reduction="none")
        example = sel.nonzero()[:, 0]  # row-major, the order of h[sel]
        losses = torch.zeros(len(ids), device=ids.device).index_add(0, example, ce)
        losses = losses / sel.sum(1)
        grads = torch.autograd.grad(losses.sum(), [probes[k] for k in keys], allow_unused=True)
    return losses, [torch.zeros_like(probes[k]) if g is None else g
                    for k, g in zip(keys, grads, strict=True)]


def accumulate_kv_gradient_stats(
    model,
    batches: Iterable[dict],
    layers: list[int],
    stats: dict | None = None,
    batch_size: int | None = None,
) -> tuple[dict[tuple[int, str], SufficientStats], float]:
    """Sufficient statistics of the K/V gradient rows, and the mean calibration loss.

    `batches` hold `input_ids`, `labels` (-100 = not a correctness token) and optionally
    `attention_mask` (left or right padding). Their examples are re-batched by length into
    batches of `batch_size` rows (default: the largest incoming batch), so the number of forward
    passes is ceil(examples / batch_size).
    """
    batches = list(batches)
    targets = _targets(model, layers)
    stats = {} if stats is None else stats
    for key, module in targets.items():
        stats.setdefault(key, SufficientStats.zeros(module.out_features))
    rows = _rows(batches)
    size = batch_size or max((int(b["input_ids"].shape[0]) for b in batches), default=1)
    order = sorted(rows, key=lambda r: len(r.ids), reverse=True)
    probes: dict[tuple[int, str], torch.Tensor] = {}
    select: dict = {}
    device, loss_sum, n_examples = _device(model), 0.0, 0
    keys = list(targets)
    with (_frozen(model), _head_only_at(model, select), _last_mlp_only_at(model, select),
          _zero_probes(targets, probes)):
        try:
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                # pads of id 0 (the first row is the longest): no real position attends to them
                batch = padded_batch([r.ids for r in chunk], [r.targets for r in chunk], pad=0)
                ids, tgt = batch["input_ids"].to(device), batch["labels"].to(device)
                used = batch["attention_mask"].bool().to(device)
                losses, grads = _losses_and_probe_grads(model, ids, tgt, select, probes, keys)
                for key, g in zip(keys, grads, strict=True):
                    stats[key].update(g[used].float())
                loss_sum += float(losses.detach().sum())
                n_examples += len(chunk)
        finally:
            select.clear()
    tail = sum(r.tail for r in rows)
    for key in keys:  # the exactly-zero rows past each example's last prediction position
        stats[key].count += tail
    return stats, loss_sum / max(n_examples, 1)


def stacked_kv_gradients(
    model, examples: Iterable[dict], layers: list[int]
) -> dict[tuple[int, str], torch.Tensor]:
    """The paper's reference: one example at a time, gradients stacked into G (M x d) float64.

    Each example has 1-D `input_ids` and `labels` (and optionally `attention_mask`, whose zero
    positions are dropped, so rows of a padded batch can be passed as they are).
    """
    targets = _targets(model, layers)
    rows: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in targets}
    outs: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def fn(module, args, out):
            outs[key] = out

        return fn

    handles = [m.register_forward_hook(hook(key)) for key, m in targets.items()]
    device = _device(model)
    try:
        with torch.enable_grad():
            for ex in examples:
                ids, labels = torch.as_tensor(ex["input_ids"]), torch.as_tensor(ex["labels"])
                if "attention_mask" in ex:
                    keep = torch.as_tensor(ex["attention_mask"]).bool()
                    ids, labels = ids[keep], labels[keep]
                ids, labels = ids[None].to(device), labels[None].to(device)
                # a leaf input so the graph reaches every k/v output even with frozen weights
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, use_cache=False).logits
                loss = _per_example_loss(logits, labels).sum()
                keys = list(targets)
                grads = torch.autograd.grad(loss, [outs[k] for k in keys])
                for key, g in zip(keys, grads, strict=True):
                    rows[key].append(g[0].detach().to("cpu", torch.float64))
    finally:
        for h in handles:
            h.remove()
    return {key: torch.cat(r) for key, r in rows.items()}
