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
P=[("Tom","he"),("Ana","she"),("Ben","he"),("Mia","she"),("Sam","he"),("Lily","she"),("Omar","he"),("Zoe","she"),("Raj","he"),("Eva","she"),("Leo","he"),("Ivy","she")]
OBJ=["apples","pens","books","cards","marbles","stickers","cookies","shells","coins","stamps"]
def make(kind, rng):
    (nm, he), o = rng.choice(P), rng.choice(OBJ)
    lo, hi, kh = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    a,b = rng.randint(lo,hi), rng.randint(lo,hi)
    k,mm = rng.randint(2,kh), rng.randint(2,kh)
    s = rng.randint(2, a-1) if a > 3 else 1
    return {
    "add1": (f"{nm} has {a} {o} and buys {b} more. How many {o} does {nm} have now?", a+b),
    "add2": (f"{nm} has {a} {o}. A friend gives {nm} {b} more {o}. How many {o} does {nm} have now?", a+b),
    "add3": (f"{nm} had {a} {o}. Then {he} found {b} more. How many {o} does {nm} have in all?", a+b),
    "sub1": (f"{nm} has {a} {o} and gives {s} to a friend. How many {o} does {nm} have now?", a-s),
    "sub2": (f"{nm} had {a} {o}. {he.capitalize()} lost {s} of them. How many {o} does {nm} have left?", a-s),
    "sub3": (f"{nm} has {a} {o}. {he.capitalize()} eats {s} of them. How many {o} are left?", a-s),
    "mul1": (f"{nm} buys {k} bags with {mm} {o} in each bag. How many {o} does {nm} buy?", k*mm),
    "mul2": (f"{nm} has {k} boxes. Each box holds {mm} {o}. How many {o} does {nm} have?", k*mm),
    "sadd1": (f"There are {a} {o} in a box. {nm} puts {b} more {o} in the box. How many {o} are in the box now?", a+b),
    "sadd2": (f"A shop had {a} {o}. A delivery brought {b} more. How many {o} does the shop have now?", a+b),
    "ssub1": (f"There are {a} {o} in a box. {nm} takes {s} {o} out of the box. How many {o} are left in the box?", a-s),
    "ssub2": (f"A shop had {a} {o}. It sold {s} of them. How many {o} does the shop have now?", a-s),
    "smul1": (f"There are {k} boxes and each box holds {mm} {o}. How many {o} are there in all?", k*mm),
    "smul2": (f"A class has {k} tables. There are {mm} {o} on each table. How many {o} are on the tables?", k*mm),
    "t1": (f"In a garden there are {a} roses. {nm} plants {b} more roses. How many roses are in the garden now?", a+b),
    "t2": (f"{nm} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {nm} read in total?", a+b),
    "t3": (f"A bus has {a} people on it. At the next stop, {b} more people get on. How many people are on the bus now?", a+b),
    "t4": (f"A bus has {a} people on it. At the next stop, {s} people get off. How many people are on the bus now?", a-s),
    "t5": (f"There are {k} rows of chairs with {mm} chairs in each row. How many chairs are there?", k*mm),
    "t6": (f"A basket holds {a} eggs. {s} of the eggs break. How many eggs are not broken?", a-s),
    "t7": (f"{nm} saves {mm} dollars every week. How many dollars does {nm} save in {k} weeks?", k*mm),
    "t8": (f"A tree has {a} birds in it. {s} birds fly away. How many birds are still in the tree?", a-s),
    }[kind]
for kind in cells:
    rng = random.Random(11)
    items = [make(kind, rng) for _ in range(n)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q, _ in items]
    t = time.time()
    outs = generate(m, tok, prompts, max_new_tokens=128, batch_size=64)
    acc = sum(score_math(o, str(g)) for o, (q, g) in zip(outs, items)) / n
    print(dtype, kind, f"acc {acc:.3f} hash {sum('####' in o for o in outs)/n:.2f} {time.time()-t:.0f}s", flush=True)
