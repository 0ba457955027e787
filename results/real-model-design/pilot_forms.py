import random
import sys
import time

import torch

torch.set_num_threads(2)
from spd_ray.core.generation import generate
from spd_ray.core.modeling import load_model, load_tokenizer
from spd_ray.tasks.scoring import score_math

path, dtype, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cells = sys.argv[4].split(",")
tok = load_tokenizer(path); m = load_model(path, dtype=dtype, device="cpu")
NAMES=["Tom","Ana","Ben","Mia","Sam","Lily","Omar","Zoe","Raj","Eva","Leo","Ivy"]; OBJ=["apples","pens","books","cards","marbles","stickers"]
def make(kind, rng):
    nm, o = rng.choice(NAMES), rng.choice(OBJ)
    if kind == "add_small":
        a,b = rng.randint(2,20), rng.randint(2,20); return f"{nm} has {a} {o} and buys {b} more. How many {o} does {nm} have now?", a+b
    if kind == "add_big":
        a,b = rng.randint(10,60), rng.randint(10,40); return f"{nm} has {a} {o} and buys {b} more. How many {o} does {nm} have now?", a+b
    if kind == "sub_small":
        a = rng.randint(8,30); b = rng.randint(2,a-2); return f"{nm} has {a} {o} and gives {b} to a friend. How many {o} does {nm} have now?", a-b
    if kind == "add2_small":
        a,b,c = rng.randint(2,15), rng.randint(2,15), rng.randint(2,15); return f"{nm} has {a} {o}. {nm} buys {b} more, then finds {c} more. How many {o} does {nm} have now?", a+b+c
    if kind == "addsub_small":
        a,b = rng.randint(5,20), rng.randint(2,15); c = rng.randint(2, a+b-2); return f"{nm} has {a} {o}. {nm} buys {b} more, then gives {c} to a friend. How many {o} does {nm} have now?", a+b-c
    if kind == "mul_small":
        a,b = rng.randint(2,6), rng.randint(2,10); return f"{nm} buys {a} bags with {b} {o} in each bag. How many {o} does {nm} buy?", a*b
forms = {"bare": (None, "{q}"), "hash": (None, "{q}\nWrite the final answer after ####."),
         "sys": ("Solve the math problem step by step. End with the final answer after ####.", "{q}")}
for cell in cells:
    kind, form = cell.split(":")
    rng = random.Random(7)
    items = [make(kind, rng) for _ in range(n)]
    sysmsg, tmpl = forms[form]
    prompts = [tok.apply_chat_template(([{"role":"system","content":sysmsg}] if sysmsg else []) + [{"role": "user", "content": tmpl.format(q=q)}], tokenize=False, add_generation_prompt=True) for q, _ in items]
    t = time.time()
    outs = generate(m, tok, prompts, max_new_tokens=128, batch_size=64)
    acc = sum(score_math(o, str(g)) for o, (q, g) in zip(outs, items)) / n
    print(dtype, cell, f"acc {acc:.3f} hash {sum('####' in o for o in outs)/n:.2f} {time.time()-t:.0f}s", repr(outs[0][:150]), flush=True)
