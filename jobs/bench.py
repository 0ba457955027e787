"""Throughput benchmark: each figure is measured side by side, in one run, on one model and data.

    python jobs/bench.py                       # the shipped testbed model, CPU
    python jobs/bench.py --model PATH --device cuda --dtype bfloat16

1. decoding tokens/s: unprojected vs projection folded into the weights vs forward hooks
   (target: folded >= 0.99x unprojected);
2. capability-subspace extraction: batched sufficient statistics vs the paper's way (one example
   at a time, stacked gradient matrix, full SVD) (target: >= 10x faster);
3. fine-tuning useful (non-pad) tokens/s: padding to the batch's longest row vs padding every
   row to max_length (target: >= 2x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from spd_ray.config import TESTBED_MODEL, FinetuneConfig  # noqa: E402
from spd_ray.finetune import build_examples, collate, optimizer_and_schedule, prepare_model  # noqa: E402
from spd_ray.gradients import accumulate_kv_gradient_stats, stacked_kv_gradients  # noqa: E402
from spd_ray.modeling import load_model, load_tokenizer, resolve_layers  # noqa: E402
from spd_ray.projection import fold_projection, projection_hooks  # noqa: E402
from spd_ray.spans import calibration_batches  # noqa: E402
from spd_ray.subspace import build_subspace  # noqa: E402
from spd_ray.testbed import make_split  # noqa: E402


def best_of(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def decode(model, ids, mask, steps: int) -> None:
    """Prefill, then exactly `steps` greedy decode steps through the KV cache (no early stop)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TESTBED_MODEL))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--domain", default="math")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    model = load_model(args.model, args.dtype, args.device)
    tok = load_tokenizer(args.model)
    device = next(model.parameters()).device
    rows = []

    # 2. extraction (also gives the subspace used below)
    calib = make_split(args.domain, "calibration", 50)
    texts, rules = [it.text for it in calib], [it.span_rule for it in calib]
    layers = resolve_layers(model, None)

    def ours():
        batches, _ = calibration_batches(tok, texts, rules, batch_size=16, max_length=512)
        return build_subspace(accumulate_kv_gradient_stats(model, batches, layers)[0])

    def papers_way():
        singles, _ = calibration_batches(tok, texts, rules, batch_size=1, max_length=512)
        examples = [{"input_ids": b["input_ids"][0], "labels": b["labels"][0]} for b in singles]
        for g in stacked_kv_gradients(model, examples, layers).values():
            g = g - g.mean(0)
            torch.linalg.svd(g, full_matrices=False)

    subspace = ours()
    t_ours, t_paper = best_of(ours, args.repeats), best_of(papers_way, args.repeats)
    rows.append(("subspace extraction (s, 50 examples)", t_paper, t_ours, t_paper / t_ours, ">= 10x"))

    # 1. decoding throughput
    prompts = [it.prompt for it in make_split(args.domain, "train", args.batch)]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    folded = fold_projection(model, subspace)
    n_tokens = args.batch * args.new_tokens

    def run(m):
        return lambda: decode(m, enc["input_ids"], enc["attention_mask"], args.new_tokens)

    t_plain, t_folded = best_of(run(model), args.repeats), best_of(run(folded), args.repeats)
    with projection_hooks(model, subspace):
        t_hooks = best_of(run(model), args.repeats)
    rows.append(("decode tokens/s: folded vs unprojected", n_tokens / t_plain, n_tokens / t_folded,
                 t_plain / t_folded, ">= 0.99x"))
    rows.append(("decode tokens/s: hooks vs unprojected", n_tokens / t_plain, n_tokens / t_hooks,
                 t_plain / t_hooks, "(reference)"))

    # 3. fine-tuning useful tokens/s
    train = make_split(args.domain, "test", 64)
    cfg = FinetuneConfig(method="full", lr=1e-5, batch_size=8, max_length=256)
    examples = build_examples(tok, [it.prompt for it in train], [it.answer for it in train],
                              max_length=cfg.max_length)
    student = prepare_model(load_model(args.model, args.dtype, args.device), cfg)
    opt, _ = optimizer_and_schedule(student, cfg, total_steps=1000, steps_per_epoch=8)
    useful = sum(len(e["input_ids"]) for e in examples)

    def epoch(pad_to):
        def go():
            for i in range(0, len(examples), cfg.batch_size):
                batch = {k: v.to(device) for k, v in collate(examples[i:i + cfg.batch_size],
                                                              tok.pad_token_id, pad_to).items()}
                student(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return go

    t_dynamic, t_max = best_of(epoch(None), args.repeats), best_of(epoch(cfg.max_length), args.repeats)
    rows.append(("fine-tuning useful tokens/s: longest-row vs max-length padding", useful / t_max,
                 useful / t_dynamic, t_max / t_dynamic, ">= 2x"))

    print(f"\nmodel {args.model} on {args.device} ({args.dtype}), torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}\n")
    print("| measurement | baseline | spd-ray | ratio | target |\n|---|---|---|---|---|")
    for name, base, ours_, ratio, target in rows:
        print(f"| {name} | {base:.3g} | {ours_:.3g} | {ratio:.2f}x | {target} |")


if __name__ == "__main__":
    main()
