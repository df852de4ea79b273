"""The fused kernels compute LANTERN's and GSD's acceptance and residual as the criteria's torch code does.

The acceptance probability is checked directly: every row is verified twice, once with ``u`` just below the
torch criterion's ratio ``a`` (relative 1e-5) and once just above, so the kernel accepts exactly the rows with
``a > 0`` and then exactly those with ``a == 1``; the emitted tokens (residual draws with the same ``E``) must
equal the torch reference's. Kernels run in Triton's CPU interpreter (tiny sizes; ids 0..4 are "text" tokens
without neighbours, 5..26 image tokens).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: the kernels run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from mmspec import acceptance  # noqa: E402
from mmspec.kernels import (  # noqa: E402
    draw_noise,
    make_request,
    reference,  # noqa: E402
    verify_from_logits,
)
from mmspec.sampling import LogitsPipeline, sample_from_weights  # noqa: E402

triton_verify = pytest.importorskip("mmspec.kernels.triton_verify")

V, OFF = 27, 5
CODEBOOK = torch.randn(V - OFF, 3, generator=torch.Generator().manual_seed(0))


def _criterion(name):
    if name == "lantern-delta":
        return acceptance.Lantern(k=6, delta=0.15, codebook=CODEBOOK, image_token_offset=OFF)
    if name == "lantern-lam":
        return acceptance.Lantern(k=5, lam=4.0, codebook=CODEBOOK, image_token_offset=OFF)
    if name == "gsd":  # no embeddings: every token can group
        return acceptance.GSD(group_size=6, delta_p=0.04)
    return acceptance.GSD(group_size=7, delta_p=0.06, d_max=4.0, codebook=CODEBOOK, image_token_offset=OFF)


def _case(B, K, seed, deterministic):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K + 1, V, generator=g) * 1.2
    q = LogitsPipeline(do_sample=True).probs(logits[:, :K] + 0.8 * torch.randn(B, K, V, generator=g))
    drafts = sample_from_weights(q, g)
    u, E = draw_noise(B, K, V, g)
    return drafts, (None if deterministic else q), logits, u, E


@pytest.mark.parametrize("name, deterministic", [
    ("lantern-delta", False), ("lantern-lam", True), ("gsd", False), ("gsd-embeddings", True),
])
def test_acceptance_and_residual_match_the_criterion(name, deterministic):
    crit = _criterion(name)
    B = 8
    drafts, q, logits, _, E = _case(B, 1, seed=1, deterministic=deterministic)
    if deterministic:  # the most likely token: a deterministic draft with real acceptance chances
        drafts = logits[:, :1].argmax(-1)
    drafts[0, 0] = 2  # a text token: no neighbours, verified exactly
    p = LogitsPipeline(do_sample=True).probs(logits)
    a = crit.acceptance(drafts, q, p[:, :1]).double()  # [B, 1]
    a_exact = acceptance.get("exact").acceptance(drafts, q, p[:, :1]).double()
    assert (a > a_exact + 1e-3).any() and (a < 1).any()  # the relaxation matters on these rows
    if name != "gsd":  # with a table or embeddings only image tokens group
        assert torch.equal(a[0], a_exact[0])

    below = torch.where(a > 0, a * (1 - 1e-5), 1.0)
    above = torch.where(a < 1, a * (1 + 1e-5), 1.0).clamp(min=1e-300, max=1.0)
    two = lambda t: torch.cat([t, t])  # noqa: E731
    request = make_request(two(drafts), None if q is None else two(q), two(logits), u=torch.cat([below, above]),
                           E=two(E), criterion=crit)
    ker = triton_verify.run(request, block_v=32 if name == "gsd" else 16)  # 16: GSD's window crosses tiles
    ref = reference.run(request)
    assert torch.equal(ker.num_accepted, torch.cat([a[:, 0] > 0, a[:, 0] == 1]).long())
    assert torch.equal(ker.tokens, ref.tokens)  # residual draws (LANTERN's p~ - q) and bonus draws
    assert ((ker.next_token >= 0) & (ker.next_token < V)).all()


def test_lantern_windows_filters_and_neighbour_tiles():
    """K = 3 with temperature, guidance and a neighbour tile of 2 (the prefix scan crosses tiles)."""
    crit = _criterion("lantern-delta")
    drafts, q, logits, u, E = _case(3, 3, seed=2, deterministic=False)
    uncond = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    request = make_request(drafts, q, logits, u=u, E=E, criterion=crit, temperature=0.8,
                           guidance_scale=1.5, uncond_logits=uncond, return_probs=True)
    ref = reference.run(request)
    ker = triton_verify.run(request, block_v=16, block_w=2)
    assert torch.equal(ker.tokens, ref.tokens)
    torch.testing.assert_close(ker.target_probs, ref.target_probs, rtol=1e-5, atol=1e-6)
    exact = reference.run(request._replace(criterion=acceptance.get("exact")))
    assert ref.num_accepted.sum() > exact.num_accepted.sum()


def test_relaxed_equivalences_run_the_exact_kernel():
    """delta = 0 and group_size = 1 are exact; their kernels give exact's tokens."""
    drafts, q, logits, u, E = _case(3, 2, seed=4, deterministic=False)
    kw = dict(u=u, E=E)
    exact = triton_verify.run(make_request(drafts, q, logits, **kw))
    for crit in (acceptance.Lantern(k=4, delta=0.0, codebook=CODEBOOK, image_token_offset=OFF),
                 acceptance.GSD(group_size=1)):
        out = triton_verify.run(make_request(drafts, q, logits, criterion=crit, **kw))
        assert torch.equal(out.tokens, exact.tokens)


def test_unfusable_and_unprepared_criteria(monkeypatch):
    drafts, q, logits, u, E = _case(2, 2, seed=5, deterministic=False)
    typical = acceptance.get("typical")
    with pytest.raises(ValueError, match="do not compute"):
        verify_from_logits(drafts, q, logits, u=u, E=E, criterion=typical, backend="triton")
    monkeypatch.setenv("MMSPEC_KERNELS", "triton")  # forced, but typical falls back to the reference
    out = verify_from_logits(drafts, q, logits, u=u, E=E, criterion=typical)
    assert torch.equal(out.tokens, reference.run(make_request(drafts, q, logits, u=u, E=E, criterion=typical)).tokens)
    with pytest.raises(RuntimeError, match="neighbour table"):
        make_request(drafts, q, logits, u=u, E=E, criterion="lantern")
    with pytest.raises(RuntimeError, match="embeddings"):
        make_request(drafts, q, logits, u=u, E=E, criterion=acceptance.GSD(d_max=1.0))
