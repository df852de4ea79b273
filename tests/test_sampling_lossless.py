"""Sampled speculative decoding follows the target distribution exactly.

On a tiny vocabulary (V = 8) the exact distribution of 3 sampled tokens is enumerated from the model
(512 outcomes, computed here independently of mmspec's logits pipeline) and compared with N = 20,000
speculative samples drawn as one batch. Chi-square test at significance level alpha = 0.001 (bins with an
expected count under 5 are merged). A deliberately biased criterion must fail the same test, so the test
has power.
"""

import pytest
import torch

import mmspec
from mmspec.acceptance import Criterion

from lm_fixtures import perturbed_copy, tiny_causal_lm
from utils_stats import all_outcomes, chi2_pvalue, outcome_counts, sequence_law

V, NEW, N, ALPHA = 8, 3, 20_000, 1e-3
PROMPT = torch.tensor([[3, 5, 3, 5, 3]])


def _warp(logits, temperature, top_k, top_p):
    logits = logits / temperature
    if top_k:
        kth = logits.sort(-1, descending=True).values[..., top_k - 1 : top_k]
        logits = torch.where(logits < kth, torch.tensor(float("-inf"), dtype=logits.dtype), logits)
    probs = logits.softmax(-1)
    if top_p is not None:
        sp, order = probs.sort(-1, descending=True)
        before = sp.cumsum(-1) - sp  # mass strictly above each token
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def exact_distribution(model, temperature=1.0, top_k=None, top_p=None):
    outcomes = all_outcomes(V, NEW)
    seqs = torch.cat([PROMPT.expand(len(outcomes), -1), outcomes], dim=1)
    with torch.no_grad():
        logits = model(seqs).logits.double()
    T = PROMPT.shape[1]
    probs = _warp(logits[:, T - 1 : T - 1 + NEW], temperature, top_k, top_p)
    return sequence_law(probs, outcomes)  # [V**NEW], index = base-V number of the outcome


@pytest.fixture(scope="module")
def pair():
    target = tiny_causal_lm("llama", vocab_size=V, hidden=16, sharpen=3.0, seed=11)
    return target, perturbed_copy(target, 0.6, seed=5)


def _sample(target, draft, method, warp, **kw):
    extra = dict(draft_model=draft) if method == "draft" else {}
    out = mmspec.generate(target, PROMPT.expand(N, -1), max_new_tokens=NEW, method=method, do_sample=True,
                          generator=torch.Generator().manual_seed(1234), eos_token_id=[], **warp, **extra, **kw)
    assert out.sequences.shape == (N, PROMPT.shape[1] + NEW)
    return out.sequences[:, PROMPT.shape[1]:], out.stats


WARPS = {
    "plain": dict(),
    "temp0.7_topk5": dict(temperature=0.7, top_k=5),
    "temp1.5_topp0.8": dict(temperature=1.5, top_p=0.8),
}
CASES = [
    ("ar", {}),
    ("jacobi", dict(window=4)),
    ("jacobi", dict(window=4, init="repeat", coupled=True)),
    ("lookup", dict(window=3)),
    ("draft", dict(window=4)),
    ("draft", dict(window=4, adaptive=True)),
]


@pytest.mark.slow
@pytest.mark.parametrize("warp", list(WARPS))
@pytest.mark.parametrize("method,kw", CASES, ids=lambda c: c if isinstance(c, str) else "-".join(f"{k}{v}" for k, v in c.items()))
def test_sampling_is_lossless(pair, method, kw, warp):
    target, draft = pair
    expected = exact_distribution(target, **WARPS[warp])
    samples, stats = _sample(target, draft, method, WARPS[warp], **kw)
    if method != "ar":
        assert stats.step_compression > 1.0  # drafts were really accepted, so the test exercises acceptance
    p = chi2_pvalue(outcome_counts(samples, V), expected)
    assert p > ALPHA, f"{method} {kw} {warp}: chi-square p = {p:.2e}"


class AcceptAll(Criterion):
    """A wrong criterion (always accepts) used to show the test detects a biased sampler."""

    name, lossless = "accept-all", False

    def acceptance(self, draft_tokens, draft_probs, target_probs):
        return torch.ones(draft_tokens.shape, dtype=target_probs.dtype)

    def residual(self, draft_tokens, draft_probs, target_probs):
        return target_probs


def test_biased_criterion_is_detected(pair):
    target, draft = pair
    expected = exact_distribution(target)
    samples, _ = _sample(target, draft, "draft", {}, window=4, acceptance=AcceptAll())
    assert chi2_pvalue(outcome_counts(samples, V), expected) < 1e-6
