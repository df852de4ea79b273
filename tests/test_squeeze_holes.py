"""The dynamic cache drops its holes (``CausalLM._squeeze_holes``): same tokens, same distribution, shorter cache.

Rows of a batch that accept fewer drafts than the step's best leave holes in the dynamic cache; once they pile up
the cache is re-laid out without them. These tests force a squeeze after every step that leaves a hole, then check
greedy equality (4 architectures, ragged batch with EOS, chains and trees, a sliding-window model, the image
pipeline) and the enumeration chi-square, and that squeezes really happened and shortened the cache.
"""

import pytest
import torch
from test_sampling_lossless import ALPHA, NEW5, PROMPT5, N, chi2_pvalue_long, exact_distribution_long

import mmspec
from mmspec.models.causal_lm import CausalLM

from lm_fixtures import perturbed_copy, ragged_prompts, tiny_causal_lm

NEW = 24


@pytest.fixture
def squeezes(monkeypatch):
    """Squeeze at every hole; record (columns before, columns after) of each squeeze."""
    monkeypatch.setattr(CausalLM, "SQUEEZE_RATIO", 0.0)
    monkeypatch.setattr(CausalLM, "SQUEEZE_MIN_HOLES", 1)
    seen, real = [], CausalLM._squeeze_holes

    def spy(self):
        before = self._cols
        real(self)
        if self._cols != before:
            seen.append((before, self._cols))

    monkeypatch.setattr(CausalLM, "_squeeze_holes", spy)
    return seen


CASES = [
    ("jacobi", dict(window=6)),
    ("lookup", dict(window=5, max_ngram=2)),
    ("draft", dict(window=5)),
    ("draft", dict(window=9, tree=(3, 3))),
    ("jacobi", dict(window=8, tree=(2, 2))),
]


def test_greedy_equals_transformers_with_squeezes(arch, squeezes):
    target = tiny_causal_lm(arch, sharpen=4.0)
    # a draft that agrees often, not always, so rows accept different counts (the tiny Gemma needs a larger push)
    draft = perturbed_copy(target, 1.5 if arch == "gemma" else 1.0)
    ids, mask = ragged_prompts(5, target.config.vocab_size, seed=5)
    free = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + NEW // 3])  # row 0 stops mid-way
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                          pad_token_id=0)
    for method, kw in CASES:
        extra = dict(draft_model=draft) if method == "draft" else {}
        before = len(squeezes)
        out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, method=method,
                              eos_token_id=eos, pad_token_id=0, **kw, **extra)
        assert torch.equal(out.sequences, ref), f"{arch}/{method} {kw}"
        if method == "draft":  # (lookup and greedy Jacobi on a random model may accept too little to leave holes)
            assert len(squeezes) > before, f"{arch}/{method} {kw}: the cache never held a hole to squeeze"
    assert all(after < before for before, after in squeezes)


def test_each_row_equals_that_prompt_alone_with_squeezes(squeezes):
    target = tiny_causal_lm("llama", sharpen=4.0)
    draft = perturbed_copy(target, 0.3)
    ids, mask = ragged_prompts(5, target.config.vocab_size, seed=7)
    out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, method="draft", window=6,
                          draft_model=draft, pad_token_id=0, eos_token_id=[])
    assert squeezes
    for b in range(5):
        row = ids[b : b + 1, mask[b].bool()]
        alone = mmspec.generate(target, row, max_new_tokens=NEW, method="draft", window=6, draft_model=draft,
                                pad_token_id=0, eos_token_id=[])
        assert torch.equal(out.sequences[b, -NEW:], alone.sequences[0, -NEW:]), b


def test_sliding_window_model_with_squeezes(squeezes):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=6, max_position_embeddings=128,
                        attn_implementation="sdpa")
    target = MistralForCausalLM(cfg).double().eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(4.0)
    draft = perturbed_copy(target, 0.3)
    ids, mask = ragged_prompts(4, 96, seed=3)
    ref = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, method="ar", pad_token_id=0,
                          eos_token_id=[])
    out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, method="draft", window=5,
                          draft_model=draft, pad_token_id=0, eos_token_id=[])
    assert squeezes and torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("method, kw", [("jacobi", dict(window=4, coupled=True)), ("draft", dict(window=4))])
def test_sampling_is_lossless_with_squeezes(squeezes, method, kw):
    target = tiny_causal_lm("llama", vocab_size=4, hidden=16, sharpen=2.0, seed=12)
    extra = dict(draft_model=perturbed_copy(target, 0.5, seed=6)) if method == "draft" else {}
    out = mmspec.generate(target, PROMPT5.expand(N, -1), max_new_tokens=NEW5, method=method, do_sample=True,
                          generator=torch.Generator().manual_seed(99), eos_token_id=[], **kw, **extra)
    assert squeezes and sum(out.stats.accepted_histogram[2:]) > 0
    p = chi2_pvalue_long(out.sequences[:, PROMPT5.shape[1]:], exact_distribution_long(target))
    assert p > ALPHA, f"{method}: chi-square p = {p:.2e}"


def test_image_pipeline_with_squeezes(squeezes):
    from image_fixtures import tiny_pipeline

    pipe = tiny_pipeline(layers=2, eol=True)
    prompts = ["a red circle", "blue square on green background", "green", "a small star"]
    ref = pipe(prompts, do_sample=False, decoding="ar", guidance_scale=2.5, output_type="pt")
    out = pipe(prompts, do_sample=False, decoding="jacobi", window=8, init="horizontal", guidance_scale=2.5,
               output_type="pt")
    assert squeezes and torch.equal(out.tokens, ref.tokens)


def test_no_squeeze_below_the_threshold():
    target = tiny_causal_lm("llama", sharpen=4.0)
    ids, mask = ragged_prompts(3, 96, seed=1)
    lm = CausalLM(target)
    lm.prefill(ids, mask)
    cols = lm._cols
    lm.checkpoint()
    lm.forward(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.bool))
    lm.rollback(torch.tensor([4, 1, 2]))  # 3 + 2 holes: far below the default threshold
    assert lm._cols == cols + 4 and int((~lm._mbuf[:, : lm._cols]).sum()) == int((~mask.bool()).sum()) + 5
