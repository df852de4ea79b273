"""The static KV cache with per-row lengths (``cache="static"``) gives the dynamic cache's tokens.

Greedy: every method (chains and token trees) on 4 architectures, a ragged left-padded batch with EOS, and
sliding-window models, equal plain greedy decoding on the dynamic cache. A tree's accepted path is compacted inside
the static cache (asserted to happen, and checked against the dynamic cache column by column through the next
forward's logits). Sampling: exact enumeration of 5 new tokens over V = 5 (3,125 outcomes) vs N = 20,000 samples,
chi-square at alpha = 0.001, the construction of tests/test_tree_decode.py, on the static path.
"""

import pytest
import torch

import mmspec
from mmspec.models.causal_lm import CausalLM, RollbackError
from mmspec.models.static_cache import RowStaticCache, window_masks, write_order
from mmspec.tree import DraftTree

from lm_fixtures import ARCHS, perturbed_copy, ragged_prompts, tiny_causal_lm
from utils_stats import all_outcomes, chi2_pvalue, outcome_counts, sequence_law

CASES = [
    ("ar", {}),
    ("jacobi", dict(window=6)),
    ("lookup", dict(window=5)),
    ("draft", dict(window=4)),
    ("jacobi", dict(window=16, tree=(3, 2))),
    ("draft", dict(window=16, tree=(2, 3))),
]
IDS = [m + ("-tree" if "tree" in kw else "") for m, kw in CASES]


@pytest.fixture(scope="module", params=ARCHS)
def lm(request):
    model = tiny_causal_lm(request.param, sharpen=3.0)
    ids, mask = ragged_prompts(5, 96, seed=2)
    free = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=24, method="ar", eos_token_id=[])
    eos = int(free.sequences[1, ids.shape[1] + 10])  # a token row 1 emits mid-run ends it there: a ragged finish
    ref = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=24, method="ar", eos_token_id=eos)
    return model, perturbed_copy(model, 0.3), ids, mask, ref, eos


@pytest.mark.parametrize("method,kw", CASES, ids=IDS)
def test_static_equals_dynamic_greedy(lm, method, kw, monkeypatch):
    model, draft, ids, mask, ref, eos = lm
    assert min(ref.stats.new_tokens_per_row) < 24
    moves = []
    original = RowStaticCache.move
    monkeypatch.setattr(RowStaticCache, "move", lambda self, src, dst: (moves.append(1), original(self, src, dst)))
    extra = dict(draft_model=draft) if method == "draft" else {}
    # greedy Jacobi's random init draws from the generator: the same one for both runs, so that they take the same
    # steps whatever ran before (the global stream would make the forward counts depend on the test order)
    seeded = dict(generator=torch.Generator().manual_seed(0)) if method == "jacobi" else {}
    out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=24, method=method, eos_token_id=eos,
                          cache="static", **kw, **extra, **seeded)
    assert torch.equal(out.sequences, ref.sequences)
    seeded = dict(generator=torch.Generator().manual_seed(0)) if method == "jacobi" else {}
    dyn = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=24, method=method, eos_token_id=eos,
                          **kw, **extra, **seeded)
    assert out.stats.target_forwards == dyn.stats.target_forwards  # the same steps, not only the same tokens
    if "tree" in kw and model.config.model_type == "llama":  # (elsewhere an off-first-branch path may not occur)
        assert moves, "no tree path was compacted: the case does not test the compaction"


def test_static_cache_grows_past_its_reservation():
    model = tiny_causal_lm("llama", sharpen=3.0)
    ids, mask = ragged_prompts(3, 96, seed=4)
    ref = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=80, method="ar", eos_token_id=[])
    target = CausalLM(model, cache="static", reserve=4)  # far too small: the cache grows (a copy) on the way
    from mmspec.decoding import DecodeState, decode
    from mmspec.drafting.jacobi import JacobiProposer
    from mmspec.sampling import LogitsPipeline

    state = DecodeState(ids, mask, 80, 96, LogitsPipeline(), None, torch.device("cpu"))
    capacity = []
    state, _ = decode(target, JacobiProposer(6), state, window=6, callback=lambda s, st: capacity.append(
        target.cache.capacity))
    assert torch.equal(state.tokens, ref.sequences)
    assert capacity[-1] > capacity[0]


def _tree_step(lm, tokens, valid, tree, keep):
    lm.checkpoint()
    lm.forward(tokens, valid, tree=tree)
    lm.rollback(keep)


def test_tree_path_compaction_equals_dynamic_holes():
    """One tree step with a path that is not the block's first places, then a plain step: the static cache (path
    moved to the row's next columns) and the dynamic one (off-path nodes as holes) give the same logits."""
    model = tiny_causal_lm("llama", sharpen=3.0)
    ids, mask = ragged_prompts(3, 96, seed=1)
    dyn, sta = CausalLM(model), CausalLM(model, cache="static")
    for lm in (dyn, sta):
        lm.prefill(ids, mask)
    # [anchor, n0 .. n4]: n0 -> n1 and n2 -> n3 -> n4 branch off the anchor; rows keep different paths
    parents = torch.tensor([[-1, 0, -1, 2, 3]]).expand(3, 5)
    tree = DraftTree(torch.randint(2, 96, (3, 5)), parents, None, torch.ones(3, 5, dtype=torch.bool), depth=3,
                     width=2)
    tokens = torch.cat([torch.randint(2, 96, (3, 1)), tree.tokens], 1)
    valid = torch.ones(3, 6, dtype=torch.bool)
    keep = torch.tensor([[1, 0, 0, 1, 1, 1],    # the second branch: anchor, n2, n3, n4 (moved)
                         [1, 1, 1, 0, 0, 0],    # the first branch: a prefix (not moved)
                         [1, 0, 0, 1, 0, 0]], dtype=torch.bool)  # anchor, n2
    for lm in (dyn, sta):
        _tree_step(lm, tokens, valid, tree, keep)
    assert torch.equal(dyn.num_valid(), sta.num_valid())
    nxt = torch.randint(2, 96, (3, 2))
    out = [lm.forward(nxt, torch.ones(3, 2, dtype=torch.bool)) for lm in (dyn, sta)]
    torch.testing.assert_close(out[1], out[0], rtol=1e-9, atol=1e-9)
    # a broken compaction (the path left where it was written) must show: the test has power
    sta2 = CausalLM(model, cache="static")
    sta2.prefill(ids, mask)
    sta2.cache.move = lambda src, dst: None
    _tree_step(sta2, tokens, valid, tree, keep)
    bad = sta2.forward(nxt, torch.ones(3, 2, dtype=torch.bool))
    assert not torch.allclose(bad[0], out[0][0])
    torch.testing.assert_close(bad[1], out[0][1], rtol=1e-9, atol=1e-9)  # row 1's path was a prefix


def test_write_order_and_masks():
    valid = torch.tensor([[False, True, True, False], [True, True, True, True]])
    rank, order = write_order(valid)
    assert rank[0].tolist() == [2, 0, 1, 3] and order[0].tolist() == [1, 2, 0, 3]
    assert torch.equal(order.gather(1, rank), torch.arange(4).expand(2, 4))
    lens, pad = torch.tensor([5, 3]), torch.tensor([2, 0])
    positions = torch.tensor([[3, 3, 4, 4], [3, 4, 5, 6]])
    full, sliding = window_masks(lens, pad, order, valid, positions, 10, sliding_window=3)
    # row 0, block place 2 (column 6): sees committed columns 2-4, place 1 (column 5) and itself
    assert full[0, 2].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    assert sliding[0, 2].nonzero().flatten().tolist() == [4, 5, 6]  # positions 2..4 only
    assert full[1, 3].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_models_static(arch):
    from test_sliding_window import sliding_lm

    model = sliding_lm(arch)
    ids, mask = ragged_prompts(4, 96, seed=1, min_len=3, max_len=12)
    ref = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=30, method="ar", eos_token_id=[])
    for method, kw in [("ar", {}), ("jacobi", dict(window=6)), ("jacobi", dict(window=8, tree=(2, 2)))]:
        out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=30, method=method, eos_token_id=[],
                              cache="static", **kw)
        assert torch.equal(out.sequences, ref.sequences), f"{arch} {method} {kw}"


def test_guided_image_pipeline_static_equals_dynamic():
    from image_fixtures import tiny_image_lm, tiny_pipeline

    pipe = tiny_pipeline()
    prompts = ["a red square", "blue"]
    ref = pipe(prompts, do_sample=False, decoding="ar", guidance_scale=2.5, output_type="latent")
    for kw in [dict(decoding="jacobi", window=6), dict(decoding="draft", window=4, draft_model=tiny_image_lm(seed=5)),
               dict(decoding="jacobi", window=8, tree=(2, 2))]:
        out = pipe(prompts, do_sample=False, guidance_scale=2.5, output_type="latent", cache="static",
                   generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(out.tokens, ref.tokens), kw
    sampled = [pipe(prompts, guidance_scale=2.5, output_type="latent", decoding="jacobi", window=6, cache=c,
                    generator=torch.Generator().manual_seed(3)).tokens for c in ("dynamic", "static")]
    assert torch.equal(*sampled)  # the same random stream


def test_bad_cache_arguments():
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="`cache` must be one of"):
        mmspec.generate(model, ids, max_new_tokens=2, cache="paged")
    with pytest.raises(ValueError, match="needs cache='static'"):
        mmspec.generate(model, ids, max_new_tokens=2, cache="dynamic", compile=True)
    with pytest.raises(ValueError, match="`compile` must be True or False"):
        mmspec.generate(model, ids, max_new_tokens=2, compile="yes")
    with pytest.raises(ValueError, match="left-padded"):
        lm = CausalLM(model, cache="static")
        lm.prefill(torch.tensor([[3, 4, 5]]), torch.tensor([[1, 0, 1]]))
    with pytest.raises(RollbackError, match="not cropped"):  # transformers' crop would break per-row lengths
        RowStaticCache(1, 8).layers[0].crop(1)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(RollbackError, match="4-D attention mask"):
        CausalLM(model, cache="static")


# -- exact sampling on the static path --------------------------------------------------------------------------------
V, NEW, N, ALPHA = 5, 5, 20_000, 1e-3
PROMPT = torch.tensor([[3, 4, 3, 4, 2]])


def _exact(model):
    outcomes = all_outcomes(V, NEW)
    with torch.no_grad():
        logits = model(torch.cat([PROMPT.expand(len(outcomes), -1), outcomes], 1)).logits.double()
    T = PROMPT.shape[1]
    return sequence_law(logits[:, T - 1 : T - 1 + NEW].softmax(-1), outcomes)


@pytest.mark.slow
@pytest.mark.parametrize("method,kw", [("draft", dict(window=4)), ("jacobi", dict(window=7, tree=(2, 2))),
                                       ("draft", dict(window=7, tree=(2, 2)))], ids=["draft", "jacobi-tree",
                                                                                    "draft-tree"])
def test_sampled_static_is_lossless(method, kw):
    target = tiny_causal_lm("llama", vocab_size=V, hidden=16, sharpen=3.0, seed=11)
    extra = dict(draft_model=perturbed_copy(target, 0.6, seed=5)) if method == "draft" else {}
    out = mmspec.generate(target, PROMPT.expand(N, -1), max_new_tokens=NEW, method=method, do_sample=True,
                          generator=torch.Generator().manual_seed(99), eos_token_id=[], cache="static", **kw, **extra)
    assert out.stats.step_compression > 1.2  # drafts were accepted: the rollback path ran
    p = chi2_pvalue(outcome_counts(out.sequences[:, PROMPT.shape[1]:], V), _exact(target))
    assert p > ALPHA, f"{method} {kw}: chi-square p = {p:.2e}"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vision_language_models_static(family):
    """VLMs (image features in the prefill, per-row position offsets after it; Qwen2-VL's 3-D rope) on the static
    cache equal the model's own generate."""
    from test_vlm_greedy import NEW, family_model, reference, text_draft

    model, _ = family_model(family)
    inputs, ref = reference(family, 3)
    inputs = dict(inputs)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    for method, kw in [("ar", {}), ("jacobi", {"window": 4}), ("draft", {"draft_model": text_draft(model), "window": 4}),
                       ("jacobi", {"window": 7, "tree": (2, 2)})]:
        out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, method=method, cache="static", **kw,
                              **inputs)
        assert torch.equal(out.sequences, ref), f"{family} {method}"


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_one_static_equals_dynamic(arch):
    """Batch 1 without padding: single-token forwards (AR, the draft model's steps) run without a mask."""
    model = tiny_causal_lm(arch, sharpen=3.0)
    ids = torch.randint(2, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    ref = mmspec.generate(model, ids, max_new_tokens=30, method="ar", eos_token_id=[])
    for method, kw in [("ar", {}), ("draft", dict(window=4, draft_model=perturbed_copy(model, 0.3))),
                       ("lookup", dict(window=5))]:
        out = mmspec.generate(model, ids, max_new_tokens=30, method=method, eos_token_id=[], cache="static", **kw)
        assert torch.equal(out.sequences, ref.sequences), f"{arch} {method}"
