"""Make the embedded testbed's tiny base model (shipped in spd_ray/testbed_model/).

A Qwen2-architecture causal LM (k/v biases, GQA, RoPE, like the paper's backbones) with a
byte-level BPE fast tokenizer, trained from scratch on the testbed's noisy `pretrain` split:
mixed solution styles, formatting artefacts and 20-25% wrong answers in all three domains, with
a small share of transfer-format items. The budget is chosen so the model ends partially
competent (room for self-distillation to help) rather than solved.

    python jobs/make_testbed_model.py            # reproduces the shipped model (~20 min, 2 cores)
    python jobs/make_testbed_model.py --steps 50 --out /tmp/m   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from spd_ray.config import TESTBED_MODEL, EvalConfig
from spd_ray.tasks.evaluation import evaluate_model
from spd_ray.tasks.item import DOMAINS, EVAL_SPLITS
from spd_ray.tasks.testbed import make_split

# Qwen2's own pre-tokenization (transformers' Qwen2Tokenizer): `AutoTokenizer` loads a folder whose
# config says qwen2 as Qwen2Tokenizer, which rebuilds this pipeline around the saved vocab and
# merges, so the tokenizer must be trained with exactly it (single digits included: \p{N}).
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_tokenizer(texts: list[str], vocab_size: int, out: Path, config: Qwen2Config):
    """A byte-level BPE trained with Qwen2's pre-tokenization, saved beside the model config and
    reloaded with AutoTokenizer; only the reloaded tokenizer is used, and it must tokenize the
    corpus exactly as the trained one does (checked)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    config.save_pretrained(out)  # so AutoTokenizer resolves the class the model's users will get
    fast.save_pretrained(out)
    loaded = AutoTokenizer.from_pretrained(out)
    sample = texts[:: max(1, len(texts) // 2000)]
    mismatch = [t for t in sample if loaded(t)["input_ids"] != tok.encode(t).ids]
    if mismatch:
        raise RuntimeError(f"{type(loaded).__name__} tokenizes {len(mismatch)}/{len(sample)} texts "
                           f"differently from the trained tokenizer, e.g. {mismatch[0]!r}")
    return loaded


def batches(tokenizer, texts: list[str], batch_size: int, max_length: int, rng: random.Random):
    """Endless shuffled batches; examples of similar length share a batch (less padding)."""
    while True:
        idx = list(range(len(texts)))
        rng.shuffle(idx)
        groups = [idx[i : i + batch_size * 16] for i in range(0, len(idx), batch_size * 16)]
        for group in groups:
            group.sort(key=lambda i: len(texts[i]))
            chunks = [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
            rng.shuffle(chunks)
            for chunk in chunks:
                tokenizer.padding_side = "right"
                enc = tokenizer([texts[i] + tokenizer.eos_token for i in chunk], padding=True,
                                truncation=True, max_length=max_length, return_tensors="pt")
                labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                yield enc["input_ids"], enc["attention_mask"], labels


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(TESTBED_MODEL))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--corpus", type=int, default=60000,
                    help="pretrain items per domain (mcq gets 1.5x: its answer-letter pointer is learned last)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def adamw_cosine(model, lr: float, steps: int, warmup: int = 100):
    """AdamW, with a linear warm-up then a cosine decay to a tenth of `lr` at `steps`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup)
        * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    return opt, sched


def greedy_accuracy(model, tokenizer) -> dict[str, float]:
    """Greedy accuracy on 100 items of every domain's evaluation splits, by `domain/split`."""
    model.eval()
    splits = {f"{d}/{s}": make_split(d, s, 100) for d in DOMAINS for s in EVAL_SPLITS}
    return {k.removesuffix("/accuracy"): v for k, v in evaluate_model(
        model, tokenizer, splits, EvalConfig(max_new_tokens=96)).items() if k.endswith("accuracy")}


def train(model, tokenizer, stream, opt, sched, args: argparse.Namespace, t0: float) -> list[dict]:
    """`args.steps` optimizer steps on the stream's batches, with a log line every 50 steps and
    the greedy accuracy every `args.eval_every` and at the end (returned, by step)."""
    tokens, history = 0, []
    for step in range(1, args.steps + 1):
        model.train()
        ids, mask, labels = next(stream)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        if step % 50 == 0:
            rate = tokens / (time.time() - t0)
            print(f"step {step}/{args.steps} loss {loss.item():.3f} {rate:.0f} tok/s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            acc = greedy_accuracy(model, tokenizer)
            history.append({"step": step, **acc})
            print(f"step {step} greedy accuracy: " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()),
                  flush=True)
    return history


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    sizes = {"math": args.corpus, "mcq": args.corpus * 3 // 2, "code": args.corpus}
    texts = [it.text for d in DOMAINS for it in make_split(d, "pretrain", sizes[d], seed=args.seed)]
    config = Qwen2Config(
        vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, rope_theta=10000.0, eos_token_id=0, pad_token_id=1, bos_token_id=0,
    )  # ids 0 and 1 are the tokenizer's first special tokens
    tokenizer = build_tokenizer(texts[:: max(1, len(texts) // 30000)], config.vocab_size, out, config)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1) and len(tokenizer) <= config.vocab_size
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, corpus {len(texts)} texts", flush=True)
    opt, sched = adamw_cosine(model, args.lr, args.steps)
    stream = batches(tokenizer, texts, args.batch_size, 256, rng)
    t0 = time.time()
    history = train(model, tokenizer, stream, opt, sched, args, t0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(
        {"args": vars(args), "parameters": n_params, "minutes": (time.time() - t0) / 60,
         "history": history}, indent=1))
    print(f"saved to {out} after {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
