"""The shared verification core: one vectorised accept/reject step for a batch of draft windows.

Every method in mmspec (Jacobi, draft model, prompt lookup, plain AR with an empty window) ends each step
here. The step is plain tensor code over [B, K]: no Python loop over positions, no host sync, every random
draw from the caller's generator(s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import acceptance as _acceptance
from .sampling import Generator, sample_from_weights, uniform

__all__ = ["verify", "VerifyResult", "speculative_redraw"]


@dataclass
class VerifyResult:
    """Outcome of one verification step.

    Attributes:
        num_accepted: LongTensor [B], accepted drafts per row (0..K).
        tokens: LongTensor [B, K+1]: the accepted drafts, then the correction (or bonus) token, then -1.
        next_token: LongTensor [B], the correction token at a rejection, or the bonus token when all K
            drafts were accepted; it equals ``tokens[b, num_accepted[b]]``.
        accepted: BoolTensor [B, K], True on the accepted prefix.
    """

    num_accepted: torch.Tensor
    tokens: torch.Tensor
    next_token: torch.Tensor
    accepted: torch.Tensor

    @property
    def num_emitted(self) -> torch.Tensor:
        """LongTensor [B]: tokens this step adds per row (accepted drafts + 1)."""
        return self.num_accepted + 1


def _row(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, L, ...], index [B] -> t[b, index[b]] of shape [B, ...]."""
    idx = index.view(-1, *([1] * (t.dim() - 1))).expand(-1, 1, *t.shape[2:])
    return t.gather(1, idx).squeeze(1)


def _pack(draft_tokens, num_accepted, next_token):
    B, K = draft_tokens.shape
    pos = torch.arange(K + 1, device=draft_tokens.device).expand(B, K + 1)
    n = num_accepted.unsqueeze(1)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)
    tokens = torch.where(pos < n, padded, torch.full_like(padded, -1))
    return torch.where(pos == n, next_token.unsqueeze(1).expand_as(padded), tokens)


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    criterion="exact",
    generator: Generator = None,
    *,
    greedy: bool = False,
) -> VerifyResult:
    """Verify K draft tokens per row against the target in one vectorised step.

    Args:
        draft_tokens: LongTensor [B, K], the drafts ``x_1..x_K`` (K may be 0: plain AR).
        draft_probs: [B, K, V] rows ``q_i`` the drafts were drawn from, or None for deterministic drafts
            (one-hot ``q``: prompt lookup, greedy drafters, fresh Jacobi init tokens).
        target_probs: [B, K+1, V] target rows ``p_1..p_{K+1}`` after the logits pipeline. With
            ``greedy=True`` any scores whose argmax is the greedy token will do (e.g. processed logits).
        criterion: a registry name or a ``mmspec.acceptance.Criterion``.
        generator: a ``torch.Generator`` or a list with one per row; every draw comes from it.
        greedy: accept iff ``x_i == argmax p_i`` and emit ``argmax p``; no randomness is consumed.

    Returns:
        VerifyResult with ``num_accepted`` [B], ``tokens`` [B, K+1] (-1 padded) and ``next_token`` [B].

    The criterion gives the acceptance probability ``a_i``; ``u_i ~ U(0, 1]`` in float64 accepts iff
    ``u_i <= a_i``, left to right, stopping at the first rejection. At a rejection the emitted token is an
    exact draw from the criterion's residual (falling back to ``p`` where the residual has no mass, so
    ``p == q`` never divides by zero); with all K accepted it is a bonus draw from ``p_{K+1}``.
    """
    if draft_tokens.dim() != 2:
        raise ValueError(f"`draft_tokens` must be [B, K], got shape {tuple(draft_tokens.shape)}.")
    B, K = draft_tokens.shape
    if target_probs.dim() != 3 or target_probs.shape[:2] != (B, K + 1):
        raise ValueError(
            f"`target_probs` must be [B, K+1, V] = [{B}, {K + 1}, V], got shape {tuple(target_probs.shape)}."
        )
    if draft_probs is not None and draft_probs.shape != (B, K, target_probs.shape[-1]):
        raise ValueError(
            f"`draft_probs` must be None or [B, K, V] = {(B, K, target_probs.shape[-1])}, "
            f"got shape {tuple(draft_probs.shape)}."
        )

    if K == 0 and greedy:  # plain greedy decoding: nothing to verify
        next_token = target_probs[:, 0].argmax(-1)
        return VerifyResult(torch.zeros_like(next_token), next_token.unsqueeze(1), next_token,
                            draft_tokens.new_zeros((B, 0), dtype=torch.bool))
    if greedy:
        accepted, num_accepted, next_token = greedy_step(draft_tokens, target_probs)
    else:
        accepted, num_accepted, next_token = sampled_step(
            draft_tokens, draft_probs, target_probs, _acceptance.get(criterion),
            lambda shape: uniform(shape, generator, draft_tokens.device),
            lambda weights: sample_from_weights(weights, generator),
        )
    return VerifyResult(num_accepted, _pack(draft_tokens, num_accepted, next_token), next_token, accepted)


def greedy_step(draft_tokens: torch.Tensor, scores: torch.Tensor):
    """Greedy verification: [B, K] drafts, [B, K+1, V] scores -> (accepted [B, K], num_accepted [B],
    next_token [B]): accept iff ``x_i == argmax``, emit the argmax (first index on ties)."""
    K = draft_tokens.shape[1]
    best = scores.argmax(-1)  # [B, K+1]
    accepted = (draft_tokens == best[:, :K]).long().cumprod(-1).bool()
    num_accepted = accepted.sum(-1)
    next_token = best.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    return accepted, num_accepted, next_token


def sampled_step(draft_tokens, draft_probs, target_probs, criterion, draw_uniform, draw_token):
    """The sampled verification step with its two random draws supplied by the caller.

    ``draw_uniform((B, K))`` gives float64 uniforms in (0, 1] (drawn after nothing else, so a generator's
    stream is consumed as ``u`` then the token draw); ``draw_token(weights [B, V])`` gives an exact draw
    [B] from unnormalised weights. ``verify`` passes generator draws; ``mmspec.kernels`` passes fixed noise
    tensors. Returns ``(accepted [B, K], num_accepted [B], next_token [B])``.
    """
    K = draft_tokens.shape[1]
    ratio = criterion.acceptance(draft_tokens, draft_probs, target_probs[:, :K])  # [B, K]
    u = draw_uniform(tuple(draft_tokens.shape))
    accepted = (u <= ratio.to(torch.float64)).long().cumprod(-1).bool()
    num_accepted = accepted.sum(-1)

    p_n = _row(target_probs, num_accepted)  # [B, V]: residual row at the rejection, or p_{K+1}
    if K > 0:
        at = num_accepted.clamp(max=K - 1)
        x_n = _row(draft_tokens, at)
        q_n = None if draft_probs is None else _row(draft_probs, at)
        weights = criterion.residual(x_n, q_n, p_n)
        empty = weights.sum(-1, keepdim=True) <= 0
        rejected = (num_accepted < K).unsqueeze(1)
        weights = torch.where(rejected & ~empty, weights, p_n)
    else:
        weights = p_n
    return accepted, num_accepted, draw_token(weights)


def speculative_redraw(
    old_tokens: torch.Tensor,
    old_probs: torch.Tensor | None,
    new_probs: torch.Tensor,
    generator: Generator = None,
) -> torch.Tensor:
    """Coupled redraw of every slot independently: a draw from ``new_probs`` that keeps ``old_tokens``
    as often as possible.

    Keeps ``x`` with probability ``min(1, p(x)/q(x))``, else draws from ``max(p - q, 0)`` (or ``p`` when
    that is empty). The marginal of the result is exactly ``p`` whatever ``q`` was, so the result can be
    verified as a draft drawn from ``p``. Shapes: [B, L], [B, L, V] or None (one-hot), [B, L, V] -> [B, L].
    """
    exact = _acceptance.get("exact")
    keep = uniform(old_tokens.shape, generator, old_tokens.device) <= exact.acceptance(
        old_tokens, old_probs, new_probs
    ).to(torch.float64)
    weights = exact.residual(old_tokens, old_probs, new_probs)
    weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, new_probs)
    return torch.where(keep, old_tokens, sample_from_weights(weights, generator))
