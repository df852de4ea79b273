"""Token trees through the decode loop: greedy identity, exact sampling, the tree mask and cache, bad input.

Sampling: exact enumeration of 5 new tokens over V = 5 (3,125 outcomes) vs N = 20,000 samples, chi-square at
alpha = 0.001; each case asserts that steps with a tree of depth >= 2 and with siblings really happened.
"""

import pytest
import torch

import mmspec
from mmspec.decoding import DecodeState, decode
from mmspec.drafting.jacobi import JacobiProposer
from mmspec.models.causal_lm import CausalLM, RollbackError
from mmspec.sampling import LogitsPipeline
from mmspec.tree import DraftTree

from lm_fixtures import ARCHS, perturbed_copy, ragged_prompts, tiny_causal_lm
from utils_stats import all_outcomes, chi2_pvalue, outcome_counts, sequence_law

TREE_CASES = [
    ("jacobi", dict(window=16, tree=(3, 2))),
    ("jacobi", dict(window=18, tree=(2, 3), init="repeat", coupled=True)),
    ("lookup", dict(window=10, tree=(3, 3))),
    ("draft", dict(window=16, tree=(3, 4))),
    ("draft", dict(window=8, tree=(2, 5))),
    ("jacobi-draft", dict(window=10)),
    ("jacobi-draft", dict(window=14, tree=(2, 2), init="repeat", coupled=True)),
    ("lookahead", dict(lookahead=(9, 3, 4), tree=(3, 2))),
]
CHAINS = {"jacobi": dict(window=10), "lookup": dict(window=10), "draft": dict(window=6), "jacobi-draft": dict(window=6),
          "lookahead": dict(lookahead=(9, 3, 4))}
DRAFTED = ("draft", "jacobi-draft")


def _ids(case):
    method, kw = case if isinstance(case, tuple) else (case, {})
    return method + "-" + "-".join(f"{k}{v}" for k, v in kw.items())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,kw", TREE_CASES, ids=[_ids(c) for c in TREE_CASES])
def test_greedy_tree_equals_plain_greedy(arch, method, kw):
    model = tiny_causal_lm(arch, sharpen=3.0)
    extra = dict(draft_model=perturbed_copy(model, 0.3)) if method in DRAFTED else {}
    ids, mask = ragged_prompts(5, 96, seed=2)
    ref = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=20, method="ar", eos_token_id=1)
    out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=20, method=method, eos_token_id=1,
                          **kw, **extra)
    assert torch.equal(out.sequences, ref.sequences)
    chain = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=20, method=method, eos_token_id=1,
                            **CHAINS[method], **extra)
    assert torch.equal(out.sequences, chain.sequences)
    if method in DRAFTED or kw.get("init") is None and method == "jacobi":  # lookup needs repeats; repeat init
        assert out.stats.tree_nodes > 0                                     # may accept whole windows
    for b in (0, 3):  # each row equals that prompt decoded alone
        keep = mask[b].bool()
        alone = mmspec.generate(model, ids[b:b + 1, keep], max_new_tokens=20, method=method, eos_token_id=1,
                                **kw, **extra)
        n = alone.sequences.shape[1] - int(keep.sum())
        assert torch.equal(alone.sequences[0, -n:], out.sequences[b, ids.shape[1]:ids.shape[1] + n])


def test_lookup_tree_uses_several_matches():
    from mmspec.drafting.lookup import LookupProposer

    ids = torch.tensor([[5, 6, 7, 9, 5, 6, 8, 9, 5, 6, 7, 9, 5, 6]])
    state = DecodeState(ids, torch.ones_like(ids), 12, 96, LogitsPipeline(), None, torch.device("cpu"))
    tree = LookupProposer(9, tree=(3, 3)).propose(state, 9)
    # after "5 6": "7 9 5" (longest, latest) then "8 9 5"; no third distinct continuation
    assert tree.tokens[0, :6].tolist() == [7, 9, 5, 8, 9, 5]
    assert tree.parents[0, :6].tolist() == [-1, 0, 1, -1, 3, 4]
    assert tree.valid[0].tolist() == [True] * 6 + [False] * 3


# -- exact sampling -------------------------------------------------------------------------------------------------
V, NEW, N, ALPHA = 5, 5, 20_000, 1e-3
PROMPT = torch.tensor([[3, 4, 3, 4, 2]])


def _exact(model, prompt=PROMPT, new=NEW, temperature=1.0, top_k=None):
    """The exact law of every ``new``-token continuation of ``prompt`` (teacher forcing on each outcome)."""
    outcomes = all_outcomes(V, new)
    with torch.no_grad():
        logits = model(torch.cat([prompt.expand(len(outcomes), -1), outcomes], 1)).logits.double()
    T = prompt.shape[1]
    logits = logits[:, T - 1 : T - 1 + new] / temperature
    if top_k:
        kth = logits.sort(-1, descending=True).values[..., top_k - 1 : top_k]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return sequence_law(logits.softmax(-1), outcomes)


def _pvalue(samples, probs):
    return chi2_pvalue(outcome_counts(samples, V), probs)


@pytest.fixture(scope="module")
def pair():
    target = tiny_causal_lm("llama", vocab_size=V, hidden=16, sharpen=3.0, seed=11)
    return target, perturbed_copy(target, 0.6, seed=5)


class _Spy:
    """Records the shape of every tree the decode loop verified."""

    def __init__(self, monkeypatch):
        import mmspec.decoding as dec

        self.depths, self.widths = [], []
        original = dec.verify_tree

        def spy(tree, *args, **kwargs):
            self.depths.append(tree.depth)
            self.widths.append(int(tree.valid.sum(-1).max()) - tree.depth)
            return original(tree, *args, **kwargs)

        monkeypatch.setattr(dec, "verify_tree", spy)


SAMPLED = [
    ("jacobi", dict(window=7, tree=(2, 2))),
    ("jacobi", dict(window=7, tree=(2, 2), init="repeat", coupled=True)),
    ("draft", dict(window=7, tree=(2, 3))),  # 6 of up to 10 nodes kept: the ranking prunes
    ("draft", dict(window=5, tree=(3, 2))),
    ("jacobi-draft", dict(window=7)),
    ("jacobi-draft", dict(window=11, tree=(2, 2), init="repeat", coupled=True)),
    ("lookahead", dict(lookahead=(6, 2, 4), tree=(3, 1))),
]


@pytest.mark.slow
@pytest.mark.parametrize("warp", [dict(), dict(temperature=0.7, top_k=3)], ids=["plain", "t0.7-topk3"])
@pytest.mark.parametrize("method,kw", SAMPLED, ids=[_ids(c) for c in SAMPLED])
def test_sampled_tree_is_lossless(pair, method, kw, warp, monkeypatch):
    target, draft = pair
    spy = _Spy(monkeypatch)
    extra = dict(draft_model=draft) if method in DRAFTED else {}
    out = mmspec.generate(target, PROMPT.expand(N, -1), max_new_tokens=NEW, method=method, do_sample=True,
                          generator=torch.Generator().manual_seed(99), eos_token_id=[], **kw, **warp, **extra)
    assert max(spy.depths) >= 2 and max(spy.widths) >= 1, "no tree of depth 2 with siblings was verified"
    p = _pvalue(out.sequences[:, PROMPT.shape[1]:], _exact(target, **warp))
    assert p > ALPHA, f"{method} {kw} {warp}: chi-square p = {p:.2e}"


@pytest.mark.slow
def test_sampled_lookup_tree_is_lossless(monkeypatch):
    """Lookup trees need repeats in the context: a prompt with two different continuations of "3 4"."""
    target = tiny_causal_lm("llama", vocab_size=V, hidden=16, sharpen=3.0, seed=11)
    prompt = torch.tensor([[3, 4, 1, 2, 3, 4, 2, 3, 4]])
    spy = _Spy(monkeypatch)
    out = mmspec.generate(target, prompt.expand(N, -1), max_new_tokens=4, method="lookup", window=7, tree=(2, 3),
                          do_sample=True, generator=torch.Generator().manual_seed(5), eos_token_id=[])
    assert max(spy.widths) >= 1 and max(spy.depths) >= 2
    p = _pvalue(out.sequences[:, prompt.shape[1]:], _exact(target, prompt=prompt, new=4))
    assert p > ALPHA, f"lookup tree: chi-square p = {p:.2e}"


# -- the tree mask and the cache ------------------------------------------------------------------------------------
def test_tree_mask_and_cache_equal_the_accepted_path():
    """Hooks on the attention see no node attending to a sibling's branch; after rollback the cache equals the
    cache of feeding the accepted path alone (float64)."""
    model = tiny_causal_lm("llama", sharpen=3.0)
    prompt = torch.tensor([[5, 9, 11, 4]])
    lm = CausalLM(model)
    lm.prefill(prompt, torch.ones_like(prompt))
    seen = []
    handle = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    # anchor 7; nodes: 0:(12, root) 1:(13, root) 2:(14, under 0) 3:(15, under 1) 4:(16, under 2)
    tree = DraftTree(torch.tensor([[12, 13, 14, 15, 16]]), torch.tensor([[-1, -1, 0, 1, 2]]), None,
                     torch.ones(1, 5, dtype=torch.bool), depth=3, width=2)
    lm.checkpoint()
    lm.forward(torch.tensor([[7, 12, 13, 14, 15, 16]]), torch.ones(1, 6, dtype=torch.bool), tree=tree)
    handle.remove()
    mask = seen[0][0, 0]  # [L, S + L] bool (sdpa)
    S = prompt.shape[1]
    block = mask[:, S:]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0],
                             [1, 0, 1, 0, 1, 0], [1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(block, expected)
    assert bool(mask[:, :S].all())
    # accept the path 7 -> 12 -> 14 -> 16
    lm.rollback(torch.tensor([[True, True, False, True, False, True]]))
    ref = CausalLM(model)
    ref.prefill(prompt, torch.ones_like(prompt))
    ref.forward(torch.tensor([[7, 12, 14, 16]]), torch.ones(1, 4, dtype=torch.bool))
    keep = lm._mask_cpu[0]
    diff = 0.0
    for layer, ref_layer in zip(lm.cache.layers, ref.cache.layers):
        diff = max(diff, float((layer.keys[0][:, keep] - ref_layer.keys[0]).abs().max()),
                   float((layer.values[0][:, keep] - ref_layer.values[0]).abs().max()))
    print(f"max |cache(tree path) - cache(path alone)| = {diff:.2e}")
    assert diff < 1e-12
    # and the next forward sees the same logits
    a = lm.forward(torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bool))
    b = ref.forward(torch.tensor([[3]]), torch.ones(1, 1, dtype=torch.bool))
    assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_tree_with_guided_image_pipeline_equals_ar():
    from mmspec.pipelines import SpeculativeImagePipeline

    from image_fixtures import tiny_image_lm, tiny_tokenizer, tiny_vq

    model = tiny_image_lm(grid=4, codes=16, sharpen=2.0)
    pipe = SpeculativeImagePipeline(model=model, vq=tiny_vq(codes=16), tokenizer=tiny_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square on a green background"]
    ar = pipe(prompts, decoding="ar", output_type="latent", guidance_scale=3.0, do_sample=False)
    for kw in [dict(decoding="jacobi", window=14, tree=(3, 2), init="vertical"),
               dict(decoding="draft", window=8, tree=(2, 2), draft_model=tiny_image_lm(grid=4, codes=16, seed=4))]:
        out = pipe(prompts, output_type="latent", guidance_scale=3.0, do_sample=False, **kw)
        assert torch.equal(out.tokens, ar.tokens), kw
        assert out.stats.tree_nodes > 0


def test_closest_rows_follow_the_committed_path():
    """After a step, each depth continues from the node that agrees longest with the committed tokens: the chain on
    ties, the accepted branch's own subtree when the path left the chain."""
    from mmspec.tree import closest_rows

    # anchor; chain 0:(12) -> 1:(13); branch 2:(20) -> 3:(21)
    tree = DraftTree(torch.tensor([[12, 13, 20, 21]] * 3), torch.tensor([[-1, 0, -1, 2]] * 3), None,
                     torch.ones(3, 4, dtype=torch.bool), depth=2, width=2)
    committed = torch.tensor([[20, 21, 5], [12, 7, -1], [20, 9, -1]])
    assert closest_rows(tree, committed, 3).tolist() == [[0, 3, 4], [0, 1, 2], [0, 3, 4]]
    off = DraftTree(tree.tokens[:1], tree.parents[:1], None, torch.tensor([[True, True, False, False]]), 2, 2)
    assert closest_rows(off, committed[:1], 3).tolist() == [[0, 1, 2]]  # unused nodes are never chosen


# -- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(method="jacobi", tree=(0, 2)), "width >= 1"),
    (dict(method="jacobi", tree=(2, 0)), "depth >= 1"),
    (dict(method="jacobi", tree=3), "pair of ints"),
    (dict(method="jacobi", window=10, tree=(3, 2)), "window of at least 13"),
    (dict(method="lookup", window=4, tree=(2, 2)), "window >= 5"),
    (dict(method="ar", tree=(2, 2)), "needs drafts"),
    (dict(method="lookahead", lookahead=(7, 4, 7), tree=(3, 3)), "leaves 1 for the chain"),
    (dict(method="jacobi-draft", window=2, draft_model=tiny_causal_lm("llama")), "window >= 3"),
])
def test_bad_tree_arguments(kw, match):
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=match):
        mmspec.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4, **kw)


def test_tree_with_attention_that_takes_no_4d_mask_is_refused():
    model = tiny_causal_lm("llama")
    model.config._attn_implementation = "flash_attention_2"  # what a flash-attention load reports
    lm = CausalLM(model)
    model.config._attn_implementation = "sdpa"
    lm.prefill(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    lm.checkpoint()
    tree = DraftTree.chain(torch.tensor([[8]]))
    with pytest.raises(RollbackError, match="attn_implementation"):
        lm.forward(torch.tensor([[4, 8]]), torch.ones(1, 2, dtype=torch.bool), tree=tree)


def test_jacobi_tree_proposes_distinct_siblings():
    model = tiny_causal_lm("llama", sharpen=3.0)
    seen = []
    prop = JacobiProposer(window=16, init="random", tree=(3, 2))
    original = prop.propose

    def record(state, k):
        out = original(state, k)
        if isinstance(out, DraftTree):
            seen.append(out)
        return out

    prop.propose = record
    ids = torch.tensor([[5, 9, 11, 4]])
    state = DecodeState(ids, torch.ones_like(ids), 30, 96, LogitsPipeline(do_sample=True),
                        torch.Generator().manual_seed(0), ids.device)
    decode(CausalLM(model), prop, state, window=16)
    assert seen
    for tree in seen:
        for b in range(tree.tokens.shape[0]):
            for parent in tree.parents[b].unique().tolist():
                sib = (tree.parents[b] == parent) & tree.valid[b]
                toks = tree.tokens[b][sib]
                assert len(toks.unique()) == len(toks), "siblings repeat a token"
