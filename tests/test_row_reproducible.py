"""With one generator per row, a sampled row decodes the same tokens alone as in any batch, for every method.

A row's random draws must depend on that row only: its window (capped by its own tokens left, not the
batch's), its draft length and stops (adaptive, confidence), and how many numbers it draws from its generator
(only its own slots). Rows here have different prompt lengths (left padding), accept different numbers of
drafts and finish at different steps; float64 tiny models keep the batched and single-row forwards equal to
rounding, far from any sampling decision.
"""

import pytest
import torch

import mmspec

from lm_fixtures import perturbed_copy, tiny_causal_lm

V, NEW = 24, 24
SEEDS = [11, 22, 33, 44]


@pytest.fixture(scope="module")
def pair():
    target = tiny_causal_lm("llama", vocab_size=V, sharpen=4.0, seed=3)
    return target, perturbed_copy(target, 0.3, seed=4)


def prompts():
    """4 left-padded prompts of lengths 3..9, repetitive so that prompt lookup finds matches."""
    rows = [[5, 6, 5], [7, 8, 9, 7, 8, 9, 7, 8, 9], [4, 5, 6, 4, 5, 6], [10, 11, 10, 11, 10]]
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = 1
    return ids, mask


CASES = {
    "ar": dict(method="ar"),
    "jacobi": dict(method="jacobi", window=5),
    "jacobi-coupled": dict(method="jacobi", window=5, init="repeat", coupled=True),
    "draft": dict(method="draft", window=5),
    "draft-adaptive-confidence": dict(method="draft", window=6, adaptive=True, draft_confidence=0.5),
    "draft-tree": dict(method="draft", window=6, tree=(3, 2)),
    "lookup": dict(method="lookup", window=4, max_ngram=2),
}


def _run(pair, ids, mask, seeds, kw):
    target, draft = pair
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    extra = dict(draft_model=draft) if kw["method"] == "draft" else {}
    out = mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, generator=gens,
                          temperature=0.9, eos_token_id=[], **kw, **extra)
    return out.sequences[:, ids.shape[1]:], out.stats


@pytest.mark.parametrize("case", list(CASES))
def test_row_alone_equals_row_in_batch(pair, case):
    kw = CASES[case]
    ids, mask = prompts()
    batch, stats = _run(pair, ids, mask, SEEDS, kw)
    if kw["method"] != "ar":  # the rows really took windows of different lengths
        assert stats.step_compression > 1.0
        assert len(set(stats.row_forwards)) > 1, stats.row_forwards
    for b in range(len(SEEDS)):
        row_ids = ids[b : b + 1, mask[b].bool()]
        alone, _ = _run(pair, row_ids, torch.ones_like(row_ids), SEEDS[b : b + 1], kw)
        assert alone[0].tolist() == batch[b].tolist(), f"{case}: row {b} alone differs from the batch"
    # a different batch around the same row: rows 1 and 3 only, in the other order
    pick = [3, 1]
    other, _ = _run(pair, ids[pick], mask[pick], [SEEDS[i] for i in pick], kw)
    assert other.tolist() == batch[pick].tolist()


def test_shared_generator_still_seeds_the_whole_batch(pair):
    """One generator for the batch: the same seed gives the same batch (rows are not reproducible alone then)."""
    ids, mask = prompts()
    target, _ = pair
    a, b = (mmspec.generate(target, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, window=5,
                            generator=torch.Generator().manual_seed(5)).sequences for _ in range(2))
    assert torch.equal(a, b)
