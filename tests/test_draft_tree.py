"""Draft-model trees (EAGLE-2 style, ``mmspec.drafting.draft_tree``): the draft cache after a step, the tree's shape,
a deliberately wrong sibling rule that the chi-square must reject, bad input.

Greedy identity (4 architectures, ragged batch of 5 with EOS, rows alone) and the exact-sampling chi-square at T=1 and
T=0.7 with top-k are the ``draft`` cases of tests/test_tree_decode.py (``TREE_CASES``, ``SAMPLED``).
"""

import pytest
import torch
from test_tree_decode import ALPHA, NEW, PROMPT, N, V, _exact, _pvalue, _Spy

import mmspec
import mmspec.drafting.draft_tree as draft_tree
import mmspec.drafting.model as draft_model_module
from mmspec.decoding import DecodeState, decode
from mmspec.drafting.model import DraftModelProposer
from mmspec.models.causal_lm import CausalLM
from mmspec.sampling import LogitsPipeline
from mmspec.tree import DraftTree

from lm_fixtures import perturbed_copy, ragged_prompts, tiny_causal_lm


def _recording(prop):
    seen = []
    original = prop.propose

    def record(state, k):
        out = original(state, k)
        seen.append(out)
        return out

    prop.propose = record
    return seen


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_draft_cache_equals_the_accepted_path(sample):
    """After every step, each active row's draft cache holds exactly the committed tokens minus the pending ones,
    with the keys and values of feeding them alone (float64)."""
    target = tiny_causal_lm("llama", sharpen=3.0)
    draft = perturbed_copy(target, 0.6)
    ids, mask = ragged_prompts(3, 96, seed=4)
    prop = DraftModelProposer(draft, 9, tree=(3, 4))
    seen = _recording(prop)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    state = DecodeState(ids, mask, 32, 96, LogitsPipeline(do_sample=sample), gens if sample else None,
                        ids.device)
    worst, checked, off_chain = [0.0], [0], [0]
    update = prop.update

    def record_update(state, result, rows, num_accepted):
        tree = seen[-1]
        if isinstance(tree, DraftTree):
            for b, row in enumerate(result.path.tolist()):
                firsts = {}
                for i, parent in enumerate(tree.parents[b].tolist()):
                    firsts.setdefault(parent, i)
                off_chain[0] += any(n >= 0 and firsts[int(tree.parents[b, n])] != n for n in row)
        update(state, result, rows, num_accepted)

    prop.update = record_update

    def check(step, state):
        if step == 0:
            return
        lm = prop.lm
        for b in range(state.batch_size):
            if not bool(state.active[b]):
                continue
            committed = state.tokens[b, : state.lengths[b]][state.valid[b, : state.lengths[b]]]
            fed = committed[: len(committed) - int(prop._pending_valid[b].sum())]
            ref = CausalLM(draft)
            ref.prefill(fed.unsqueeze(0), torch.ones(1, len(fed), dtype=torch.long))
            keep = lm._mask_cpu[b]
            assert int(keep.sum()) == len(fed)
            for layer, ref_layer in zip(lm.cache.layers, ref.cache.layers):
                for a, r in ((layer.keys[b][:, keep], ref_layer.keys[0]), (layer.values[b][:, keep], ref_layer.values[0])):
                    worst[0] = max(worst[0], float((a - r).abs().max()))
            checked[0] += 1

    decode(CausalLM(target), prop, state, window=10, callback=check)
    print(f"max |draft cache - cache of the committed path alone| = {worst[0]:.2e} over {checked[0]} row-steps")
    assert checked[0] > 10 and worst[0] < 1e-10
    assert any(isinstance(t, DraftTree) and t.depth >= 3 for t in seen)
    assert off_chain[0] > 0, "no accepted path left the draft's chain: the case does not test the tree's cache"


def test_tree_holds_the_chain_and_keeps_parents():
    """Every row's tree is topologically ordered, holds the draft's greedy chain to the full depth, has at most
    ``window - 1`` nodes, and siblings are distinct."""
    target = tiny_causal_lm("llama", sharpen=3.0)
    draft = perturbed_copy(target, 0.3)
    ids, mask = ragged_prompts(2, 96, seed=1)
    prop = DraftModelProposer(draft, 7, tree=(3, 4))
    seen = _recording(prop)
    chain = DraftModelProposer(draft, 4)
    chain_seen = _recording(chain)
    decode(CausalLM(target), prop, DecodeState(ids, mask, 12, 96, LogitsPipeline(), None, ids.device), window=8)
    # the chain proposer's first step from the same state drafts the draft's greedy chain
    decode(CausalLM(target), chain, DecodeState(ids, mask, 12, 96, LogitsPipeline(), None, ids.device), window=5)
    first, first_chain = seen[0], chain_seen[0][0]
    for b in range(2):
        n = int(first.valid[b].sum())
        assert n <= 7
        parents = first.parents[b, :n]
        assert bool((parents < torch.arange(n)).all())
        node, walk = -1, []
        for _ in range(4):  # follow the first child of each node from the anchor
            kids = (parents == node).nonzero().flatten()
            node = int(kids[0])
            walk.append(int(first.tokens[b, node]))
        assert walk == first_chain[b].tolist()
        for parent in parents.unique().tolist():
            toks = first.tokens[b, :n][parents == parent]
            assert len(toks.unique()) == len(toks), "siblings repeat a token"


def _children_q_not_updated(rows, width, greedy, generator=None, draws=None, probs_fn=None):
    """Wrong on purpose: siblings drawn without replacement, but each reported as drawn from the full row."""
    tokens, q, p, e, ok = draft_tree.children(rows, width, greedy, generator, draws, probs_fn)
    if q is not None:
        q = q[:, :, :1].expand_as(q).clone()
    return tokens, q, p, e, ok


@pytest.mark.slow
@pytest.mark.parametrize("wrong", [False, True], ids=["right", "q-not-updated"])
def test_wrong_sibling_rule_fails_the_chi_square(wrong, monkeypatch):
    """A sharp draft that disagrees with the target, so later siblings are tested often: the right rule passes the
    chi-square of tests/test_tree_decode.py, a tree whose sibling q is not updated is rejected."""
    target = tiny_causal_lm("llama", vocab_size=V, hidden=16, sharpen=3.0, seed=11)
    draft = tiny_causal_lm("llama", vocab_size=V, hidden=16, sharpen=25.0, seed=3)
    if wrong:
        monkeypatch.setattr(draft_model_module, "children", _children_q_not_updated)
    spy = _Spy(monkeypatch)
    out = mmspec.generate(target, PROMPT.expand(N, -1), max_new_tokens=NEW, method="draft", draft_model=draft,
                          window=5, tree=(3, 2), do_sample=True, generator=torch.Generator().manual_seed(99),
                          eos_token_id=[])
    assert max(spy.depths) >= 2 and max(spy.widths) >= 1
    p = _pvalue(out.sequences[:, PROMPT.shape[1]:], _exact(target))
    print(f"{'q not updated between siblings' if wrong else 'right rule'}: chi-square p = {p:.2e}")
    assert (p < ALPHA) if wrong else (p > ALPHA)


def test_sampled_children_are_draws_without_replacement():
    """``children`` when sampling: siblings differ, and each q is the row minus the earlier siblings, renormalised."""
    rows = torch.randn(2, 3, 6, dtype=torch.float64)
    pipe = LogitsPipeline(do_sample=True)
    tokens, q, p, e, ok = draft_tree.children(rows, 3, False, torch.Generator().manual_seed(0),
                                              torch.tensor([3, 2]), pipe.probs)
    base = pipe.probs(rows)
    for b in range(2):
        for r in range(3 if b == 0 else 2):
            assert len(tokens[b, r].unique()) == 3
            left = base[b, r].clone()
            for j in range(3):
                assert torch.allclose(q[b, r, j], left / left.sum())
                assert torch.isclose(e[b, r, j], (q[b, r, j] * base[b, r]).sum())
                left[tokens[b, r, j]] = 0
    assert bool(ok.all())


@pytest.mark.parametrize("kw,match", [
    (dict(window=5, tree=(2, 5)), "window >= 6"),
    (dict(window=8, tree=(2, 3), adaptive=True), "neither `adaptive`"),
    (dict(window=8, tree=(2, 3), draft_confidence=0.5), "neither `adaptive`"),
    (dict(window=8, tree=(0, 3)), "width >= 1"),
])
def test_bad_draft_tree_arguments(kw, match):
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=match):
        mmspec.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4, method="draft", draft_model=model, **kw)


def test_batch_one_caches_keep_no_holes():
    """At batch 1 the accepted path is moved to the front of each tree block (``CausalLM.rollback`` with a column
    mask), so neither the target's nor the draft's cache keeps holes: their columns are the committed tokens."""
    target = tiny_causal_lm("llama", sharpen=3.0)
    draft = perturbed_copy(target, 0.2)  # (with holes instead, this run leaves 53 in the target, 28 in the draft)
    ids = torch.tensor([[5, 9, 11, 4, 7]])
    prop = DraftModelProposer(draft, 9, tree=(3, 4))
    lm = CausalLM(target)
    state = DecodeState(ids, torch.ones_like(ids), 40, 96, LogitsPipeline(), None, ids.device)
    holes = []
    decode(lm, prop, state, window=10,
           callback=lambda step, s: holes.append((int((~lm._mask_cpu).sum()), int((~prop.lm._mask_cpu).sum()))))
    assert holes and all(h == (0, 0) for h in holes), holes
    assert lm.length == int(state.lengths[0]) - 1  # every committed token but the last (the next anchor)
