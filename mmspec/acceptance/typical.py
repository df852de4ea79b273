"""Typical acceptance (Medusa, Cai et al. 2024): lossy, entropy-adaptive."""

from __future__ import annotations

import torch

from .base import Criterion, gather_token_probs, register


@register("typical")
class Typical(Criterion):
    """Accept ``x`` iff ``p(x) > min(epsilon, alpha * exp(-H(p)))``; on rejection sample from ``p``.

    Lossy: the output is not distributed as the target. Needs ``do_sample=True``.

    Args:
        epsilon: hard threshold (Medusa default 0.09).
        alpha: entropy-scaled threshold factor (Medusa default 0.3).
    """

    lossless = False
    requires_sampling = True

    def __init__(self, epsilon: float = 0.09, alpha: float = 0.3):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"`epsilon` must be in [0, 1], got {epsilon!r}.")
        if alpha < 0.0:
            raise ValueError(f"`alpha` must be >= 0, got {alpha!r}.")
        self.epsilon = float(epsilon)
        self.alpha = float(alpha)

    def acceptance(self, draft_tokens, draft_probs, target_probs):
        p = target_probs
        entropy = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)
        threshold = torch.minimum(torch.full_like(entropy, self.epsilon), self.alpha * torch.exp(-entropy))
        return (gather_token_probs(p, draft_tokens) > threshold).to(p.dtype)

    def residual(self, draft_tokens, draft_probs, target_probs):
        return target_probs
