"""Relaxed (lossy) visual-token criteria: LANTERN / LANTERN++ and GSD.

Monte Carlo tests state their significance: a sample of N emitted tokens from a distribution r over V
tokens has TV(empirical, r) <= tol(N, V, alpha) = (sqrt(V / N) + sqrt(2 ln(1 / alpha) / N)) / 2 with
probability >= 1 - alpha (E||emp - r||_1 <= sqrt(V / N) by Cauchy-Schwarz, plus McDiarmid). Run with
``pytest -s`` to see the measured TV numbers.
"""

import math

import pytest
import torch

import mmspec
from mmspec.acceptance import GSD, Lantern, deviation, get, modified_target
from mmspec.acceptance.neighbours import codebook_neighbours, image_neighbours
from mmspec.sampling import sample_from_weights

from utils_stats import chi2_pvalue

ALPHA = 1e-6  # significance of every Monte Carlo bound below


def _tol(N, V, alpha=ALPHA):
    return 0.5 * (math.sqrt(V / N) + math.sqrt(2 * math.log(1 / alpha) / N))


def _tv(a, b):
    return 0.5 * (a - b).abs().sum(-1)


def _rows(B, K, V, seed, scale=2.0, zeros=True, dtype=torch.float64):
    """Random target rows p [B, K, V] (some entries exactly 0, as after top-k) and draft rows q, drafts ~ q."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, V, generator=g, dtype=dtype) * scale
    if zeros:
        logits = logits.masked_fill(torch.rand(B, K, V, generator=g, dtype=dtype) < 0.3, float("-inf"))
        logits[..., 0] = 0.0  # never an all -inf row
    p = logits.softmax(-1)
    q = (torch.randn(B, K, V, generator=g, dtype=dtype) * scale).softmax(-1)
    drafts = sample_from_weights(q, torch.Generator().manual_seed(seed + 1))
    return drafts, q, p


def _codebook(N, D=3, seed=0, dtype=torch.float64):
    return torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# neighbour tables
# ---------------------------------------------------------------------------------------------------
def test_neighbour_table_matches_brute_force_with_offset():
    N, k, off, V = 50, 7, 10, 80
    cb = _codebook(N)
    table = codebook_neighbours(cb, k, image_token_offset=off, vocab_size=V)
    assert table.shape == (V, k) and table.dtype == torch.int64
    assert (table[:off] == -1).all() and (table[off + N :] == -1).all()
    img = table[off : off + N]
    assert ((img >= off) & (img < off + N)).all()
    assert (img != torch.arange(off, off + N).unsqueeze(1)).all()  # self excluded
    d = torch.cdist(cb, cb)
    d.fill_diagonal_(float("inf"))
    brute = d.argsort(-1)[:, :k] + off
    assert torch.equal(img, brute)
    assert torch.equal(image_neighbours(cb, k, off), img)


def test_neighbour_table_chunked_equals_unchunked_and_small_codebooks():
    cb = _codebook(300, D=4, seed=1)
    full = image_neighbours(cb, 20, 3, chunk_size=300)
    for chunk in (1, 7, 64):
        assert torch.equal(image_neighbours(cb, 20, 3, chunk_size=chunk), full)
    assert torch.equal(image_neighbours(cb, 20, 3, max_chunk_elements=1000), full)  # 3 rows per block
    assert torch.equal(image_neighbours(cb.float(), 20, 3), full)  # float32 codebook, same order here
    assert image_neighbours(cb[:5], 100).shape == (5, 4)  # k capped at N - 1
    assert image_neighbours(cb[:1], 3).shape == (1, 0)
    dup = torch.tensor([[0.0], [0.0], [5.0]])  # duplicated entries are neighbours of each other, not of self
    assert image_neighbours(dup, 1)[:2].flatten().tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------------
# the math on hand-made rows
# ---------------------------------------------------------------------------------------------------
def test_lantern_moves_exactly_the_j_prefix():
    cb = torch.tensor([[0.0], [1.0], [2.5], [4.5], [7.0]], dtype=torch.float64)  # neighbours of 0: 1, 2, 3, 4
    p = torch.tensor([[0.3, 0.04, 0.05, 0.03, 0.58]], dtype=torch.float64)
    x = torch.tensor([0])
    crit = Lantern(k=4, delta=0.1, codebook=cb)
    # c = .04, .09, .12, .70 -> J = 2: tokens 1 and 2 move (0.09 <= delta); token 3 would exceed delta.
    expected = torch.tensor([[0.39, 0.0, 0.0, 0.03, 0.58]], dtype=torch.float64)
    assert torch.allclose(crit.modified_target(x, p), expected)
    assert torch.allclose(modified_target(crit, x, p), expected)
    assert torch.allclose(deviation(crit, x, p), torch.tensor([0.09], dtype=torch.float64))
    assert torch.allclose(crit.acceptance(x[:, None], None, p[:, None]), torch.tensor([[0.39]], dtype=torch.float64))
    assert torch.allclose(crit.residual(x, None, p), torch.tensor([[0, 0, 0, 0.03, 0.58]], dtype=torch.float64))
    q = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    a = crit.acceptance(x[:, None], q[:, None], p[:, None])
    assert torch.allclose(a, torch.tensor([[0.39 / 0.6]], dtype=torch.float64))
    assert torch.allclose(crit.residual(x, q, p), (expected - q).clamp_min(0))
    # LANTERN++: bound (lam - 1) p(x) = 0.15 * 0.3 = 0.045 -> J = 1.
    pp = Lantern(k=4, lam=1.15, codebook=cb)
    assert torch.allclose(pp.modified_target(x, p), torch.tensor([[0.34, 0.0, 0.05, 0.03, 0.58]], dtype=torch.float64))


def _lantern_reference(table, x, p, bound):
    """Slow, obviously-correct p~ for one row."""
    pt = p.clone()
    c = 0.0
    for n in table[x].tolist():
        if n < 0:
            continue
        if c + float(p[n]) > bound:
            break
        c += float(p[n])
        pt[n] = 0.0
    pt[x] += c
    return pt


def test_lantern_vectorised_matches_slow_reference():
    B, K, V = 4, 6, 30
    drafts, q, p = _rows(B, K, V, seed=3, scale=1.0)
    cb = _codebook(V, seed=2)
    for crit in (Lantern(k=8, delta=0.15, codebook=cb), Lantern(k=8, lam=3.0, codebook=cb)):
        pt = crit.modified_target(drafts, p)
        for b in range(B):
            for i in range(K):
                x = int(drafts[b, i])
                bound = crit.delta if crit.lam is None else (crit.lam - 1) * float(p[b, i, x])
                ref = _lantern_reference(crit._table, x, p[b, i], bound)
                assert torch.allclose(pt[b, i], ref, atol=1e-12)
        a = crit.acceptance(drafts, q, p)
        px = pt.gather(-1, drafts[..., None]).squeeze(-1)
        assert torch.allclose(a, (px / q.gather(-1, drafts[..., None]).squeeze(-1)).clamp(max=1))
        p_x = p.gather(-1, drafts[..., None]).squeeze(-1)
        bound = crit.delta if crit.lam is None else (crit.lam - 1) * p_x
        assert (deviation(crit, drafts, p) <= bound + 1e-12).all()


def test_gsd_window_and_filters():
    p = torch.tensor([[0.1, 0.3, 0.05, 0.2, 0.15, 0.0, 0.2, 0.0]])
    # ranking (p desc, id asc): 1, 3, 6, 4, 0, 2, 5, 7
    crit = GSD(group_size=5, delta_p=1.0)  # 2 ranks above x, 2 below
    groups = crit.group(torch.tensor([3, 1, 5, 7]), p.expand(4, 8)).tolist()
    assert groups == [[3, 1, -1, 6, 4], [1, -1, -1, 3, 6], [5, 2, 0, 7, -1], [7, 5, 2, -1, -1]]
    assert GSD(group_size=4, delta_p=1.0).group(torch.tensor([4]), p).tolist() == [[4, 6, 0, 2]]  # 1 above, 2 below
    # probability filter: |p(y) - p(3)| < 0.07 keeps 6 (0.2) and 4 (0.15), drops 1 (0.3)
    assert GSD(group_size=5, delta_p=0.07).group(torch.tensor([3]), p).tolist() == [[3, -1, -1, 6, 4]]
    # embedding filter: 1-D embeddings, squared distance to token 3 (at 0.0) must be < 1.0
    emb = torch.tensor([[9.0], [0.5], [9.0], [0.0], [3.0], [9.0], [0.9], [9.0]])
    crit = GSD(group_size=5, delta_p=1.0, d_max=1.0, embeddings=emb)
    assert crit.group(torch.tensor([3]), p).tolist() == [[3, 1, -1, 6, -1]]
    a = crit.acceptance(torch.tensor([[3]]), None, p[:, None])
    assert torch.allclose(a, torch.tensor([[0.2 + 0.3 + 0.2]]))
    q = torch.tensor([[0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.05, 0.05]])
    a = crit.acceptance(torch.tensor([[3]]), q[:, None], p[:, None])
    assert torch.allclose(a, torch.tensor([[min(1.0, 0.7 / 0.55)]]))
    assert torch.equal(crit.residual(torch.tensor([3]), q, p), (p - q).clamp_min(0))
    # deterministic draft: emitted distribution puts min(1, p(group)) on x
    mt = modified_target(crit, torch.tensor([3]), p)
    assert torch.allclose(mt[0, 3], torch.tensor(0.7)) and torch.allclose(mt.sum(), torch.tensor(1.0))
    assert torch.allclose(deviation(crit, torch.tensor([3]), p), torch.tensor([0.5]))


def _gsd_reference_group(x, p, G, delta_p, d_max, emb):
    """Slow reference: full stable sort by (p desc, id asc)."""
    V = p.shape[-1]
    p32 = p.float()
    order = sorted(range(V), key=lambda t: (-float(p32[t]), t))
    r = order.index(x)
    window = order[max(0, r - (G - 1) // 2) : r + G // 2 + 1]
    return {
        y for y in window
        if y == x or (abs(float(p[y] - p[x])) < delta_p and float(((emb[y] - emb[x]) ** 2).sum()) < d_max)
    }


def test_gsd_vectorised_matches_slow_reference_and_chunking():
    B, K, V = 4, 5, 40
    drafts, q, p = _rows(B, K, V, seed=5, scale=1.0)
    emb = _codebook(V, D=2, seed=6)
    for G in (2, 3, 8, 15):
        crit = GSD(group_size=G, delta_p=0.05, d_max=2.0, embeddings=emb)
        groups = crit.group(drafts, p)
        a = crit.acceptance(drafts, q, p)
        for b in range(B):
            for i in range(K):
                x = int(drafts[b, i])
                ref = _gsd_reference_group(x, p[b, i], G, 0.05, 2.0, emb)
                got = {t for t in groups[b, i].tolist() if t >= 0}
                assert got == ref, (G, b, i)
                idx = torch.tensor(sorted(ref))
                assert torch.allclose(a[b, i], (p[b, i, idx].sum() / q[b, i, idx].sum()).clamp(max=1))
        tiny = GSD(group_size=G, delta_p=0.05, d_max=2.0, embeddings=emb, max_chunk_elements=3 * V)
        assert torch.equal(tiny.acceptance(drafts, q, p), a)
        assert torch.equal(tiny.acceptance(drafts, None, p), crit.acceptance(drafts, None, p))


# ---------------------------------------------------------------------------------------------------
# degenerate settings are exactly `exact`
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_settings_identical_to_exact(dtype):
    B, K, V = 8, 5, 48
    drafts, q, p = _rows(B, K, V, seed=7, dtype=dtype)
    exact = get("exact")
    cb = _codebook(40, seed=8)
    relaxed = [
        Lantern(k=16, delta=0.0, codebook=cb, image_token_offset=8),
        Lantern(k=16, lam=1.0, codebook=cb, image_token_offset=8),
        get("gsd", group_size=1, delta_p=0.5),
        get("gsd", group_size=9, delta_p=0.0),
    ]
    for crit in relaxed:
        for qq in (q, None):
            assert torch.equal(crit.acceptance(drafts, qq, p), exact.acceptance(drafts, qq, p)), crit
            q0 = None if qq is None else qq[:, 0]
            r = crit.residual(drafts[:, 0], q0, p[:, 0])
            assert torch.equal(r, exact.residual(drafts[:, 0], q0, p[:, 0])), crit


def test_text_tokens_are_verified_exactly_in_a_joint_vocabulary():
    B, K, V, off, N = 6, 4, 64, 20, 30
    drafts, q, p = _rows(B, K, V, seed=9, zeros=False, scale=0.5)
    drafts[:, :2] = torch.tensor([3, 60])  # text tokens below and above the image range
    cb = _codebook(N, seed=10)
    exact = get("exact")
    lan = get("lantern", k=10, delta=0.5).prepare(codebook=cb, image_token_offset=off, vocab_size=V)
    gsd = get("gsd", group_size=9, delta_p=1.0, d_max=math.inf)
    gsd.prepare(codebook=cb, image_token_offset=off, vocab_size=V)
    for crit in (lan, gsd):
        assert torch.equal(crit.acceptance(drafts, q, p)[:, :2], exact.acceptance(drafts, q, p)[:, :2])
        r = crit.residual(drafts[:, 0], q[:, 0], p[:, 0])
        assert torch.equal(r, exact.residual(drafts[:, 0], q[:, 0], p[:, 0]))
    groups = gsd.group(drafts, p)
    ids = groups[groups >= 0]
    img_drafts = (drafts >= off) & (drafts < off + N)
    assert (groups[~img_drafts][:, 1:] == -1).all()
    members = groups[img_drafts][:, 1:]
    assert ((members == -1) | ((members >= off) & (members < off + N))).all()
    assert ids.numel() > 0


# ---------------------------------------------------------------------------------------------------
# monotonicity
# ---------------------------------------------------------------------------------------------------
def test_acceptance_monotone_in_relaxation():
    B, K, V = 16, 6, 64
    drafts, q, p = _rows(B, K, V, seed=11, scale=1.0)
    cb = _codebook(V, seed=12)
    table = image_neighbours(cb, 32)
    rates = {}
    for qq, tag in ((q, "sampled"), (None, "deterministic")):
        prev = None
        for delta in (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 0.95):
            a = Lantern(k=32, delta=delta, neighbours=table).acceptance(drafts, qq, p)
            assert prev is None or (a >= prev).all()
            prev = a
            rates.setdefault(("lantern", tag), []).append(round(float(a.mean()), 3))
        prev = None
        for lam in (1.0, 1.2, 1.5, 2.0, 4.0, 10.0):
            a = Lantern(k=32, lam=lam, neighbours=table).acceptance(drafts, qq, p)
            assert prev is None or (a >= prev).all()
            prev = a
            rates.setdefault(("lantern++", tag), []).append(round(float(a.mean()), 3))
    # GSD: elementwise monotone for deterministic drafts (q(group) = 1) in G, delta_p and d_max. With
    # sampled drafts a bigger group also adds q mass, so only the mean rate is reported for them.
    for qq, tag in ((None, "deterministic"), (q, "sampled")):
        prev = None
        for G in (1, 2, 3, 5, 9, 17, 33, 64):
            a = GSD(group_size=G, delta_p=0.05, d_max=4.0, embeddings=cb).acceptance(drafts, qq, p)
            if qq is None:
                assert prev is None or (a >= prev).all()
            prev = a
            rates.setdefault(("gsd", tag), []).append(round(float(a.mean()), 3))
    prev = None
    for delta_p, d_max in ((0.0, 1.0), (0.01, 1.0), (0.05, 1.0), (0.05, 4.0), (0.2, 4.0), (1.0, math.inf)):
        a = GSD(group_size=9, delta_p=delta_p, d_max=d_max, embeddings=cb).acceptance(drafts, None, p)
        assert prev is None or (a >= prev).all()
        prev = a
    print("\nmean acceptance along the relaxation grids:", rates)
    assert rates[("lantern", "deterministic")][-1] > rates[("lantern", "deterministic")][0]
    assert rates[("gsd", "deterministic")][-1] > rates[("gsd", "deterministic")][0]


# ---------------------------------------------------------------------------------------------------
# Monte Carlo through the real core
# ---------------------------------------------------------------------------------------------------
def _emitted(crit, x, q, p, N, seed):
    """Emit the first token of N verify steps with K = 1; x [N], q [V] or None, p [V]."""
    V = p.shape[-1]
    target = p.expand(N, 2, V)
    draft_probs = None if q is None else q.expand(N, 1, V)
    res = mmspec.verify(x.view(N, 1), draft_probs, target, crit, torch.Generator().manual_seed(seed))
    return res.tokens[:, 0]


def test_monte_carlo_tv_bounded_by_delta_with_deterministic_drafts():
    """For each criterion, the drafts are the most likely token and the token with the largest predicted
    deviation (the most demanding case); 2 x N verify steps with K = 1 in one batched call."""
    V, N = 10, 40_000
    g = torch.Generator().manual_seed(13)
    cb = torch.randn(V, 2, generator=g, dtype=torch.float64)
    p = (torch.randn(V, generator=g, dtype=torch.float64) * 0.7).softmax(-1)
    tol = _tol(N, V)
    report, measured_all = [], []
    for seed, (name, crit, bound_of) in enumerate((
        ("lantern delta=0.1", Lantern(k=V - 1, delta=0.1, codebook=cb), lambda x: 0.1),
        ("lantern delta=0.25", Lantern(k=V - 1, delta=0.25, codebook=cb), lambda x: 0.25),
        ("lantern++ lam=2", Lantern(k=V - 1, lam=2.0, codebook=cb), lambda x: float(p[x])),
        ("gsd G=5", GSD(group_size=5, delta_p=0.1, d_max=2.0, embeddings=cb), None),
    )):
        dev = deviation(crit, torch.arange(V), p.expand(V, V)).index_fill(0, p.argmax(), -1.0)
        xs = [int(p.argmax()), int(dev.argmax())]
        drafts = torch.tensor(xs).repeat_interleave(N)
        emitted = _emitted(crit, drafts, None, p, 2 * N, seed=100 + seed).view(2, N)
        for x, tokens in zip(xs, emitted):
            counts = torch.bincount(tokens, minlength=V).double()
            emp = counts / N
            pt = modified_target(crit, torch.tensor([x]), p[None])[0]
            predicted = float(_tv(pt, p))
            measured = float(_tv(emp, p))
            measured_all.append(measured)
            report.append(f"{name} x={x}: TV measured {measured:.4f}, predicted {predicted:.4f}")
            # the emitted distribution is p~ (chi-square, alpha = 1e-4), zero where p~ is zero
            assert (counts[pt == 0] == 0).all()
            keep = pt > 0
            if keep.sum() > 1:
                assert chi2_pvalue(counts, pt) > 1e-4, report[-1]
            assert abs(measured - predicted) <= tol, report[-1]
            if bound_of is not None:
                assert predicted <= bound_of(x) + 1e-12, report[-1]
                assert measured <= bound_of(x) + tol, f"{report[-1]} > bound {bound_of(x)} + tol {tol:.4f}"
    print("\n" + "\n".join(report) + f"\n(Monte Carlo tolerance {tol:.4f} at alpha={ALPHA}, N={N} per draft)")
    assert max(measured_all) > 0.1  # the relaxation did act


def test_monte_carlo_tv_with_sampled_drafts_is_not_bounded_by_delta():
    """Sampled drafts: tokens 2 and 3 are mutual nearest neighbours and q puts all its mass on them; each
    steals the other's 0.1 of p, so the output moves 0.2 > delta = 0.1 (exactly 0.2, by enumeration)."""
    V, N, delta = 4, 60_000, 0.1
    cb = torch.tensor([[0.0], [1.0], [5.0], [6.0]], dtype=torch.float64)
    p = torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64)
    q = torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    crit = Lantern(k=1, delta=delta, codebook=cb)
    # exact output law by enumeration over the draft x ~ q
    xs = torch.arange(V)
    a = crit.acceptance(xs[:, None], q.expand(V, 1, V), p.expand(V, 1, V))[:, 0]
    w = crit.residual(xs, q.expand(V, V), p.expand(V, V))
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, p.expand(V, V))
    per_draft = a[:, None] * torch.eye(V, dtype=p.dtype) + (1 - a[:, None]) * w / w.sum(-1, keepdim=True)
    law = (q[:, None] * per_draft).sum(0)
    drafts = sample_from_weights(q.expand(N, V), torch.Generator().manual_seed(1))
    emp = torch.bincount(_emitted(crit, drafts, q, p, N, seed=2), minlength=V).double() / N
    tol = _tol(N, V)
    measured, exact_tv = float(_tv(emp, p)), float(_tv(law, p))
    msg = (f"sampled drafts, delta={delta}: TV measured {measured:.4f}, by enumeration {exact_tv:.4f}, "
           f"TV(p, q) {float(_tv(p, q)):.2f}")
    print("\n" + msg + f" (tol {tol:.4f})")
    assert abs(exact_tv - 0.2) < 1e-12, msg
    assert abs(measured - exact_tv) <= tol, msg
    assert measured > delta + tol, msg  # the deterministic-draft guarantee does not carry over

    # a generic random case: just measure and report
    g = torch.Generator().manual_seed(21)
    V, N = 12, 30_000
    cb = torch.randn(V, 2, generator=g, dtype=torch.float64)
    p = (torch.randn(V, generator=g, dtype=torch.float64) * 1.5).softmax(-1)
    q = (torch.randn(V, generator=g, dtype=torch.float64) * 1.5).softmax(-1)
    drafts = sample_from_weights(q.expand(N, V), torch.Generator().manual_seed(3))
    for crit in (Lantern(k=V - 1, delta=0.1, codebook=cb), GSD(group_size=5, delta_p=0.1, d_max=2.0, embeddings=cb)):
        emp = torch.bincount(_emitted(crit, drafts, q, p, N, seed=4), minlength=V).double() / N
        tv = float(_tv(emp, p))
        print(f"random sampled-draft case, {crit!r}: TV measured {tv:.4f} "
              f"(TV(p, q) = {float(_tv(p, q)):.3f}, tol {_tol(N, V):.4f})")
        assert 0.0 <= tv <= 1.0


# ---------------------------------------------------------------------------------------------------
# registry, prepare and errors
# ---------------------------------------------------------------------------------------------------
def test_registry_and_flags():
    assert {"lantern", "gsd"} <= set(mmspec.acceptance.available())
    lan = get("lantern", k=50, delta=0.2)
    gsd = get("gsd", group_size=14, delta_p=0.15, d_max=0.5)
    assert isinstance(lan, Lantern) and isinstance(gsd, GSD)
    for crit in (lan, gsd):
        assert crit.lossless is False
    assert gsd.requires_sampling is True and lan.requires_sampling is False  # greedy LANTERN exists
    assert lan.k == 50 and lan.delta == 0.2 and lan.lam is None
    assert get("lantern", lam=2.0).delta is None and Lantern().delta == 0.1
    assert "Lantern(" in repr(lan) and "GSD(" in repr(gsd)


@pytest.mark.parametrize(
    "name, params, word",
    [
        ("lantern", dict(delta=-0.1), "delta"),
        ("lantern", dict(k=0), "`k`"),
        ("lantern", dict(k=2.5), "`k`"),
        ("lantern", dict(lam=0.9), "lam"),
        ("lantern", dict(delta=0.1, lam=2.0), "either"),
        ("lantern", dict(delta=5.0), r"\[0, 1\).*lam=5.0"),  # the reference's lantern_delta > 1 is lambda
        ("lantern", dict(delta=1.0), "lam="),
        ("gsd", dict(group_size=0), "group_size"),
        ("gsd", dict(delta_p=-1.0), "delta_p"),
        ("gsd", dict(d_max=-1.0), "d_max"),
    ],
)
def test_bad_parameters_raise_value_error(name, params, word):
    with pytest.raises(ValueError, match=word):
        get(name, **params)


def test_prepare_builds_once_and_errors_before_tables():
    drafts, q, p = _rows(2, 3, 20, seed=17)
    lan = get("lantern", k=4, delta=0.1)
    with pytest.raises(RuntimeError, match="neighbour table"):
        lan.acceptance(drafts, q, p)
    cb = _codebook(20, seed=18)
    lan.prepare(codebook=cb, image_token_offset=0, vocab_size=20, unrelated="ignored")
    table = lan._table
    lan.prepare(codebook=torch.nn.Embedding.from_pretrained(cb.clone()), image_token_offset=0, vocab_size=20)
    lan.prepare(codebook=cb, image_token_offset=0, vocab_size=20)
    assert lan._table is not table  # another storage: rebuilt
    table = lan._table
    for _ in range(3):
        lan.prepare(codebook=cb, image_token_offset=0, vocab_size=20)
    assert lan._table is table  # same codebook: not rebuilt
    cb.mul_(1.0)
    lan.prepare(codebook=cb)
    assert lan._table is not table  # modified in place: rebuilt
    assert lan.acceptance(drafts, q, p).shape == (2, 3)
    with pytest.raises(ValueError, match="vocab"):
        get("lantern", k=4, delta=0.1).prepare(codebook=cb, image_token_offset=5, vocab_size=20)
    with pytest.raises(ValueError, match="itself"):
        Lantern(k=2, neighbours=torch.tensor([[0, 1], [0, 2], [0, 1]]))
    gsd = get("gsd", group_size=5, delta_p=0.5, d_max=1.0)
    with pytest.raises(RuntimeError, match="embeddings"):
        gsd.acceptance(drafts, q, p)
    gsd.prepare(embeddings=torch.nn.Embedding(20, 4), image_token_offset=0)
    assert gsd.acceptance(drafts, q, p).shape == (2, 3)
    # the full input-embedding matrix with the image range sliced by offset / num_image_tokens
    gsd2 = GSD(group_size=5, delta_p=0.5, d_max=1.0).prepare(embeddings=torch.randn(30, 4), image_token_offset=5,
                                                             num_image_tokens=20)
    assert gsd2._emb.shape == (20, 4)


# ---------------------------------------------------------------------------------------------------
# LANTERN defaults and greedy LANTERN
# ---------------------------------------------------------------------------------------------------
def test_lantern_default_k_per_form():
    assert Lantern().k == 1000 and Lantern(delta=0.2).k == 1000
    assert Lantern(lam=5.0).k == 10  # the reference runs LANTERN++ with k of 5-10
    assert Lantern(lam=5.0, k=7).k == 7


def _greedy_lantern_reference(table, offset, x, scores, bound_of):
    """Loop form of the reference code's greedy LANTERN for one position: raise p(x) by the largest neighbour
    prefix mass within the bound, accept iff x is then the argmax."""
    p = scores.double().softmax(-1)
    row = x - offset
    c = 0.0
    if 0 <= row < table.shape[0]:
        bound = bound_of(float(p[x]))
        for n in table[row].tolist():
            if n < 0 or c + float(p[n]) > bound:
                break
            c += float(p[n])
    boosted = p.clone()
    boosted[x] = p[x] + c
    return int(boosted.argmax()) == x


@pytest.mark.parametrize("form", ["delta", "lam"])
def test_greedy_lantern_matches_reference_and_decodes(form):
    B, K, V, off = 64, 4, 40, 8
    cb = _codebook(V - off, seed=21)
    crit = Lantern(k=6, codebook=cb, image_token_offset=off, **({"delta": 0.2} if form == "delta" else {"lam": 3.0}))
    bound_of = (lambda px: 0.2) if form == "delta" else (lambda px: 2.0 * px)
    g = torch.Generator().manual_seed(22)
    scores = torch.randn(B, K + 1, V, generator=g, dtype=torch.float64) * 1.5
    drafts = torch.randint(0, V, (B, K), generator=g)
    passed = crit.greedy_accept(drafts, scores[:, :K])
    for b in range(B):
        for i in range(K):
            assert bool(passed[b, i]) == _greedy_lantern_reference(crit._table, off, int(drafts[b, i]), scores[b, i],
                                                                   bound_of), (b, i)
    exact = drafts == scores[:, :K].argmax(-1)
    assert (passed >= exact).all() and (passed > exact).any()  # relaxes, never rejects an argmax draft
    res = mmspec.verify(drafts, None, scores, crit, greedy=True)
    n = passed.long().cumprod(-1).sum(-1)
    assert res.num_accepted.tolist() == n.tolist()
    assert res.next_token.tolist() == scores.argmax(-1).gather(1, n.unsqueeze(1)).squeeze(1).tolist()
    # delta = 0 / lam = 1: exact greedy
    none = Lantern(k=6, codebook=cb, image_token_offset=off, **({"delta": 0.0} if form == "delta" else {"lam": 1.0}))
    assert torch.equal(none.greedy_accept(drafts, scores[:, :K]), exact)


def test_greedy_lantern_through_generate():
    """do_sample=False with LANTERN runs (it used to raise) and accepts more than exact greedy Jacobi."""
    from lm_fixtures import tiny_causal_lm

    V = 48
    model = tiny_causal_lm(vocab_size=V, sharpen=1.5)
    cb = _codebook(V, seed=3)
    ids = torch.tensor([[5, 6, 7, 8]])
    kw = dict(max_new_tokens=24, method="jacobi", window=6, init="repeat", eos_token_id=[])
    exact = mmspec.generate(model, ids, **kw)
    relaxed = mmspec.generate(model, ids, acceptance=Lantern(k=8, delta=0.3, codebook=cb), **kw)
    assert relaxed.sequences.shape == exact.sequences.shape
    assert relaxed.stats.target_forwards <= exact.stats.target_forwards
    assert not torch.equal(relaxed.sequences, exact.sequences)  # lossy: some relaxed drafts were accepted


def test_gsd_keeps_the_users_embeddings_when_a_pipeline_prepares_it():
    """A pipeline calls prepare(codebook=..., image_token_offset=...): embeddings given by the user stay the space
    of d_max, sliced again at the pipeline's image-token offset (they are indexed by token id)."""
    V, off, N = 30, 6, 20
    emb = torch.randn(V, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cb = torch.randn(N, 3, dtype=torch.float64)
    gsd = GSD(group_size=5, delta_p=0.5, d_max=1.0, embeddings=emb)
    assert torch.equal(gsd._emb, emb)  # offset 0 until prepared
    gsd.prepare(codebook=cb, image_token_offset=off, vocab_size=V)
    assert torch.equal(gsd._emb, emb[off:]) and gsd.image_token_offset == off
    from_codebook = GSD(group_size=5, delta_p=0.5, d_max=1.0).prepare(codebook=cb, image_token_offset=off)
    assert torch.equal(from_codebook._emb, cb)  # no user embeddings: the pipeline's codebook is used
    gsd.prepare(embeddings=emb * 2, image_token_offset=off)  # explicit embeddings in prepare replace them
    assert torch.equal(gsd._emb, 2 * emb[off:])


def test_image_pipeline_uses_the_users_gsd_embeddings():
    from image_fixtures import tiny_pipeline

    pipe = tiny_pipeline()
    model = pipe.model
    emb = model.get_input_embeddings().weight.detach()
    gsd = GSD(group_size=14, delta_p=0.15, d_max=0.5, embeddings=emb)
    pipe("a red circle", do_sample=True, acceptance=gsd, generator=torch.Generator().manual_seed(0),
         output_type="pt")
    off = gsd.image_token_offset
    assert off > 0 and torch.equal(gsd._emb, emb[off:])
