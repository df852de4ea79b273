"""Exact speculative acceptance for continuous tokens from a diffusion head (docs/algorithms.md section 5).

Why the output is exactly the target's distribution
---------------------------------------------------
A token is made by a DDPM trajectory (``mmspec.models.mar.DDPMTrajectory``): ``x_T``, then steps
``x_prev = m(x_t) + sigma_i n_i``, the last step ending at timestep 0 with noise: token
``x = mu + s n_last``. Split the token's randomness into ``E = (x_T, n_1 .. n_{last-1})`` and ``n_last``.
Given the prefix and ``E``, the target's trajectory up to its last step is a deterministic function of ``E``,
so its token is exactly Gaussian, ``p_E = N(mu_p(E), s_p^2 I)``; the draft's likewise, ``q_E = N(mu_q(E),
s_q^2 I)``. *Trajectory alignment* draws ``E`` once per token and gives the same ``E`` to both models: the
draft runs its chain from it and proposes ``x = mu_q(E) + s_q n_last``, the target runs its own chain from the
same ``E`` (never from the draft's intermediate states) to get ``mu_p(E)``.

Conditionally on ``E``, this is ordinary speculative sampling between two densities: accept with probability
``min(1, p_E(x) / q_E(x))``, else emit a draw from the residual ``max(p_E - q_E, 0)`` (normalised). Its output is
distributed as ``p_E`` exactly. ``E`` itself is a fresh standard-normal draw whose law does not depend on the
draft, so integrating over ``E`` gives ``int p_E dP(E)``, which is the target's own token distribution: the
target's sampler draws the same ``E`` and the same last-step Gaussian. Sharing ``E`` only correlates the two
chains so that ``mu_q(E)`` lands near ``mu_p(E)`` when the models agree; it cannot bias the output. Positions
are verified left to right and everything after the first rejection is discarded (truncation), because the
later drafts and target conditions were computed from a prefix that no longer holds. Noise of discarded
positions is not reused: each step draws fresh noise.

The densities are evaluated in float64 as a log-density difference. The residual:

* equal scales (``s_p == s_q == s``): the reflection coupling. With ``e = (mu_q - mu_p) / |mu_q - mu_p|`` and
  the draft's last-step noise ``n`` (``x = mu_q + s n``), emit ``mu_p + s (I - 2 e e^T) n``. Substituting
  ``n = R w`` (``R`` the reflection, an isometry and an involution with ``R (mu_q - mu_p) = -(mu_q - mu_p)``)
  shows that, jointly with the rejection event, this has density ``p(y) - min(p(y), q(y))``: exactly the
  residual, with no extra network call and no extra randomness. ``P(accept) = 2 Phi(-|mu_q - mu_p| / 2s) =
  1 - TV(p, q)``.
* different scales: rejection sampling, ``y ~ p`` kept with probability ``max(0, 1 - q(y)/p(y))``, up to
  ``max_tries`` candidates; if none is kept, a plain fresh draw from ``p`` (total-variation error at most
  ``(1 - TV)^max_tries`` on that branch), never a zero vector.

The criterion is registered as ``"continuous"`` (``mmspec.acceptance.get("continuous")``), with
``kind = "continuous"``: its rows are Gaussian means and scales, not probability vectors over a vocabulary, so
``mmspec.verify`` and token decodes refuse it, and decodes of continuous tokens (``mmspec.continuous``) accept only
it. ``verify_continuous`` is its vectorised verification step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..sampling import Generator, _draw, uniform
from .base import Criterion, get, register

__all__ = ["ContinuousCriterion", "ContinuousVerifyResult", "gaussian_log_density", "normal", "verify_continuous",
           "get_continuous"]

_LOG_2PI = math.log(2 * math.pi)


def normal(shape, generator: Generator = None, device=None) -> torch.Tensor:
    """Standard-normal draws in float64 from ``generator`` (one generator, or one per leading row)."""
    return _draw(shape, generator, device, lambda t, g: t.normal_(0.0, 1.0, generator=g))


def _scale(s, like: torch.Tensor) -> torch.Tensor:
    """A positive scale (float or tensor broadcastable to ``like[..., 0]``) as float64 [...]."""
    s = torch.as_tensor(s, dtype=torch.float64, device=like.device)
    if bool((s <= 0).any()):
        raise ValueError("Gaussian scales must be > 0; a draft with a deterministic last step has no density "
                         "(use a sampler whose last step adds noise).")
    return s.expand(like.shape[:-1])


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, scale) -> torch.Tensor:
    """log N(x; mean, scale^2 I) in float64: x, mean [..., C], scale float or [...] -> [...]."""
    x, mean = x.to(torch.float64), mean.to(torch.float64)
    s = _scale(scale, x)
    C = x.shape[-1]
    return -0.5 * (((x - mean) / s.unsqueeze(-1)) ** 2).sum(-1) - C * s.log() - 0.5 * C * _LOG_2PI


@dataclass
class ContinuousVerifyResult:
    """Outcome of one continuous verification step.

    Attributes:
        num_accepted: LongTensor [B], accepted drafts per row.
        tokens: [B, K+1, C] float64: the accepted drafts, then the correction (or bonus) token, then zeros
            (only the first ``num_accepted + 1`` rows of each row are meaningful).
        next_token: [B, C] float64, the correction or bonus token.
        accepted: BoolTensor [B, K], True on the accepted prefix.
        acceptance: [B, K] float64, the acceptance probabilities ``min(1, p(x)/q(x))``.
    """

    num_accepted: torch.Tensor
    tokens: torch.Tensor
    next_token: torch.Tensor
    accepted: torch.Tensor
    acceptance: torch.Tensor


@register("continuous")
class ContinuousCriterion(Criterion):
    """Exact acceptance of Gaussian last steps (see the module docstring).

    Its ``acceptance`` and ``residual`` take Gaussian means and scales where token criteria take probability
    rows (``kind = "continuous"``).

    Args:
        max_tries: candidates of the rejection sampler used when the scales differ (>= 1).
    """

    lossless = True
    requires_sampling = True
    kind = "continuous"

    def __init__(self, max_tries: int = 32):
        if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
            raise ValueError(f"`max_tries` must be an int >= 1, got {max_tries!r}.")
        self.max_tries = max_tries

    def __repr__(self) -> str:
        return f"ContinuousCriterion(max_tries={self.max_tries})"

    def acceptance(self, draft_tokens, draft_mean, draft_scale, target_mean, target_scale) -> torch.Tensor:
        """``min(1, p(x)/q(x))`` [..] in float64 for drafts x [.., C] with q = N(draft_mean, draft_scale^2),
        p = N(target_mean, target_scale^2)."""
        log_ratio = gaussian_log_density(draft_tokens, target_mean, target_scale) - gaussian_log_density(
            draft_tokens, draft_mean, draft_scale)
        return log_ratio.clamp(max=0.0).exp()

    def residual(self, draft_noise, draft_mean, draft_scale, target_mean, target_scale, generator: Generator = None):
        """A draw [B, C] (float64) from ``normalize(max(p - q, 0))`` for rows where the draft was rejected.

        ``draft_noise`` [B, C] is the noise of the draft's last step (the draft was ``draft_mean + s_q n``); the
        reflection coupling reuses it when the scales are equal. Every random draw of the other branch comes
        from ``generator``.
        """
        n = draft_noise.to(torch.float64)
        mu_q, mu_p = draft_mean.to(torch.float64), target_mean.to(torch.float64)
        s_q, s_p = _scale(draft_scale, n), _scale(target_scale, n)
        B, C = n.shape
        out = torch.empty_like(n)
        same = s_q == s_p
        if bool(same.any()):
            delta = mu_q - mu_p
            norm = delta.norm(dim=-1, keepdim=True)
            e = torch.where(norm > 0, delta / norm.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(delta))
            reflected = n - 2 * e * (e * n).sum(-1, keepdim=True)
            out = torch.where(same.unsqueeze(-1), mu_p + s_p.unsqueeze(-1) * reflected, out)
        if not bool(same.all()):
            T = self.max_tries
            cand = mu_p.unsqueeze(1) + s_p.view(B, 1, 1) * normal((B, T + 1, C), generator, n.device)
            log_p = gaussian_log_density(cand, mu_p.unsqueeze(1), s_p.unsqueeze(1))
            log_q = gaussian_log_density(cand, mu_q.unsqueeze(1), s_q.unsqueeze(1))
            keep_prob = 1.0 - (log_q - log_p).clamp(max=0.0).exp()  # max(0, 1 - q/p)
            keep = uniform((B, T + 1), generator, n.device) <= keep_prob
            keep[:, T] = True  # the fallback: a plain draw from p
            first = keep.long().argmax(-1)
            chosen = cand.gather(1, first.view(B, 1, 1).expand(B, 1, C)).squeeze(1)
            out = torch.where(same.unsqueeze(-1), out, chosen)
        return out


def get_continuous(criterion="continuous", **params) -> ContinuousCriterion:
    """A continuous criterion from its name (``"continuous"``) or passed through as an object:
    ``mmspec.acceptance.get(criterion, kind="continuous", **params)``."""
    return get(criterion, kind="continuous", **params)


def verify_continuous(
    draft_tokens: torch.Tensor,
    draft_noise: torch.Tensor,
    draft_mean: torch.Tensor,
    draft_scale,
    target_mean: torch.Tensor,
    target_scale,
    bonus_noise: torch.Tensor,
    criterion="continuous",
    generator: Generator = None,
    num_drafts: torch.Tensor | None = None,
) -> ContinuousVerifyResult:
    """Verify K continuous drafts per row against the target in one vectorised step.

    Args:
        draft_tokens: [B, K, C], the drafts ``x_i = draft_mean_i + s_q draft_noise_i``.
        draft_noise: [B, K, C], their last-step noise.
        draft_mean: [B, K, C], ``mu_q`` of each draft's last step (given the shared trajectory noise).
        draft_scale, target_scale: the last-step scales ``s_q``, ``s_p`` (floats or [B, K+1]-broadcastable).
        target_mean: [B, K+1, C], ``mu_p`` at each draft position and at the bonus position K+1, from the target's
            own chains started from the same trajectory noise.
        bonus_noise: [B, K+1, C] last-step noise per position; a row emits ``target_mean_n + s_p bonus_noise_n``
            when it accepted all its drafts (n = its draft count): a plain draw from the target.
        num_drafts: LongTensor [B] (on the drafts' device), drafts that are real in each row (default K); the
            rest are never accepted and the row's bonus comes right after its real drafts.
        generator: one ``torch.Generator`` or one per row; every random draw comes from it.

    Returns:
        ``ContinuousVerifyResult`` (tokens in float64).
    """
    if draft_tokens.dim() != 3:
        raise ValueError(f"`draft_tokens` must be [B, K, C], got shape {tuple(draft_tokens.shape)}.")
    B, K, C = draft_tokens.shape
    for name, t, shape in (("draft_noise", draft_noise, (B, K, C)), ("draft_mean", draft_mean, (B, K, C)),
                           ("target_mean", target_mean, (B, K + 1, C)), ("bonus_noise", bonus_noise, (B, K + 1, C))):
        if tuple(t.shape) != shape:
            raise ValueError(f"`{name}` must have shape {shape}, got {tuple(t.shape)}.")
    crit = get_continuous(criterion)
    dev = draft_tokens.device
    if num_drafts is None:
        num_drafts = torch.full((B,), K, dtype=torch.long, device=dev)
    s_p_all = _scale(target_scale, target_mean)  # [B, K+1]
    if K:
        ratio = crit.acceptance(draft_tokens, draft_mean, draft_scale, target_mean[:, :K], s_p_all[:, :K])
        real = torch.arange(K, device=dev) < num_drafts.unsqueeze(1)
        ratio = torch.where(real, ratio, torch.zeros_like(ratio))
    else:
        ratio = draft_tokens.new_zeros((B, 0), dtype=torch.float64)
    u = uniform((B, K), generator, dev)
    accepted = (u <= ratio).long().cumprod(-1).bool()
    num_accepted = accepted.sum(-1)

    idx = num_accepted.view(B, 1, 1).expand(B, 1, C)
    mu_p_n = target_mean.to(torch.float64).gather(1, idx).squeeze(1)
    s_p_n = s_p_all.gather(1, num_accepted.view(B, 1)).squeeze(1)
    next_token = mu_p_n + s_p_n.unsqueeze(-1) * bonus_noise.to(torch.float64).gather(1, idx).squeeze(1)
    if K:
        at = num_accepted.clamp(max=K - 1).view(B, 1, 1).expand(B, 1, C)
        rejected = num_accepted < num_drafts
        s_q_n = _scale(draft_scale, draft_mean).gather(1, num_accepted.clamp(max=K - 1).view(B, 1)).squeeze(1)
        res = crit.residual(draft_noise.gather(1, at).squeeze(1), draft_mean.gather(1, at).squeeze(1), s_q_n,
                            mu_p_n, s_p_n, generator)
        next_token = torch.where(rejected.unsqueeze(-1), res, next_token)

    pos = torch.arange(K + 1, device=dev).view(1, K + 1, 1)
    n = num_accepted.view(B, 1, 1)
    padded = torch.cat([draft_tokens.to(torch.float64), draft_tokens.new_zeros((B, 1, C), dtype=torch.float64)], 1)
    tokens = torch.where(pos < n, padded, torch.zeros_like(padded))
    tokens = torch.where(pos == n, next_token.unsqueeze(1).expand_as(padded), tokens)
    return ContinuousVerifyResult(num_accepted, tokens, next_token, accepted, ratio)
