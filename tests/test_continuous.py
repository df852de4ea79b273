"""Continuous tokens: the DDPM trajectory, the exact Gaussian criterion, the per-row cache and the loop.

Statistical tests use fixed seeds and a significance level of 0.001 per test (Bonferroni-corrected where a
test makes several comparisons); sample sizes are chosen so the tests are stable under those seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats as sps

from mmspec.acceptance.continuous import (
    ContinuousCriterion,
    gaussian_log_density,
    get_continuous,
    normal,
    verify_continuous,
)
from mmspec.continuous import decode_continuous
from mmspec.models.mar import ContinuousARModel, DDPMTrajectory, MARRunner

ALPHA = 1e-3


def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# trajectory vs diffusers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_trajectory_steps_match_diffusers(variance_type):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, variance_type=variance_type)
    traj = DDPMTrajectory(sched, num_inference_steps=6)
    ref = DDPMScheduler.from_config(sched.config)
    ref.set_timesteps(6)
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    for i, t in enumerate(traj.timesteps):
        eps = torch.randn(5, 3, dtype=torch.float64)
        expected = ref.step(eps, t, x, generator=_gen(i)).prev_sample
        noise = torch.randn(5, 3, generator=_gen(i), dtype=torch.float64)
        got = traj.step_mean(i, x, eps) + float(traj.sigmas[i]) * noise
        # diffusers keeps its schedule in float32: agreement to float32 precision
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        x = got
    assert traj.num_steps == 5 and traj.last_scale > 0


def test_trajectory_rejects_bad_arguments():
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="num_inference_steps"):
        DDPMTrajectory(DDPMScheduler(clip_sample=False), num_inference_steps=1)
    with pytest.raises(ValueError, match="temperature"):
        DDPMTrajectory(DDPMScheduler(clip_sample=False), temperature=0)
    with pytest.raises(ValueError, match="clipping"):
        DDPMTrajectory(DDPMScheduler(clip_sample=True))


# --------------------------------------------------------------------------------------------
# the criterion on closed-form heads
# --------------------------------------------------------------------------------------------


def test_log_density_matches_scipy():
    x, mu = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    expected = sps.norm.logpdf(x.numpy(), mu.numpy(), 0.7).sum(-1)
    torch.testing.assert_close(gaussian_log_density(x, mu, 0.7), torch.from_numpy(expected))
    with pytest.raises(ValueError, match="deterministic"):
        gaussian_log_density(x, mu, 0.0)


def _one_step(mu_q, mu_p, s_q, s_p, n, seed, criterion="continuous"):
    """K = 1 verification of n rows; returns (emitted first token [n, C], accepted [n])."""
    C = mu_q.shape[-1]
    g = _gen(seed)
    z = normal((n, 1, C), g)
    mq = mu_q.expand(n, 1, C).double()
    mp = torch.cat([mu_p.expand(n, 1, C), torch.zeros(n, 1, C)], 1).double()
    x = mq + s_q * z
    res = verify_continuous(x, z, mq, s_q, mp, s_p, normal((n, 2, C), g), criterion, g)
    return res.tokens[:, 0], res.num_accepted == 1


@pytest.mark.parametrize("delta", [0.4, 1.5])
def test_reflection_residual_1d_is_exact_and_acceptance_is_one_minus_tv(delta):
    n, s = 40000, 0.8
    out, acc = _one_step(torch.tensor([delta * s]), torch.tensor([0.0]), s, s, n, seed=1)
    assert sps.kstest(out[:, 0].numpy(), "norm", args=(0.0, s)).pvalue > ALPHA
    expected = 2 * _phi(-delta / 2)  # 1 - TV(N(delta s, s^2), N(0, s^2))
    se = math.sqrt(expected * (1 - expected) / n)
    assert abs(acc.double().mean().item() - expected) < 4 * se
    assert abs(out.mean().item()) < 4 * s / math.sqrt(n) and abs(out.std().item() - s) < 0.02


def test_reflection_residual_2d_moments_and_projections():
    n, s = 40000, 0.5
    mu_q, mu_p = torch.tensor([0.3, -0.4]), torch.tensor([-0.2, 0.1])
    out, acc = _one_step(mu_q, mu_p, s, s, n, seed=2)
    torch.testing.assert_close(out.mean(0), mu_p.double(), atol=4 * s / math.sqrt(n), rtol=0)
    torch.testing.assert_close(torch.cov(out.T), torch.eye(2, dtype=torch.float64) * s * s, atol=0.01, rtol=0)
    dirs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]], dtype=torch.float64)
    for d in dirs:  # Cramer-Wold: every projection of N(mu_p, s^2 I) is N(d.mu_p, s^2)
        pv = sps.kstest((out @ d).numpy(), "norm", args=(float(d @ mu_p.double()), s)).pvalue
        assert pv > ALPHA / len(dirs)
    expected = 2 * _phi(-float((mu_q - mu_p).norm()) / (2 * s))
    assert abs(acc.double().mean().item() - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_unequal_scales_use_rejection_sampling_and_stay_exact():
    n = 30000
    out, acc = _one_step(torch.tensor([0.5]), torch.tensor([0.0]), 0.6, 1.0, n, seed=3,
                         criterion=ContinuousCriterion(max_tries=64))
    assert sps.kstest(out[:, 0].numpy(), "norm", args=(0.0, 1.0)).pvalue > ALPHA
    x = torch.linspace(-8, 8, 40001, dtype=torch.float64)
    p = torch.exp(gaussian_log_density(x[:, None], torch.zeros(1, 1), 1.0))
    q = torch.exp(gaussian_log_density(x[:, None], torch.full((1, 1), 0.5), 0.6))
    expected = float(torch.minimum(p, q).sum() * (x[1] - x[0]))  # 1 - TV
    assert abs(acc.double().mean().item() - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_rejection_sampler_falls_back_to_a_plain_draw_never_zero():
    # with one try the fallback is used often; the output must still be draws from p, never zero vectors
    out, _ = _one_step(torch.tensor([0.0, 0.0]), torch.tensor([3.0, 3.0]), 0.1, 0.1001, 2000, seed=4,
                       criterion=ContinuousCriterion(max_tries=1))
    assert bool((out.norm(dim=-1) > 1.0).all())


def test_mixture_target_through_shared_trajectory_noise():
    """A head whose token given the trajectory is N(m sign(x_T), s^2): the target's marginal is a two-component
    mixture, the draft's chain differs, and the verified output must follow the mixture exactly."""
    n, s, m = 40000, 0.4, 1.0
    g = _gen(5)
    noise = normal((n, 2, 2, 1), g)  # [rows, K+1 positions, (x_T, last-step noise), C]
    x_T, last = noise[:, :, 0], noise[:, :, -1]
    mu_p = m * torch.sign(x_T)
    mu_q = 0.8 * m * torch.sign(x_T[:, :1] + 0.5) + 0.3
    drafts = mu_q + s * last[:, :1]
    res = verify_continuous(drafts, last[:, :1], mu_q, s, mu_p, s, last, "continuous", g)
    out = res.tokens[:, 0, 0].numpy()

    def mixture_cdf(x):
        return 0.5 * sps.norm.cdf(x, m, s) + 0.5 * sps.norm.cdf(x, -m, s)

    assert sps.kstest(out, mixture_cdf).pvalue > ALPHA
    # acceptance = E_E[1 - TV(q_E, p_E)]
    gap = (mu_q[:, 0, 0] - mu_p[:, 0, 0]).abs() / s
    expected = float((2 * torch.distributions.Normal(0.0, 1.0).cdf(-gap / 2)).mean())
    rate = res.num_accepted.double().mean().item()
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_verify_truncates_after_first_rejection_and_respects_num_drafts():
    B, K, C = 3, 4, 2
    g = _gen(6)
    z = normal((B, K, C), g)
    mu_q = torch.zeros(B, K, C, dtype=torch.float64)
    mu_p = torch.zeros(B, K + 1, C, dtype=torch.float64)
    mu_p[1, 1] = 50.0  # row 1 must reject its second draft
    res = verify_continuous(mu_q + 0.5 * z, z, mu_q, 0.5, mu_p, 0.5, normal((B, K + 1, C), g), "continuous", g,
                            num_drafts=torch.tensor([4, 4, 2]))
    assert res.num_accepted.tolist() == [4, 1, 2]
    torch.testing.assert_close(res.tokens[0, :4], mu_q[0] + 0.5 * z[0])
    assert float(res.tokens[1, 1].norm()) > 20  # the correction comes from p at the rejected position
    assert float(res.tokens[1, 2:].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="target_mean"):
        verify_continuous(mu_q, z, mu_q, 0.5, mu_p[:, :K], 0.5, mu_p, "continuous", g)
    with pytest.raises(ValueError, match="continuous"):
        get_continuous("exact")


# --------------------------------------------------------------------------------------------
# the model adapter and the loop
# --------------------------------------------------------------------------------------------


def tiny_mar(seed, hidden=32, head_std=0.1, grid=2, token_dim=2):
    torch.manual_seed(seed)
    m = ContinuousARModel(token_dim=token_dim, grid_size=grid, num_classes=3, hidden_size=hidden, num_layers=2,
                          num_heads=2, head_width=32, head_depth=2).eval()
    for p in m.head.parameters():  # the head is zero-initialised (adaLN-zero); make it say something
        torch.nn.init.normal_(p, std=head_std)
    return m


def perturbed(model, seed, std):
    """A copy of ``model`` with every weight moved by N(0, std^2): a draft close to the target."""
    import copy

    d = copy.deepcopy(model)
    g = _gen(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return d


def test_runner_ragged_cache_matches_teacher_forcing():
    model = tiny_mar(0, grid=3)
    B, N, C = 3, 9, 2
    labels = torch.tensor([0, 2, 1])
    seq = torch.randn(B, N, C)
    runner = MARRunner(model, guidance_scale=2.0)
    z_ref_c = model.conditions(labels, seq)
    z_ref_u = model.conditions(torch.full_like(labels, model.null_class), seq)
    z0 = runner.prefill(labels)
    torch.testing.assert_close(z0[:, 0], z_ref_c[:, 0])
    torch.testing.assert_close(z0[:, 1], z_ref_u[:, 0])
    fed = torch.zeros(B, dtype=torch.long)
    g = _gen(0)
    while bool((fed < N - 1).any()):
        L = 3
        runner.checkpoint()
        idx = (fed.view(B, 1) + torch.arange(L)).clamp(max=N - 1)
        block = seq.gather(1, idx.unsqueeze(-1).expand(B, L, C))
        block = torch.where((idx == fed.view(B, 1) + torch.arange(L)).unsqueeze(-1), block, torch.randn_like(block))
        n_valid = torch.minimum(torch.full((B,), L), N - 1 - fed)
        valid = torch.arange(L) < n_valid.view(B, 1)
        garbage = torch.randn(B, L, C)  # rejected tokens: a valid prefix is kept, the rest replaced by junk
        keep = torch.minimum(torch.randint(1, L + 1, (B,), generator=g), n_valid)
        mixed = torch.where((torch.arange(L) < keep.view(B, 1)).unsqueeze(-1), block, garbage)
        z = runner.forward(mixed, valid)
        for b in range(B):
            for j in range(int(keep[b])):
                torch.testing.assert_close(z[b, j, 0], z_ref_c[b, fed[b] + 1 + j], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(z[b, j, 1], z_ref_u[b, fed[b] + 1 + j], atol=1e-5, rtol=1e-4)
        runner.rollback(keep)
        fed += keep


def _decode(model, draft, n, seed, window=3, steps=4, draft_steps=None, align=True, guidance=2.0):
    traj = DDPMTrajectory(model.scheduler(), steps)
    dtraj = DDPMTrajectory(model.scheduler(), draft_steps) if draft_steps else None
    labels = torch.arange(n) % 3
    return decode_continuous(MARRunner(model, guidance), labels, trajectory=traj,
                             draft=None if draft is None else MARRunner(draft, guidance), draft_trajectory=dtraj,
                             window=window, generator=_gen(seed), align=align)


def test_draft_equal_to_target_accepts_everything():
    model = tiny_mar(1, grid=3)
    tokens, stats, info = _decode(model, model, 8, seed=0, window=4)
    assert info["acceptance_rate"] == 1.0
    assert stats.target_forwards == 1 + math.ceil((9 - 1) / 4)
    assert stats.step_compression == pytest.approx(9 / stats.target_forwards)
    assert tokens.shape == (8, 9, 2) and bool(torch.isfinite(tokens).all())


def test_shared_trajectory_noise_raises_acceptance():
    target = tiny_mar(2)
    draft = perturbed(target, 7, 0.01)
    _, _, aligned = _decode(target, draft, 300, seed=1, window=4)
    _, _, independent = _decode(target, draft, 300, seed=1, window=4, align=False)
    assert aligned["acceptance_rate"] > independent["acceptance_rate"] + 0.2, (aligned, independent)


@pytest.mark.slow
@pytest.mark.parametrize("draft_steps", [None, 3])
def test_speculative_output_follows_the_target(draft_steps):
    """Two-sample KS per token and channel between plain AR and speculative decoding (different random draft;
    equal last-step scales use the reflection residual, a different step count the rejection sampler)."""
    target = tiny_mar(3)
    draft = perturbed(target, 8, 0.02)
    n = 3000
    ar, ar_stats, _ = _decode(target, None, n, seed=10)
    spec, spec_stats, info = _decode(target, draft, n, seed=11, draft_steps=draft_steps)
    assert ar_stats.step_compression == 1.0
    assert 0.01 < info["acceptance_rate"] < 0.98  # both branches are exercised
    assert len(set(spec_stats.accepted_histogram)) > 1
    labels = torch.arange(n) % 3
    comparisons = [(c, i, k) for c in range(3) for i in range(4) for k in range(2)]
    for c, i, k in comparisons:
        a, s = ar[labels == c, i, k].numpy(), spec[labels == c, i, k].numpy()
        assert sps.ks_2samp(a, s).pvalue > ALPHA / len(comparisons), (c, i, k)


def test_loop_rejects_bad_arguments():
    model = tiny_mar(4)
    traj = DDPMTrajectory(model.scheduler(), 3)
    with pytest.raises(ValueError, match="window"):
        decode_continuous(MARRunner(model), torch.tensor([0]), trajectory=traj, window=0)
    with pytest.raises(TypeError, match="MARRunner"):
        decode_continuous(model, torch.tensor([0]), trajectory=traj)
    other = tiny_mar(4, token_dim=3)
    with pytest.raises(ValueError, match="channels"):
        decode_continuous(MARRunner(model), torch.tensor([0]), trajectory=traj, draft=MARRunner(other))
    with pytest.raises(ValueError, match="guidance_scale"):
        MARRunner(model, guidance_scale=-1)
