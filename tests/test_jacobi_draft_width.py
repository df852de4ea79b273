"""method="jacobi-draft" whose draft branch is a draft tree (``mmspec.drafting.JACOBI_DRAFT_WIDTH`` > 1: the
draft's EAGLE-2-style tree of ``depth + width - 1`` nodes, ``mmspec.drafting.draft_tree``): its nodes join Jacobi's
under the anchor, siblings drawn without replacement when sampling, and decoding stays exact."""

import pytest
import torch
from test_tree_decode import ALPHA, NEW, PROMPT, N, _exact, _pvalue, _Spy

import mmspec
import mmspec.drafting

from lm_fixtures import perturbed_copy, ragged_prompts, tiny_causal_lm


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setattr(mmspec.drafting, "JACOBI_DRAFT_WIDTH", 3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kw", [dict(window=10), dict(window=14, tree=(2, 2), init="repeat", coupled=True)])
def test_greedy_equals_plain_greedy(wide, arch, kw):
    model = tiny_causal_lm(arch, sharpen=3.0)
    draft = perturbed_copy(model, 0.3)
    ids, mask = ragged_prompts(5, 96, seed=2)
    ref = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=20, method="ar", eos_token_id=1)
    out = mmspec.generate(model, ids, attention_mask=mask, max_new_tokens=20, method="jacobi-draft", eos_token_id=1,
                          draft_model=draft, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats.tree_nodes > 0


@pytest.mark.slow
@pytest.mark.parametrize("warp", [dict(), dict(temperature=0.7, top_k=3)], ids=["plain", "t0.7-topk3"])
def test_sampled_is_lossless(wide, warp, monkeypatch):
    from lm_fixtures import tiny_causal_lm as make

    target = make("llama", vocab_size=5, hidden=16, sharpen=3.0, seed=11)
    draft = perturbed_copy(target, 0.6, seed=5)
    spy = _Spy(monkeypatch)
    out = mmspec.generate(target, PROMPT.expand(N, -1), max_new_tokens=NEW, method="jacobi-draft", window=9,
                          do_sample=True, generator=torch.Generator().manual_seed(7), eos_token_id=[],
                          draft_model=draft, **warp)
    assert max(spy.depths) >= 2 and max(spy.widths) >= 2, "no tree with the draft's siblings was verified"
    p = _pvalue(out.sequences[:, PROMPT.shape[1]:], _exact(target, **warp))
    assert p > ALPHA, f"jacobi-draft, draft width 3 {warp}: chi-square p = {p:.2e}"
