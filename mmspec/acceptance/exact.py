"""Exact speculative sampling: accept with ``min(1, p(x)/q(x))``, emit from ``max(p - q, 0)`` otherwise."""

from __future__ import annotations

import torch

from .base import Criterion, gather_token_probs, register


def _remove_draft(target_probs: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
    """``max(p - onehot(x), 0)``: the residual of a deterministic draft is ``p`` with ``x`` removed."""
    return target_probs.scatter(-1, draft_tokens.unsqueeze(-1), 0.0)


@register("exact")
class Exact(Criterion):
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    With ``do_sample=False`` the core instead accepts iff ``x == argmax p`` and emits ``argmax p``, so
    greedy speculative decoding equals greedy decoding token for token.
    """

    lossless = True

    def acceptance(self, draft_tokens, draft_probs, target_probs):
        p_x = gather_token_probs(target_probs, draft_tokens)
        if draft_probs is None:
            return p_x.clamp(0.0, 1.0)
        q_x = gather_token_probs(draft_probs, draft_tokens)
        # q(x) > 0 for any token actually drawn from q; the clamp only guards rounding.
        return (p_x / q_x.clamp_min(torch.finfo(q_x.dtype).tiny)).clamp(0.0, 1.0)

    def residual(self, draft_tokens, draft_probs, target_probs):
        if draft_probs is None:
            return _remove_draft(target_probs, draft_tokens)
        return (target_probs - draft_probs).clamp_min(0.0)
