"""Unit tests of the verification core on hand-made rows."""

import pytest
import torch

import mmspec
from mmspec.acceptance import get
from mmspec.sampling import onehot, sample_categorical, sample_from_weights
from mmspec.verify import speculative_redraw

from utils_stats import chi2_pvalue


def _onehot_rows(tokens, V):
    return onehot(torch.tensor(tokens), V, dtype=torch.float64)


def test_perfect_match_takes_bonus():
    V = 6
    drafts = torch.tensor([[2, 3, 4]])
    p = _onehot_rows([[2, 3, 4, 5]], V)
    res = mmspec.verify(drafts, None, p, "exact", torch.Generator().manual_seed(0))
    assert res.num_accepted.tolist() == [3]
    assert res.tokens.tolist() == [[2, 3, 4, 5]]
    assert res.next_token.tolist() == [5]


def test_early_mismatch_emits_correction_and_pads():
    V = 6
    drafts = torch.tensor([[2, 1, 4]])
    p = _onehot_rows([[2, 3, 4, 5]], V)
    res = mmspec.verify(drafts, None, p, "exact", torch.Generator().manual_seed(0))
    assert res.num_accepted.tolist() == [1]
    assert res.tokens.tolist() == [[2, 3, -1, -1]]


def test_all_rejected():
    V = 5
    drafts = torch.tensor([[0, 0], [1, 1]])
    p = _onehot_rows([[3, 3, 3], [4, 4, 4]], V)
    res = mmspec.verify(drafts, None, p, "exact", torch.Generator().manual_seed(0))
    assert res.num_accepted.tolist() == [0, 0]
    assert res.tokens.tolist() == [[3, -1, -1], [4, -1, -1]]


def test_k_zero_is_plain_sampling():
    p = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]], dtype=torch.float64)
    res = mmspec.verify(torch.empty(1, 0, dtype=torch.long), None, p, "exact", torch.Generator().manual_seed(0))
    assert res.tokens.tolist() == [[2]] and res.num_accepted.tolist() == [0]


def test_k_one():
    V = 4
    drafts = torch.tensor([[1], [2]])
    p = _onehot_rows([[1, 3], [0, 3]], V)
    res = mmspec.verify(drafts, None, p, "exact", torch.Generator().manual_seed(0))
    assert res.tokens.tolist() == [[1, 3], [0, -1]]


def test_greedy_mode_uses_argmax_and_no_randomness():
    scores = torch.tensor([[[0.1, 2.0, 0.3], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    drafts = torch.tensor([[1, 2]])
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    res = mmspec.verify(drafts, None, scores, greedy=True, generator=g)
    assert res.tokens.tolist() == [[1, 0, -1]]
    assert torch.equal(g.get_state(), state)


def test_residual_when_p_equals_q_never_nan():
    """p == q: the residual max(p - q, 0) is empty; the core must fall back to p (and accept always anyway)."""
    torch.manual_seed(0)
    B, K, V = 64, 3, 7
    p = torch.softmax(torch.randn(B, K + 1, V, dtype=torch.float64), -1)
    q = p[:, :K].clone()
    drafts = sample_from_weights(q, torch.Generator().manual_seed(1))
    res = mmspec.verify(drafts, q, p, "exact", torch.Generator().manual_seed(2))
    assert (res.num_accepted == K).all()
    # Now force rejections with ratio < 1 at zero residual mass by perturbing only rounding.
    w = get("exact").residual(drafts[:, 0], q[:, 0], p[:, 0])
    assert (w.sum(-1) == 0).all()


def test_residual_matches_closed_form():
    p = torch.tensor([[[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]]], dtype=torch.float64)
    q = torch.tensor([[[0.1, 0.8, 0.1]]], dtype=torch.float64)
    exact = get("exact")
    a = exact.acceptance(torch.tensor([[1]]), q, p[:, :1])
    assert torch.allclose(a, torch.tensor([[0.3 / 0.8]], dtype=torch.float64))
    w = exact.residual(torch.tensor([1]), q[:, 0], p[:, 0])
    assert torch.allclose(w / w.sum(), torch.tensor([[0.4, 0.0, 0.1]], dtype=torch.float64) / 0.5)


def test_seeded_determinism_and_per_row_generators():
    torch.manual_seed(0)
    B, K, V = 5, 4, 11
    p = torch.softmax(torch.randn(B, K + 1, V), -1)
    q = torch.softmax(torch.randn(B, K, V), -1)
    drafts = sample_from_weights(q, torch.Generator().manual_seed(3))
    a = mmspec.verify(drafts, q, p, "exact", torch.Generator().manual_seed(7))
    b = mmspec.verify(drafts, q, p, "exact", torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(B)]
    full = mmspec.verify(drafts, q, p, "exact", gens)
    for i in range(B):
        alone = mmspec.verify(drafts[i : i + 1], q[i : i + 1], p[i : i + 1], "exact",
                              [torch.Generator().manual_seed(100 + i)])
        assert torch.equal(alone.tokens[0], full.tokens[i])


def test_emitted_ids_in_vocab_with_extreme_rows():
    """Rows with -inf everywhere but one token, zeros, and huge K never produce ids >= V or NaN."""
    torch.manual_seed(0)
    B, K, V = 256, 6, 13
    logits = torch.randn(B, K + 1, V) * 20
    logits[::3] = float("-inf")
    logits[::3, :, 4] = 0.0
    p = logits.softmax(-1)
    q = torch.softmax(torch.randn(B, K, V) * 20, -1)
    drafts = sample_from_weights(q, torch.Generator().manual_seed(1))
    res = mmspec.verify(drafts, q, p, "exact", torch.Generator().manual_seed(2))
    valid = res.tokens[res.tokens >= 0]
    assert valid.max() < V
    assert ((res.tokens >= 0).sum(-1) == res.num_accepted + 1).all()
    assert (res.next_token[::3] == 4).all()


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="target_probs"):
        mmspec.verify(torch.zeros(2, 3, dtype=torch.long), None, torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="draft_probs"):
        mmspec.verify(torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3, 4), torch.rand(2, 4, 5))


def test_criteria_registry():
    assert {"exact", "typical"} <= set(mmspec.acceptance.available())
    assert get("exact").lossless and not get("typical").lossless
    assert get("typical").requires_sampling
    with pytest.raises(ValueError, match="unknown acceptance criterion"):
        get("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        get("typical", nonsense=1)


def test_typical_rule():
    p = torch.tensor([[[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]]])
    crit = get("typical", epsilon=0.09, alpha=0.3)
    a = crit.acceptance(torch.tensor([[0, 2]]), None, p)
    H = -(p[0, 0] * p[0, 0].log()).sum()
    thr = min(0.09, 0.3 * float(torch.exp(-H)))
    assert a.tolist() == [[float(0.7 > thr), float(0.1 > thr)]]


def test_sample_from_weights_distribution():
    """argmax(w / E) is an exact draw from w / sum(w) (chi-square, alpha = 0.001)."""
    w = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25], dtype=torch.float64)
    draws = sample_from_weights(w.expand(40000, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[1] == 0
    assert chi2_pvalue(counts, w) > 1e-3  # (zero-weight cells must stay empty, the rest fit)


def test_sample_categorical_distribution():
    """Inverting the cumulative sum is an exact draw too, zero-weight cells (inside and at the end) stay empty."""
    w = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25, 0.0], dtype=torch.float64)
    draws = sample_categorical(w.expand(40000, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[1] == 0 and counts[5] == 0
    assert chi2_pvalue(counts[:5], w[:5]) > 1e-3


def test_sample_categorical_top_of_the_range_never_picks_zero_weight(monkeypatch):
    """u * total rounding up to total must not land on the zero-weight tail."""
    import mmspec.sampling as sampling

    monkeypatch.setattr(sampling, "uniform", lambda shape, *a, **k: torch.zeros(shape, dtype=torch.float64))  # u = 1
    w = torch.tensor([[0.1, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]], dtype=torch.float64)
    assert sample_categorical(w).tolist() == [1, 3]


def test_sample_categorical_rows_reproducible_alone():
    """Per-row generators with counts: a row draws the same tokens alone as inside a batch (CPU generators)."""
    w = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(4))
    batch = sample_categorical(w, [torch.Generator().manual_seed(i) for i in range(3)], [5, 2, 3])
    for b, n in enumerate([5, 2, 3]):
        alone = sample_categorical(w[b : b + 1], [torch.Generator().manual_seed(b)], [n])
        assert alone[0, :n].tolist() == batch[b, :n].tolist()


def test_coupled_redraw_marginal_is_p():
    torch.manual_seed(0)
    V, N = 6, 40000
    q = torch.softmax(torch.randn(V, dtype=torch.float64) * 2, -1)
    p = torch.softmax(torch.randn(V, dtype=torch.float64) * 2, -1)
    old = sample_from_weights(q.expand(N, 1, V), torch.Generator().manual_seed(1))
    new = speculative_redraw(old, q.expand(N, 1, V), p.expand(N, 1, V), torch.Generator().manual_seed(2))
    counts = torch.bincount(new.flatten(), minlength=V).double()
    assert chi2_pvalue(counts, p) > 1e-3
    kept = (new == old).double().mean()
    assert kept > torch.minimum(p, q).sum() - 0.02  # keeps the old draft about 1 - TV(p, q) of the time
