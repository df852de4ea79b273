"""Lookahead decoding (``method="lookahead"``): exact, and its pool holds the 2-D window's n-grams."""

from types import SimpleNamespace

import pytest
import torch
from test_layer_skip import ALPHA, V, chi2_pvalue, exact_distribution, sample_many

import mmspec
from mmspec.decoding import DecodeState
from mmspec.drafting.lookahead import LookaheadProposer, NGramPool, lookahead_config, rank_candidates
from mmspec.sampling import LogitsPipeline

from lm_fixtures import ragged_prompts, tiny_causal_lm

NEW = 24


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = tiny_causal_lm(arch, sharpen=4.0)
        return cache[arch]

    return get


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("with_eos", [False, True])
def test_greedy_equals_transformers(models, arch, batch, with_eos):
    target = models(arch)
    ids, mask = ragged_prompts(batch, 96, seed=batch)

    def reference(eos):
        return target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                               pad_token_id=0)

    eos = int(reference(None)[0, ids.shape[1] + NEW // 3]) if with_eos else None
    ref = reference(eos)
    for kw in (dict(), dict(lookahead=(3, 2, 2)), dict(lookahead=(10, 5, 10)), dict(window=5)):
        out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, method="lookahead",
                              eos_token_id=eos if with_eos else [], pad_token_id=0, **kw)
        assert torch.equal(out.sequences, ref), f"{arch} {kw}"
        assert out.stats.draft_forwards == 0 and out.lossless


def test_vlm_greedy_equals_generate():
    from vlm_fixtures import FAMILIES, family_batch

    build, _ = FAMILIES["qwen2_vl"]
    model, processor = build(seed=0)
    inputs = dict(family_batch("qwen2_vl", processor, 3, seed=3))
    ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=12, method="lookahead", **inputs)
    assert torch.equal(out.sequences, ref)


def test_pool_ranking_and_eviction():
    pool = NGramPool(size=2)
    pool.add(4, (5, 6))
    pool.add(4, (7, 8), context=3)
    pool.add(4, (5, 6))  # seen twice: highest score
    assert rank_candidates(pool, 4, 5) == [(5, 6), (7, 8)]
    assert rank_candidates(pool, 4, 5, context=3) == [(7, 8), (5, 6)]  # the same context ranks first
    assert rank_candidates(pool, 4, 1) == [(5, 6)]
    pool.add(4, (9, 9))  # third continuation: the least recent one, (7, 8), is evicted
    assert set(rank_candidates(pool, 4, 5)) == {(5, 6), (9, 9)}
    assert rank_candidates(pool, 11, 5) == []


def _step(state, prop, outputs, emitted):
    """One loop step with the target's argmax outputs [L] and the emitted tokens (accepted + next)."""
    drafts, probs = prop.propose(state, 3)
    assert probs is None
    rows = torch.nn.functional.one_hot(torch.tensor([outputs]), 20).double()
    row = torch.tensor([emitted + [-1] * (len(outputs) - len(emitted))])
    state.append(row)
    prop.update(state, SimpleNamespace(next_token=torch.tensor([emitted[-1]])), rows, torch.tensor([len(emitted) - 1]))
    return drafts[0].tolist()


def test_window_ngrams_and_candidates():
    """Hand-checked 2-D window with N = 3: the n-gram ending at an output takes the previous iteration's token
    one position back (the diagonal), not this iteration's."""
    ids = torch.tensor([[5, 6]])
    state = DecodeState(ids, torch.ones_like(ids), 10, 20, LogitsPipeline(False, 1.0, None, None), None, "cpu")
    state.append(torch.tensor([[7]]))
    prop = LookaheadProposer(3, 3, 4)
    prop.start(state)
    assert rank_candidates(prop.pools[0], 5, 4) == [(6, 7)]  # the prompt's n-grams
    # Step 1: nothing known after 7, so the window repeats it; the target says 8 9 10 11.
    assert _step(state, prop, [8, 9, 10, 11], [8]) == [7, 7, 7]
    assert (7, 9) in rank_candidates(prop.pools[0], 7, 9)
    # Step 2: the Jacobi slots hold the previous predictions 9 10 11; 9 is accepted.
    assert _step(state, prop, [9, 12, 13, 14], [9, 12]) == [9, 10, 11]
    pool = prop.pools[0]
    assert (8, 9) in rank_candidates(pool, 6, 9) or (8, 9) in rank_candidates(pool, 7, 9)
    assert (10, 13) in rank_candidates(pool, 7, 9, context=8)  # diagonal: level-1 token 7 at p - 1
    assert (10, 13) not in rank_candidates(pool, 9, 9)  # not the horizontal (9, 10, 13)
    # Step 3: a pool candidate after the anchor 12 leads the drafts; 1 and 2 are accepted, 3 comes next.
    state_tokens = state.tokens[0, : int(state.lengths[0])].tolist()
    assert state_tokens == [5, 6, 7, 8, 9, 12]
    pool.add(12, (1, 2), 5.0)
    assert _step(state, prop, [1, 2, 3, 4], [1, 2, 3])[:2] == [1, 2]
    assert prop.candidates_used >= 1


def test_compresses_steps_and_uses_candidates(models):
    target = models("gpt2")
    ids, mask = ragged_prompts(4, 96, seed=4)
    out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=32, method="lookahead", eos_token_id=[])
    jac = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=32, method="jacobi", window=8,
                          eos_token_id=[])
    assert torch.equal(out.sequences, jac.sequences)
    assert out.stats.step_compression > 1.5


@pytest.mark.parametrize("lookahead,window,message", [
    ((4, 3, 0), None, "pool"),
    ((0, 3, 4), None, "window"),
    ((4, 1, 4), None, "ngram"),
    ((4, 3), None, r"\(window, ngram, pool\)"),
    ((4, 3, 4), 8, "must be lookahead window"),
])
def test_bad_config(models, lookahead, window, message):
    ids, _ = ragged_prompts(1, 96)
    with pytest.raises(ValueError, match=message):
        mmspec.generate(models("llama"), ids, max_new_tokens=4, method="lookahead", lookahead=lookahead,
                        window=window)


def test_config_defaults():
    assert lookahead_config(None, None) == ((7, 4, 7), 8)
    assert lookahead_config(None, 5) == ((4, 4, 7), 5)
    with pytest.raises(ValueError, match="only used with method='lookahead'"):
        mmspec.generate(tiny_causal_lm("llama"), torch.tensor([[3, 4]]), max_new_tokens=2, lookahead=(4, 3, 4))


@pytest.mark.slow
@pytest.mark.parametrize("lookahead", [(3, 2, 4), (4, 3, 2)])
def test_sampling_is_lossless(lookahead):
    target = tiny_causal_lm("llama", vocab_size=V, hidden=16, layers=3, sharpen=3.0, seed=11)
    samples, stats = sample_many(target, method="lookahead", lookahead=lookahead)
    assert stats.step_compression > 1.0  # pool candidates were really accepted
    p = chi2_pvalue(samples, exact_distribution(target))
    assert p > ALPHA, f"lookahead {lookahead}: chi-square p = {p:.2e}"
