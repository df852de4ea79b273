"""Greedy speculative decoding equals plain greedy decoding token for token (float64 tiny models)."""

import pytest
import torch

import mmspec

from lm_fixtures import perturbed_copy, ragged_prompts, tiny_causal_lm

METHODS = ("ar", "jacobi", "lookup", "draft")
NEW = 24


def _reference(model, ids, mask, eos):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)


def _pick_eos(model, ids, mask):
    """A token that greedy decoding emits mid-way in row 0, so EOS actually stops some rows early."""
    out = _reference(model, ids, mask, None)
    return int(out[0, ids.shape[1] + NEW // 3])


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(arch):
        if arch not in cache:
            target = tiny_causal_lm(arch, sharpen=4.0)
            cache[arch] = (target, perturbed_copy(target, 0.3))
        return cache[arch]

    return get


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("with_eos", [False, True])
def test_greedy_equals_transformers(models, arch, batch, with_eos):
    target, draft = models(arch)
    ids, mask = ragged_prompts(batch, target.config.vocab_size, seed=batch)
    eos = _pick_eos(target, ids, mask) if with_eos else None
    ref = _reference(target, ids, mask, eos)
    for method in METHODS:
        kwargs = dict(draft_model=draft) if method == "draft" else {}
        out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, method=method,
                              eos_token_id=eos if with_eos else [], pad_token_id=0, **kwargs)
        assert out.sequences.shape == ref.shape, (method, out.sequences.shape, ref.shape)
        assert torch.equal(out.sequences, ref), f"{arch}/{method}: speculative output differs from greedy"
        assert out.lossless


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="jacobi", init="repeat", window=8),
        dict(method="jacobi", window=2),
        dict(method="lookup", window=5, max_ngram=2),
        dict(method="draft", window=9, adaptive=True),
        dict(method="draft", window=9, draft_confidence=0.6),
        dict(method="draft", window=4, draft="self"),
        dict(method="draft", window=7, draft="other_arch"),
    ],
)
def test_greedy_variants_llama(kwargs):
    target = tiny_causal_lm("llama", sharpen=4.0)
    kwargs = dict(kwargs)
    draft = kwargs.pop("draft", None)
    if kwargs["method"] == "draft":
        if draft == "self":
            kwargs["draft_model"] = target  # every draft accepted: bonus tokens and 2-token pending blocks
        elif draft == "other_arch":
            kwargs["draft_model"] = tiny_causal_lm("gpt2", hidden=16, layers=1)
        else:
            kwargs["draft_model"] = perturbed_copy(target, 0.2)
    ids, mask = ragged_prompts(4, 96, seed=3)
    ref = _reference(target, ids, mask, None)
    out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=[], **kwargs)
    assert torch.equal(out.sequences, ref)


def test_batch_rows_equal_rows_alone():
    """Ragged acceptance: each row of a batch equals the same prompt decoded alone, whatever its neighbours."""
    target = tiny_causal_lm("qwen3", sharpen=4.0)
    draft = perturbed_copy(target, 0.15)
    ids, mask = ragged_prompts(6, 96, seed=7)
    batch = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=30, method="draft",
                            draft_model=draft, eos_token_id=[])
    assert len(set(batch.stats.accepted_histogram)) > 1  # rows really accepted different amounts
    for b in range(ids.shape[0]):
        row = ids[b : b + 1, mask[b].bool()]
        alone = mmspec.generate(target, row, max_new_tokens=30, method="draft", draft_model=draft, eos_token_id=[])
        assert torch.equal(alone.sequences[0, row.shape[1]:], batch.sequences[b, ids.shape[1]:])


def test_self_draft_accepts_everything():
    target = tiny_causal_lm("llama")
    ids, mask = ragged_prompts(3, 96, seed=2)
    out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=20, method="draft", draft_model=target,
                          window=5, eos_token_id=[])
    # 1 prefill token + 19 more in steps of 5 (4 drafts + bonus): 4 steps of 5 = 20 > 19, so 5 forwards in all.
    assert out.stats.target_forwards == 5
    assert out.stats.accepted_histogram[4] >= 3 * 3


@pytest.mark.parametrize("method", METHODS)
def test_logits_processors_apply_to_target_and_draft(method):
    """transformers logits processors see each position's exact prefix (left-padded prompt + tokens so far),
    for target and draft rows alike: greedy output equals transformers' with the same processors."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    target = tiny_causal_lm("llama", sharpen=4.0)
    ids, mask = ragged_prompts(3, 96, seed=11)

    def processors():
        return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.8), NoRepeatNGramLogitsProcessor(2)])

    ref = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0, logits_processor=processors())
    assert not torch.equal(ref, _reference(target, ids, mask, None))  # the processors matter: the test can fail
    kwargs = dict(draft_model=perturbed_copy(target, 0.2)) if method == "draft" else {}
    out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, method=method, eos_token_id=[],
                          logits_processor=processors(), **kwargs)
    assert torch.equal(out.sequences, ref)
