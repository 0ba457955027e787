import warnings

import torch

from spd_ray.core.generation import _kept, cache_keyword, counter_uniform, generate, sample_tokens


def test_greedy_matches_hf_generate_and_is_batch_independent(testbed_model, testbed_tokenizer):
    tok = testbed_tokenizer
    prompts = ["Question: Tom has 3 pens. Tom buys 4 more. How many pens does Tom have now?\nAnswer:",
               "Question: Which number is the largest?\nA. 3\nB. 9\nC. 1\nD. 4\nAnswer:",
               "Instruction: Write a function f(x) that returns x plus 2."]
    batched = generate(testbed_model, tok, prompts, max_new_tokens=12, batch_size=3)
    single = [generate(testbed_model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    for prompt, ours in zip(prompts, single):
        enc = tok(prompt, return_tensors="pt")
        ref = testbed_model.generate(**enc, max_new_tokens=12, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
        text = tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == ours


def test_sampling_is_seeded_per_row(testbed_model, testbed_tokenizer):
    prompts = ["Question: Ana has 5 eggs. Ana buys 7 more. How many eggs does Ana have now?\nAnswer:"] * 4
    kw = dict(max_new_tokens=16, temperature=1.5, top_p=1.0)
    a = generate(testbed_model, testbed_tokenizer, prompts, seeds=[1, 2, 3, 4], batch_size=4, **kw)
    b = generate(testbed_model, testbed_tokenizer, prompts[:2][::-1], seeds=[2, 1], batch_size=1, **kw)
    assert a[:2] == b[::-1]  # a row's sample depends on its seed, not on its batch
    assert len(set(a)) > 1  # different seeds give different samples at a hot temperature


def test_a_sample_is_the_same_in_a_batch_of_64_as_alone(testbed_model, testbed_tokenizer):
    """Stage 2's settings (T 0.7, top-p 0.9, 64 rows a batch): every row's text is the one it gets
    decoded alone, though its batch left-pads it beside prompts of every domain."""
    from spd_ray.tasks.testbed import make_split

    prompts = [it.prompt for d in ("math", "mcq", "code") for it in make_split(d, "train", 22)][:64]
    kw = dict(max_new_tokens=16, temperature=0.7, top_p=0.9, seeds=list(range(500, 564)))
    batched = generate(testbed_model, testbed_tokenizer, prompts, batch_size=64, **kw)
    alone = generate(testbed_model, testbed_tokenizer, prompts, batch_size=1, **kw)
    assert batched == alone
    assert len(set(batched)) > 32  # real, varied samples


def test_top_k_and_top_p_filters():
    vals = torch.tensor([[3.0, 2.0, 1.0, 0.0]])  # probabilities 0.64, 0.24, 0.09, 0.03
    lse = vals.logsumexp(-1, keepdim=True)
    assert _kept(vals, lse, 2, 1.0)[1].tolist() == [[True, True, False, False]]
    p, kept = _kept(vals, lse, 0, 0.7)
    assert kept.tolist() == [[True, True, False, False]] and p[0, 0] < 0.7
    assert _kept(vals, lse, 0, 0.5)[1].tolist() == [[True, False, False, False]]
    # top-p over the top-k tokens' mass: 0.64 / 0.88 = 0.73 of it reaches 0.7 alone
    assert _kept(vals, lse, 2, 0.7)[1].tolist() == [[True, False, False, False]]
    # tokens of equal probability are kept or dropped together, whatever their order
    tied = torch.tensor([[2.0, 1.0, 1.0, 1.0, -5.0]])
    for top_p in (0.5, 0.6, 0.99):
        kept = _kept(tied, tied.logsumexp(-1, keepdim=True), 0, top_p)[1][0].tolist()
        assert kept[1] == kept[2] == kept[3] and kept[0], (top_p, kept)
    assert _kept(tied, tied.logsumexp(-1, keepdim=True), 2, 1.0)[1].tolist() == [[True] * 4 + [False]]


def test_stops_at_every_eos_id_of_the_generation_config(testbed_model, testbed_tokenizer):
    """A model whose generation config lists two EOS ids (as Qwen2.5-Instruct's does) ends a
    completion at either, as HF `generate` (and vLLM) do, not only at the tokenizer's."""
    import copy

    tok = testbed_tokenizer
    prompt = "Question: Tom has 3 pens. Tom buys 4 more. How many pens does Tom have now?\nAnswer:"
    enc = tok(prompt, return_tensors="pt")
    free = testbed_model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    new = free[0, enc["input_ids"].shape[1]:].tolist()
    # a token of the free completion, the first of its kind after two others, becomes an EOS id
    at = next(i for i, t in enumerate(new) if i >= 2 and t not in new[:i])
    stop = new[at]
    assert stop != tok.eos_token_id and tok.eos_token_id not in new[:at]
    model = copy.deepcopy(testbed_model)
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    ours = generate(model, tok, [prompt, "Question: Which number is the largest?"], max_new_tokens=12)[0]
    assert ours == tok.decode(new[:at], skip_special_tokens=True)
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert ref[0, enc["input_ids"].shape[1]:].tolist() == new[:at + 1]  # HF ends there too (keeping it)
    # the unchanged model does not stop there
    assert generate(testbed_model, tok, [prompt], max_new_tokens=12)[0] != ours


def test_counter_noise_depends_on_seed_and_step_alone():
    seeds = torch.arange(20000, dtype=torch.int64) * 7919 + 2**31
    u = counter_uniform(seeds, 5)
    assert u.shape == seeds.shape and float(u.min()) > 0 and float(u.max()) < 1
    assert torch.equal(counter_uniform(seeds[2:3], 5), u[2:3])  # a row's noise ignores its batch
    assert torch.equal(counter_uniform(seeds, torch.full_like(seeds, 5)), u)  # a step per row, the same
    assert not torch.equal(counter_uniform(seeds, 6), u)  # a new step, new noise
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    # successive steps of a row are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([u, counter_uniform(seeds, 6)]))[0, 1])) < 0.03


def _reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The filtered distribution written the textbook way: sort, cumulate, cut (no ties here)."""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    ranked = probs[order] / probs[order][: top_k or None].sum()
    before = ranked.cumsum(0) - ranked
    keep[order[: top_k or None]] = (before < top_p)[: top_k or None]
    return torch.where(keep, probs, 0) / torch.where(keep, probs, 0).sum()


def test_the_sampler_draws_the_filtered_softmax():
    """Over 20,000 seeds the sampled frequencies match softmax(logits / T) within top-k / top-p,
    and tokens outside the nucleus are never drawn."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0, 0.5, -0.5])
    seeds = torch.arange(20000, dtype=torch.int64)
    for temperature, top_k, top_p in ((0.7, 0, 0.9), (1.0, 0, 1.0), (1.3, 4, 1.0), (0.9, 5, 0.8)):
        drawn = sample_tokens(logits.expand(len(seeds), -1), seeds, 3, temperature, top_k, top_p, candidates=3)
        freq = torch.bincount(drawn, minlength=len(logits)).double() / len(seeds)
        expected = _reference_probs(logits, temperature, top_k, top_p)
        assert torch.allclose(freq, expected, atol=0.012), (temperature, top_k, top_p, freq, expected)
        assert freq[expected == 0].sum() == 0


def test_the_candidate_shortcut_never_changes_a_token():
    """Rows whose nucleus is wider than the candidates are redone over the whole vocabulary:
    any number of candidates draws the very same tokens, flat and peaked rows alike."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(96, 500, generator=gen) * torch.linspace(0.1, 12, 96)[:, None]
    logits[:8, :40] = 4.0  # exact ties, at the nucleus boundary or inside it
    seeds = torch.arange(96, dtype=torch.int64) + 1000
    for temperature, top_k, top_p in ((0.7, 0, 0.9), (1.0, 50, 0.95), (0.5, 20, 1.0), (1.0, 0, 0.3)):
        full = sample_tokens(logits, seeds, 7, temperature, top_k, top_p, candidates=500)
        for candidates in (1, 8, 64):
            assert torch.equal(sample_tokens(logits, seeds, 7, temperature, top_k, top_p, candidates), full)
        # and a row alone draws what it draws in the batch
        assert all(int(sample_tokens(logits[i:i + 1], seeds[i:i + 1], 7, temperature, top_k, top_p, 8)) == full[i]
                   for i in range(0, 96, 7))


def test_continuous_batching_gives_the_texts_of_static_batches(testbed_model, testbed_tokenizer):
    """Prompts of mixed lengths whose completions end at different steps: with 4 slots refilled
    one at a time, every text equals static batching's and batch 1's, sampled and greedy."""
    from spd_ray.tasks.testbed import make_split

    tok = testbed_tokenizer
    prompts = [it.prompt for d in ("math", "code", "mcq") for it in make_split(d, "train", 6)]
    seeds = list(range(100, 100 + len(prompts)))
    prefills: list[int] = []  # rows per prompt-prefilling call
    hook = testbed_model.register_forward_pre_hook(
        lambda m, a, kw: prefills.append(len(kw["input_ids"])) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        for kw in (dict(temperature=0.7, top_p=0.9, seeds=seeds), dict()):
            prefills.clear()
            stream = generate(testbed_model, tok, prompts, max_new_tokens=40, batch_size=4, refill=1, **kw)
            refills = list(prefills)
            prefills.clear()
            static = generate(testbed_model, tok, prompts, max_new_tokens=40, batch_size=4, refill=4, **kw)
            assert prefills == [4, 4, 4, 4, 2]  # static: a batch starts when the last one has ended
            single = [generate(testbed_model, tok, [p], max_new_tokens=40, seeds=[s] if kw else None,
                               **{k: v for k, v in kw.items() if k != "seeds"})[0]
                      for p, s in zip(prompts, seeds)]
            assert stream == static == single
            assert len({len(t) for t in stream}) > 3  # rows ended apart
            assert len(refills) > 5 and sum(refills) == len(prompts) and min(refills) < 4  # slots handed over
    finally:
        hook.remove()


def test_the_cache_goes_by_the_name_the_forward_takes(testbed_model, testbed_tokenizer):
    """transformers 5.25 renamed `past_key_values` to `cache` (the old name goes in 5.40): decoding
    passes the new name where the forward takes it, so it warns of nothing, and the old one to a
    model whose own code knows only that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        generate(testbed_model, testbed_tokenizer, ["Question: 2 + 3?\nAnswer:"], max_new_tokens=4)

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            return input_ids

    assert cache_keyword(OldStyle()) == "past_key_values"
    assert cache_keyword(testbed_model) == "cache"
