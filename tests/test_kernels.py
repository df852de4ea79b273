"""The fused verification kernels: the torch reference equals the composition it replaces, and the Triton
kernels (run by Triton's CPU interpreter here) equal the reference.

"Equal" is asserted token for token on fixed seeds: given the same noise tensors, accepted counts, tokens
and the emitted token must be identical. The p rows may differ in the last bits (exp and summation order,
see ``mmspec/kernels/triton_verify.py``), which could flip a decision only at a ~1e-7 near-tie, so they are
compared with a float32-rounding tolerance and an exact support.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: the kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

import mmspec  # noqa: E402
from mmspec.kernels import (  # noqa: E402
    draw_noise,
    make_request,
    reference,  # noqa: E402
    resolve_backend,
    verify_from_logits,
)
from mmspec.sampling import LogitsPipeline, sample_from_weights  # noqa: E402

from utils_stats import chi2_pvalue  # noqa: E402

triton_verify = pytest.importorskip("mmspec.kernels.triton_verify")


def _case(B, K, V, *, seed, pipe=None, dtype=torch.float32, spread=2.0, draft_noise=0.7, guidance=None,
          deterministic=False, q_dtype=None):
    """Random target logits and drafts that agree with them often (q = the pipeline on perturbed logits)."""
    pipe = pipe or {}
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, K + 1, V, generator=g, dtype=torch.float64) * spread).to(dtype)
    kw = dict(pipe)
    if guidance is not None:
        kw.update(guidance_scale=guidance,
                  uncond_logits=(torch.randn(B, K + 1, V, generator=g, dtype=torch.float64) * spread).to(dtype))
    guided = reference.guided_logits(logits, kw.get("uncond_logits"), kw.get("guidance_scale"))
    draft_scores = guided[:, :K].double() + draft_noise * torch.randn(B, K, V, generator=g, dtype=torch.float64)
    q = LogitsPipeline(do_sample=True, **pipe).probs(draft_scores.to(guided.dtype))
    drafts = sample_from_weights(q, g) if K else torch.empty(B, 0, dtype=torch.long)
    if q_dtype is not None:
        q = q.to(q_dtype)
    u, E = draw_noise(B, K, V, g)
    return drafts, (None if deterministic else q), logits, dict(kw, u=u, E=E)


def _both(drafts, q, logits, block_v=32, **kw):
    request = make_request(drafts, q, logits, return_probs=True, **kw)
    return reference.run(request), triton_verify.run(request, block_v=block_v)


def _assert_same(ref, ker, V):
    assert torch.equal(ref.num_accepted, ker.num_accepted), (ref.num_accepted, ker.num_accepted)
    assert torch.equal(ref.tokens, ker.tokens), (ref.tokens, ker.tokens)
    assert torch.equal(ref.next_token, ker.next_token)
    assert ker.tokens.dtype == ker.next_token.dtype == ker.num_accepted.dtype == torch.int64
    assert ((ker.next_token >= 0) & (ker.next_token < V)).all()
    if ref.target_probs is not None:
        assert ker.target_probs.dtype == ref.target_probs.dtype
        assert torch.equal(ref.target_probs > 0, ker.target_probs > 0)  # same top-k / top-p support
        torch.testing.assert_close(ker.target_probs, ref.target_probs, rtol=1e-5, atol=1e-6)


# -- the reference is the composition it replaces ----------------------------------------------------------


@pytest.mark.parametrize("pipe, guidance", [
    ({}, None),
    ({"temperature": 0.7, "top_k": 9, "top_p": 0.8}, None),
    ({"temperature": 1.3, "top_p": 0.6}, 3.0),
])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("K", [0, 1, 4])
def test_reference_equals_pipeline_then_verify(pipe, guidance, deterministic, K):
    B, V = 64, 23
    drafts, q, logits, kw = _case(B, K, V, seed=K, pipe=pipe, guidance=guidance, deterministic=deterministic)
    scores = reference.guided_logits(logits, kw.get("uncond_logits"), kw.get("guidance_scale"))
    target_probs = LogitsPipeline(do_sample=True, **pipe).probs(scores)

    # mmspec.verify draws u then E from its generator; replay those draws from a twin generator.
    u, E = draw_noise(B, K, V, torch.Generator().manual_seed(123))
    expected = mmspec.verify(drafts, q, target_probs, "exact", torch.Generator().manual_seed(123))
    got = verify_from_logits(drafts, q, logits, **dict(kw, u=u, E=E), return_probs=True, backend="torch")
    assert torch.equal(got.num_accepted, expected.num_accepted)
    assert torch.equal(got.tokens, expected.tokens)
    assert torch.equal(got.next_token, expected.next_token)
    assert torch.equal(got.target_probs, target_probs)
    if K:  # the case is informative: some rows accept drafts, some reject
        assert 0 < expected.num_accepted.float().mean() < K

    greedy_expected = mmspec.verify(drafts, None, scores, greedy=True)
    greedy = verify_from_logits(drafts, q, logits, greedy=True, **dict(kw, u=None, E=None), backend="torch")
    assert torch.equal(greedy.tokens, greedy_expected.tokens) and greedy.target_probs is None

    rows = torch.arange(B) % 3 == 0  # greedy and sampled rows in one call: each row as if alone
    mixed = verify_from_logits(drafts, q, logits, greedy=rows, **dict(kw, u=u, E=E), backend="torch")
    assert torch.equal(mixed.tokens[rows], greedy_expected.tokens[rows])
    assert torch.equal(mixed.tokens[~rows], expected.tokens[~rows])


# -- the Triton kernels equal the reference ------------------------------------------------------------------


@pytest.mark.parametrize("pipe, guidance", [
    ({"temperature": 0.6}, None),
    ({"top_k": 7}, None),
    ({"top_p": 0.75}, 1.5),
    ({"temperature": 1.4, "top_k": 12, "top_p": 0.9}, 2.5),
])
def test_kernel_matches_reference_sampled(pipe, guidance):
    B, K, V = 2, 3, 45  # V = 32 + 13: the last tile is partial
    drafts, q, logits, kw = _case(B, K, V, seed=1, pipe=pipe, guidance=guidance)
    ref, ker = _both(drafts, q, logits, **kw)
    _assert_same(ref, ker, V)


def test_kernel_matches_reference_deterministic_drafts_and_mixed_rows():
    B, K, V = 4, 2, 37
    drafts, _, logits, kw = _case(B, K, V, seed=2, pipe={"top_k": 10}, deterministic=True)
    greedy = torch.tensor([True, False, True, False])
    ref, ker = _both(drafts, None, logits, greedy=greedy, top_k=10, u=kw["u"], E=kw["E"])
    _assert_same(ref, ker, V)


def test_kernel_many_seeds_accept_and_reject():
    """Fresh random inputs, no filters (the one-pass path): identical decisions over many rows."""
    B, K, V = 12, 4, 29
    drafts, q, logits, kw = _case(B, K, V, seed=3, draft_noise=1.0)
    ref, ker = _both(drafts, q, logits, **kw)
    _assert_same(ref, ker, V)
    assert 0 < ref.num_accepted.float().mean() < K and (ref.num_accepted == K).any()


def test_kernel_greedy_rows():
    B, K, V = 4, 3, 41
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(B, K + 1, V, generator=g)
    drafts = logits[:, :K].argmax(-1)
    drafts[1, 2] = (drafts[1, 2] + 1) % V  # row 1 accepts 2, row 2 accepts 0, row 0 all K (bonus)
    drafts[2, 0] = (drafts[2, 0] + 3) % V
    logits[3, 1, 5] = logits[3, 1].max()  # a tie with an earlier or later index: the first index wins
    logits[3, 1, 30] = logits[3, 1].max()
    ref, ker = _both(drafts, None, logits, greedy=True, temperature=0.5, top_k=3)
    _assert_same(ref, ker, V)
    assert ref.num_accepted.tolist()[:3] == [K, 2, 0]
    # greedy rows need no noise and take no probabilities unless asked
    ker2 = triton_verify.run(make_request(drafts, None, logits, greedy=True), block_v=16)
    assert torch.equal(ker2.tokens, ref.tokens) and ker2.target_probs is None


@pytest.mark.parametrize("dtype, q_dtype, pipe", [
    (torch.float64, None, {"top_k": 6}),  # float64 keys: the search spans ~2^64 without overflowing
    (torch.bfloat16, torch.float64, {"top_k": 6, "top_p": 0.85}),
])
def test_kernel_dtypes(dtype, q_dtype, pipe):
    B, K, V = 2, 2, 35
    drafts, q, logits, kw = _case(B, K, V, seed=5, pipe=pipe, dtype=dtype, q_dtype=q_dtype)
    ref, ker = _both(drafts, q, logits, **kw)
    _assert_same(ref, ker, V)


# -- edge cases ----------------------------------------------------------------------------------------------


def test_edge_k_one_and_k_zero():
    for K in (1, 0):
        drafts, q, logits, kw = _case(6, K, 19, seed=6 + K)
        ref, ker = _both(drafts, q, logits, **kw)
        _assert_same(ref, ker, 19)


def test_edge_top_k_one_all_or_none_accepted():
    B, K, V = 3, 3, 33
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(B, K + 1, V, generator=g)
    best = logits.argmax(-1)
    u, E = draw_noise(B, K, V, g)
    # top-k = 1 makes p one-hot at the argmax: argmax drafts are always accepted (bonus = argmax) ...
    ref, ker = _both(best[:, :K], None, logits, top_k=1, u=u, E=E)
    _assert_same(ref, ker, V)
    assert (ker.num_accepted == K).all() and torch.equal(ker.next_token, best[:, K])
    # ... and any other draft never is (u > 0 = p(x)); the correction is the argmax.
    ref, ker = _both((best[:, :K] + 1) % V, None, logits, top_k=1, u=u, E=E)
    _assert_same(ref, ker, V)
    assert (ker.num_accepted == 0).all() and torch.equal(ker.next_token, best[:, 0])


def test_edge_p_equals_q_and_empty_residual():
    B, K, V = 8, 3, 21
    drafts, _, logits, kw = _case(B, K, V, seed=8, pipe={"temperature": 0.9})
    for backend in ("torch", "triton"):  # q = that backend's own p rows: every draft is accepted
        p = verify_from_logits(drafts, None, logits, greedy=True, return_probs=True, temperature=0.9,
                               backend=backend).target_probs
        drafts_p = sample_from_weights(p[:, :K], torch.Generator().manual_seed(9))
        out = verify_from_logits(drafts_p, p[:, :K], logits, temperature=0.9, u=kw["u"], E=kw["E"],
                                 backend=backend)
        assert (out.num_accepted == K).all()
    # q = 2 p (not normalised): acceptance 1/2 and an empty residual max(p - q, 0) = 0, so the emitted
    # token falls back to a draw from p; never NaN, never an id >= V.
    ref, ker = _both(drafts_p, 2 * p[:, :K], logits, temperature=0.9, u=kw["u"], E=kw["E"])
    _assert_same(ref, ker, V)
    assert (ref.num_accepted < K).any()


def test_edge_rows_with_one_finite_logit():
    B, K, V = 3, 2, 40
    logits = torch.full((B, K + 1, V), float("-inf"))
    only = torch.tensor([[3, 39, 17], [0, 0, 1], [38, 5, 39]])
    logits.scatter_(-1, only.unsqueeze(-1), 1.5)
    drafts = torch.tensor([[3, 39], [0, 7], [1, 5]])
    u, E = draw_noise(B, K, V, torch.Generator().manual_seed(10))
    for kw in ({}, {"top_k": 4, "top_p": 0.5, "temperature": 0.3}):
        ref, ker = _both(drafts, None, logits, u=u, E=E, **kw)
        _assert_same(ref, ker, V)
        assert ker.tokens.tolist() == [[3, 39, 17], [0, 0, -1], [38, -1, -1]]


def test_edge_ids_stay_in_vocab_with_partial_tiles():
    """Padding lanes of the last tile can never win the argmax, even when the real weights are tiny."""
    B, K, V = 4, 1, 17  # tiles of 16: the last one has a single real lane
    logits = torch.zeros(B, K + 1, V)
    logits[..., -1] = 30.0  # nearly all mass on the last id, the only real lane of the last tile
    drafts = torch.zeros(B, K, dtype=torch.long)
    u, E = draw_noise(B, K, V, torch.Generator().manual_seed(11))
    ref, ker = _both(drafts, None, logits, u=u, E=E, block_v=16)
    _assert_same(ref, ker, V)
    assert (ker.next_token == V - 1).all()
    ker_g = triton_verify.run(make_request(drafts, None, logits, greedy=True), block_v=16)
    assert (ker_g.next_token == V - 1).all()


# -- dispatch ------------------------------------------------------------------------------------------------


def test_dispatch_backends(monkeypatch):
    monkeypatch.delenv("MMSPEC_KERNELS", raising=False)
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("triton", "cpu") == "triton"  # allowed: the interpreter is on
    monkeypatch.setenv("MMSPEC_KERNELS", "triton")
    assert resolve_backend("auto", "cpu") == "triton"
    assert resolve_backend("torch", "cpu") == "torch"  # an explicit argument wins over the variable
    monkeypatch.setenv("MMSPEC_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MMSPEC_KERNELS"):
        resolve_backend("auto", "cpu")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fast", "cpu")


def test_dispatch_forced_triton_runs_the_kernel(monkeypatch):
    drafts, q, logits, kw = _case(2, 2, 12, seed=12)
    calls = []
    real = triton_verify.run
    monkeypatch.setattr(triton_verify, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("MMSPEC_KERNELS", "triton")
    out = verify_from_logits(drafts, q, logits, **kw)
    monkeypatch.setenv("MMSPEC_KERNELS", "torch")
    ref = verify_from_logits(drafts, q, logits, **kw)
    assert calls == [1] and torch.equal(out.tokens, ref.tokens)


def test_clear_errors():
    drafts, q, logits, kw = _case(2, 2, 12, seed=13)
    with pytest.raises(ValueError, match="`u`"):
        verify_from_logits(drafts, q, logits, u=kw["u"].float(), E=kw["E"])
    with pytest.raises(ValueError, match="`E`"):
        verify_from_logits(drafts, q, logits, u=kw["u"], E=None)
    with pytest.raises(ValueError, match="guidance_scale"):
        verify_from_logits(drafts, q, logits, guidance_scale=2.0, **kw)
    with pytest.raises(ValueError, match="top_p"):
        verify_from_logits(drafts, q, logits, top_p=1.5, **kw)
    with pytest.raises(ValueError, match="greedy"):
        verify_from_logits(drafts, q, logits, greedy=torch.tensor([1, 0]), **kw)
    with pytest.raises(ValueError, match="target_logits"):
        verify_from_logits(drafts, q, logits[:, :2], **kw)


# -- slower: larger rows, and the kernel's output distribution ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("pipe", [{}, {"temperature": 0.8, "top_k": 50, "top_p": 0.9}])
def test_kernel_matches_reference_larger(pipe):
    B, K, V = 4, 3, 1000
    drafts, q, logits, kw = _case(B, K, V, seed=14, pipe=pipe, spread=3.0, guidance=4.0)
    ref, ker = _both(drafts, q, logits, block_v=256, **kw)
    _assert_same(ref, ker, V)


@pytest.mark.slow
def test_kernel_output_distribution_chi_square():
    """The first emitted token of every row is distributed as p_1 whatever the draft (exactness).

    One launch over many independent rows of the same target (the interpreter runs ~0.1 s per row, hence
    the modest count); chi-square goodness of fit at significance level 0.001.
    """
    B, K, V = 400, 1, 5
    g = torch.Generator().manual_seed(15)
    row = torch.randn(1, K + 1, V, generator=g) * 1.5
    row[..., 3] = float("-inf")  # a masked token (structural forcing): never emitted
    logits = row.expand(B, -1, -1).contiguous()
    q = torch.softmax(torch.randn(1, K, V, generator=g) / 0.8, -1).expand(B, -1, -1)
    drafts = sample_from_weights(q, g)
    u, E = draw_noise(B, K, V, g)
    out = triton_verify.run(make_request(drafts, q, logits, u=u, E=E, temperature=0.8))
    p1 = LogitsPipeline(do_sample=True, temperature=0.8).probs(row[0, 0]).double()
    counts = torch.bincount(out.tokens[:, 0], minlength=V).double()
    keep = p1 > 0
    assert keep.sum() == V - 1 and counts[~keep].sum() == 0
    assert 0.2 < (out.tokens[:, 0] == drafts[:, 0]).double().mean() < 0.95  # drafts both kept and replaced
    assert chi2_pvalue(counts, p1) > 1e-3
