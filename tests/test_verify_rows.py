"""The verify core's numerics, rows that cannot be sampled, and rows with fewer drafts than the window."""

import pytest
import torch

import mmspec
from mmspec.verify import InvalidDistributionError, speculative_redraw

from lm_fixtures import tiny_causal_lm


def _rows(B, K, V, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(B, K + 1, V, generator=g, dtype=torch.float64) * 2).softmax(-1)
    q = (p[:, :K].log() + torch.randn(B, K, V, generator=g, dtype=torch.float64)).softmax(-1)
    drafts = torch.multinomial(q.flatten(0, 1), 1, generator=g).view(B, K)
    return drafts, q.to(dtype), p.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_are_verified_in_float32(dtype):
    """bf16/fp16 rows give exactly the result of the same values in float32 (the ratio and the residual are
    not computed in half precision)."""
    drafts, q, p = _rows(4000, 3, 16, seed=0, dtype=dtype)
    got = mmspec.verify(drafts, q, p, "exact", torch.Generator().manual_seed(1))
    ref = mmspec.verify(drafts, q.float(), p.float(), "exact", torch.Generator().manual_seed(1))
    assert torch.equal(got.tokens, ref.tokens)
    a = speculative_redraw(drafts, q, p[:, :3], torch.Generator().manual_seed(2))
    b = speculative_redraw(drafts, q.float(), p[:, :3].float(), torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["zeros", "nan", "inf", "negative"])
def test_target_row_that_cannot_be_sampled_raises(bad):
    drafts, q, p = _rows(3, 2, 8, seed=3, dtype=torch.float64)
    value = {"zeros": 0.0, "nan": float("nan"), "inf": float("inf"), "negative": -0.5}[bad]
    p[1, 0] = value  # the first row of row 1 is always used
    with pytest.raises(InvalidDistributionError, match=r"rows \[1\].*no allowed token"):
        mmspec.verify(drafts, q, p, "exact", torch.Generator().manual_seed(0))
    with pytest.raises(InvalidDistributionError):
        mmspec.verify(drafts, None, p, "exact", torch.Generator().manual_seed(0))
    # flagged without raising when asked (the loop checks the flags with its own host copy)
    res = mmspec.verify(drafts, q, p, "exact", torch.Generator().manual_seed(0), check=False)
    assert res.invalid.tolist() == [0, 1, 0]


def test_greedy_row_with_no_allowed_token_raises():
    scores = torch.zeros(2, 2, 5)
    scores[0, 0] = float("-inf")
    with pytest.raises(InvalidDistributionError, match=r"rows \[0\]"):
        mmspec.verify(torch.tensor([[1], [2]]), None, scores, greedy=True)


def test_unused_rows_are_not_checked():
    """A row past the first rejection is never used: garbage there is no error."""
    p = torch.tensor([[[0.0, 1.0, 0.0, 0.0], [float("nan")] * 4]], dtype=torch.float64)
    res = mmspec.verify(torch.tensor([[2]]), None, p, "exact", torch.Generator().manual_seed(0))
    assert res.tokens.tolist() == [[1, -1]] and res.invalid.tolist() == [0]


def test_draft_outside_its_own_q_raises():
    drafts, q, p = _rows(2, 2, 8, seed=4, dtype=torch.float64)
    q[0, 0, drafts[0, 0]] = 0.0
    with pytest.raises(InvalidDistributionError, match=r"rows \[0\].*probability 0"):
        mmspec.verify(drafts, q, p, "exact", torch.Generator().manual_seed(0))


def test_generate_raises_when_processors_exclude_every_token():
    """No-repeat-ngram style exhaustion: a processor that leaves no allowed token is an error, not token 0."""

    def ban_everything_after(n):
        def proc(ids, scores):
            return torch.where(torch.tensor(ids.shape[1] >= n), torch.full_like(scores, float("-inf")), scores)
        return proc

    model = tiny_causal_lm()
    ids = torch.tensor([[5, 6, 7]])
    for kw in (dict(method="ar"), dict(method="jacobi", window=3), dict(method="ar", do_sample=True)):
        with pytest.raises(InvalidDistributionError, match="no allowed token"):
            mmspec.generate(model, ids, max_new_tokens=6, logits_processor=[ban_everything_after(5)], **kw)
        with pytest.raises(InvalidDistributionError):  # already at the first token (the prefill)
            mmspec.generate(model, ids, max_new_tokens=6, logits_processor=[ban_everything_after(0)], **kw)


def test_rows_with_fewer_drafts_take_their_own_bonus():
    """Drafts padded with -1: a row verifies its own drafts only, and draws exactly what it draws with a window
    of its own (per-row generators)."""
    drafts, q, p = _rows(3, 3, 8, seed=5, dtype=torch.float64)
    p[:, :3] = q  # q == p: every own draft is accepted, so the bonus position is reached
    own = [3, 1, 0]
    padded = drafts.clone()
    for b, k in enumerate(own):
        padded[b, k:] = -1
    seeds = [7, 8, 9]
    res = mmspec.verify(padded, q, p, "exact", [torch.Generator().manual_seed(s) for s in seeds])
    assert res.num_accepted.tolist() == own
    for b, k in enumerate(own):
        alone = mmspec.verify(drafts[b:b + 1, :k], q[b:b + 1, :k], p[b:b + 1, : k + 1], "exact",
                              [torch.Generator().manual_seed(seeds[b])])
        assert res.tokens[b, : k + 1].tolist() == alone.tokens[0].tolist()
        assert (res.tokens[b, k + 1:] == -1).all()
    greedy = mmspec.verify(padded, None, p, greedy=True)
    assert greedy.num_accepted.tolist() == [int((drafts[0] == p[0, :3].argmax(-1)).long().cumprod(0).sum()), *[
        int((drafts[b, :k] == p[b, :k].argmax(-1)).long().cumprod(0).sum()) for b, k in list(enumerate(own))[1:]]]
