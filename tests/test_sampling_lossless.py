"""Sampled speculative decoding follows the target distribution exactly.

On a tiny vocabulary (V = 8) the exact distribution of 3 sampled tokens is enumerated from the model
(512 outcomes, computed here independently of mmspec's logits pipeline) and compared with N = 20,000
speculative samples drawn as one batch; on V = 4 the same for 5 tokens (1024 outcomes), where windows of
several drafts and carried-over Jacobi drafts occur (recorded and asserted). Chi-square test at significance
level alpha = 0.001 (bins with an
expected count under 5 are merged). A deliberately biased criterion must fail the same test, so the test
has power.
"""

import itertools

import pytest
import torch
from scipy.stats import chisquare

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


# ---------------------------------------------------------------------------------------------------------
# Longer outputs: windows of several drafts, Jacobi drafts carried over between iterations
# ---------------------------------------------------------------------------------------------------------
# With 3 new tokens the loop allows at most one draft after the first token; here 5 new tokens on V = 4
# (1024 outcomes, still enumerated exactly) let windows of 2-3 drafts be verified, Jacobi carry its drafts
# (and their stale-prefix q rows) into the next iteration and the coupled rule redraw them. The test records
# that these cases really occurred, so it cannot pass without exercising them.
V5, NEW5 = 4, 5
PROMPT5 = torch.tensor([[2, 3, 2, 3, 2]])


def exact_distribution_long(model, temperature=1.0, top_k=None):
    outcomes = torch.tensor(list(itertools.product(range(V5), repeat=NEW5)))
    seqs = torch.cat([PROMPT5.expand(len(outcomes), -1), outcomes], dim=1)
    with torch.no_grad():
        logits = model(seqs).logits.double()
    T = PROMPT5.shape[1]
    probs = _warp(logits[:, T - 1 : T - 1 + NEW5], temperature, top_k, None)
    return probs.gather(-1, outcomes.unsqueeze(-1)).squeeze(-1).prod(-1)


def chi2_pvalue_long(samples, expected_probs):
    codes = (samples * (V5 ** torch.arange(NEW5 - 1, -1, -1))).sum(-1)
    observed = torch.bincount(codes, minlength=V5**NEW5).double()
    expected = expected_probs * len(samples)
    assert float(observed[expected == 0].sum()) == 0, "sampled an outcome of probability zero"
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


@pytest.fixture(scope="module")
def pair_long():
    target = tiny_causal_lm("llama", vocab_size=V5, hidden=16, sharpen=2.0, seed=12)
    return target, perturbed_copy(target, 0.5, seed=6)


class Recorder:
    """Counts, over a decode, the verify steps where some row verified >= 2 of its own drafts, and the Jacobi
    proposals that reused drafts carried over from an earlier iteration (with their q rows)."""

    def __init__(self, monkeypatch):
        import mmspec.decoding as decoding
        from mmspec.drafting.jacobi import JacobiProposer

        self.multi, self.carried = 0, 0
        real_verify, real_propose = decoding.verify, JacobiProposer.propose

        def verify(drafts, *a, **k):
            self.multi += int(((drafts >= 0).sum(-1) >= 2).any())
            return real_verify(drafts, *a, **k)

        def propose(proposer, state, max_tokens):
            if proposer.probs is not None:  # q rows of carried drafts exist: the stale-prefix case
                self.carried += int((proposer.count[state.active] > 0).any())
            return real_propose(proposer, state, max_tokens)

        monkeypatch.setattr(decoding, "verify", verify)
        monkeypatch.setattr(JacobiProposer, "propose", propose)


LONG_CASES = {
    "jacobi": ("jacobi", dict(window=4), {}),
    "jacobi-coupled-repeat": ("jacobi", dict(window=4, init="repeat", coupled=True), {}),
    "jacobi-coupled-temp0.8-topk3": ("jacobi", dict(window=4, coupled=True), dict(temperature=0.8, top_k=3)),
    "draft": ("draft", dict(window=4), {}),
    "lookup": ("lookup", dict(window=4, max_ngram=2), {}),
}


@pytest.mark.parametrize("case", list(LONG_CASES))  # about 5 s each on one core
def test_sampling_is_lossless_over_several_drafts(pair_long, monkeypatch, case):
    method, kw, warp = LONG_CASES[case]
    target, draft = pair_long
    rec = Recorder(monkeypatch)
    extra = dict(draft_model=draft) if method == "draft" else {}
    out = mmspec.generate(target, PROMPT5.expand(N, -1), max_new_tokens=NEW5, method=method, do_sample=True,
                          generator=torch.Generator().manual_seed(99), eos_token_id=[], **kw, **warp, **extra)
    samples = out.sequences[:, PROMPT5.shape[1]:]
    assert rec.multi > 0, "no step verified a window of 2+ drafts"
    assert sum(out.stats.accepted_histogram[2:]) > 0, "no row accepted 2+ drafts in a step"
    if method == "jacobi":
        assert rec.carried > 0, "no Jacobi drafts were carried over"
    p = chi2_pvalue_long(samples, exact_distribution_long(target, **warp))
    assert p > ALPHA, f"{case}: chi-square p = {p:.2e}"


def test_biased_criterion_is_detected_over_several_drafts(pair_long):
    target, _ = pair_long
    out = mmspec.generate(target, PROMPT5.expand(N, -1), max_new_tokens=NEW5, method="jacobi", window=4,
                          do_sample=True, generator=torch.Generator().manual_seed(99), eos_token_id=[],
                          acceptance=AcceptAll())
    assert chi2_pvalue_long(out.sequences[:, PROMPT5.shape[1]:], exact_distribution_long(target)) < 1e-6
