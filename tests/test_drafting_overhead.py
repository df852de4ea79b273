"""Drafters do no more work than needed: prompt lookup's choice among n-gram matches, and a draft model that
keeps its cache free of holes at batch size 1 and computes one logits row per draft forward."""

import pytest
import torch

import mmspec
from mmspec.decoding import DecodeState
from mmspec.drafting.lookup import LookupProposer
from mmspec.sampling import LogitsPipeline

from lm_fixtures import perturbed_copy, tiny_causal_lm


def _state(rows):
    ids = torch.tensor(rows)
    return DecodeState(ids, torch.ones_like(ids), 8, 100, LogitsPipeline(), None, torch.device("cpu"))


@pytest.mark.parametrize("tokens, expected", [
    ([5, 1, 2, 3, 4, 5, 6, 5], [1, 2, 3]),  # the latest "5" has only 2 tokens after it: the earlier one fills K=3
    ([5, 1, 2, 3, 5, 7, 8, 9, 5], [7, 8, 9]),  # two matches with a full continuation: the latest
    ([4, 5, 6, 5], [6, 5]),  # no full continuation anywhere: the longest one
])
def test_lookup_prefers_a_full_continuation_then_the_latest(tokens, expected):
    drafts, q = LookupProposer(3, max_ngram=1).propose(_state([tokens]), 3)
    assert drafts.tolist() == [expected] and q is None


def test_lookup_choice_is_per_row():
    rows = [[5, 1, 2, 3, 4, 5, 6, 5], [9, 9, 9, 9, 9, 9, 9, 9]]
    drafts, _ = LookupProposer(3, max_ngram=2).propose(_state(rows), 3)
    assert drafts.tolist() == [[1, 2, 3], [9, 9, 9]]


@pytest.mark.parametrize("tokens, expected", [
    ([5, 1, 2, 3, 4, 5, 6, 5], [1, 2, 3]),  # the first "5" wins even where a later one would do as well
    ([5, 1, 2, 3, 5, 7, 8, 9, 5], [1, 2, 3]),
    ([4, 5, 6, 5], [6, 5]),
    ([9, 4, 5, 9, 7, 8, 5, 9], [7, 8, 5]),  # the 2-gram "5 9" beats the earlier 1-gram match of "9"
    ([5, 1, 9, 5, 2, 9, 5, 9], [5, 2, 9]),  # "5 9" occurs only at the end: the first "9" then
])
def test_lookup_earliest_rule(tokens, expected):
    drafts, _ = LookupProposer(3, max_ngram=2, match="earliest").propose(_state([tokens]), 3)
    assert drafts.tolist() == [expected]


def test_lookup_earliest_rule_matches_transformers_prompt_lookup():
    """``lookup_match="earliest", max_ngram=2`` drafts what transformers' prompt lookup drafts: the same target
    forwards (counted with a hook on the model) and the same tokens, on prompts that repeat themselves."""
    model = tiny_causal_lm(vocab_size=24, sharpen=6.0, layers=1)
    gen = torch.Generator().manual_seed(3)
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    seen = set()
    for i in range(6):
        motif = torch.randint(2, 24, (5,), generator=gen)
        ids = torch.cat([motif, torch.randint(2, 24, (3,), generator=gen), motif, motif[:2]]).unsqueeze(0)
        calls[0] = 0
        ref = model.generate(ids, prompt_lookup_num_tokens=4, max_new_tokens=24, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        theirs = calls[0]
        out = mmspec.generate(model, ids, method="lookup", window=5, max_ngram=2, lookup_match="earliest",
                              max_new_tokens=24, eos_token_id=[], pad_token_id=0)
        assert torch.equal(out.sequences, ref)
        assert out.stats.target_forwards == theirs, (i, out.stats.target_forwards, theirs)
        seen.add(theirs)
    assert min(seen) < 24  # lookup really drafted (fewer forwards than tokens) on some prompts


def test_draft_model_batch_one_has_no_holes_and_one_logits_row():
    target = tiny_causal_lm(sharpen=4.0)
    draft = perturbed_copy(target, scale=0.5)
    ids = torch.randint(2, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    calls = []  # (tokens fed, logits rows returned, attention mask passed) per draft forward
    draft.register_forward_hook(
        lambda m, a, kw, out: calls.append((kw["input_ids"].shape[1], out.logits.shape[1], kw["attention_mask"])),
        with_kwargs=True)
    out = mmspec.generate(target, ids, method="draft", draft_model=draft, window=4, max_new_tokens=24, eos_token_id=[])
    ref = target.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    hist = out.stats.accepted_histogram
    assert hist[0] > 0 and sum(hist[1:]) > 0  # rejections happened (the pending block had a stale column to skip)
    steps = calls[1:]  # after the prefill
    assert steps and all(rows == 1 for _, rows, _ in steps)
    # Without holes the draft keeps the mask-free attention path: pending blocks are 1-2 tokens, no 2-D mask.
    assert all(fed <= 2 and mask is None for fed, _, mask in steps)
