"""Draft-verify for continuous tokens: a smaller MAR-style model drafts, each token from its own diffusion chain.

Each draft starts from trajectory noise ``E`` drawn once per token, and the target's chains start from the same
``E`` (trajectory alignment): the drafts then land near the target's tokens when the models agree, and the output
stays exactly the target's (``mmspec.acceptance.continuous`` explains why). The drafter keeps its own per-row cache
(``mmspec.models.mar.MARRunner``); committed tokens it has not seen yet (the correction, and the last draft after a
full acceptance) are fed as a short pending block before drafting, as for token draft models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..acceptance.continuous import normal
from .base import Proposer

__all__ = ["ContinuousDraftProposer", "GaussianDrafts"]


@dataclass
class GaussianDrafts:
    """What continuous drafts were drawn from: the ``q`` that ``Proposer.propose`` returns beside them.

    Attributes:
        mean: [B, K, C] float64, the draft's last-step means ``mu_q`` (draft = ``mean + scale * noise``).
        scale: the draft's last-step scale ``s_q`` (float).
        noise: [B, K, C] float64, the drafts' last-step noise.
        trajectory: [B, K+1, S, C] float64, the trajectory noise the target's chains start from at each block
            position (the draft's own when aligned).
        num_drafts: LongTensor [B] (on the drafts' device), real drafts per row; the others are never accepted.
    """

    mean: torch.Tensor
    scale: float
    noise: torch.Tensor
    trajectory: torch.Tensor
    num_drafts: torch.Tensor


class ContinuousDraftProposer(Proposer):
    """A smaller continuous model proposes K tokens per step (for ``mmspec.continuous.ContinuousState``).

    Args:
        draft: the draft adapter (``mmspec.models.mar.MARRunner``, same token shape and guidance as the target's).
        trajectory: the draft's token sampler (``mmspec.models.mar.DDPMTrajectory``). Equal last-step scales of
            draft and target use the reflection residual; different ones bounded rejection sampling.
        num_drafts: most drafts per step (``window - 1``).
        align: share the trajectory noise with the target. False gives the draft independent noise: still exact,
            lower acceptance (for comparison).

    ``proposed`` and ``accepted`` count real drafts over the decode (their ratio is the acceptance rate).
    """

    def __init__(self, draft, trajectory, num_drafts: int, align: bool = True):
        self.draft, self.trajectory, self.num_drafts, self.align = draft, trajectory, num_drafts, align
        self.draft_forwards = 0
        self.proposed = self.accepted = 0

    def start(self, state):
        self.draft.prefill(*state.prompt)
        self.draft_forwards += 1
        self._fed = torch.zeros(state.batch_size, dtype=torch.long)  # committed tokens the draft has seen
        self._steps = max(state.trajectory.num_steps, self.trajectory.num_steps) + 1  # noise long enough for both

    def propose(self, state, max_tokens):
        B, C, dev, gen = state.batch_size, state.token_dim, state.device, state.generator
        K = min(self.num_drafts, max_tokens)
        real = state.drafts_per_row(K)  # [B]
        noise = normal((B, K + 1, self._steps, C), gen, dev)
        draft_noise = normal((B, K + 1, self._steps, C), gen, dev) if (K and not self.align) else noise
        drafts = torch.zeros(B, K, C, dtype=torch.float64, device=dev)
        mu_q = torch.zeros(B, K, C, dtype=torch.float64, device=dev)
        s_q = self.trajectory.last_scale
        self._active, self._real, self._pending = state.active.clone(), real, None
        if K:
            draft = self.draft
            draft.checkpoint()
            pending = torch.where(state.active, state.num_new - self._fed, 0)  # 1, or 2 after a full acceptance
            P = int(pending.max())
            idx = (self._fed.view(B, 1) + torch.arange(P)).clamp(max=state.max_new_tokens - 1).to(dev)
            block = state.tokens.gather(1, idx.unsqueeze(-1).expand(B, P, C))  # [B, P, C]
            zq = draft.forward(block, torch.arange(P) < pending.view(B, 1))  # [B, P, G, D]
            z = zq[torch.arange(B, device=dev), (pending - 1).clamp(min=0).to(dev)]  # condition of the first draft
            self.draft_forwards += 1
            for j in range(K):
                if j:
                    z = draft.forward(drafts[:, j - 1 : j], (j < real).view(B, 1))[:, 0]
                    self.draft_forwards += 1
                mu_q[:, j] = self.trajectory.last_mean(draft.eps_fn(z), draft_noise[:, j])
                drafts[:, j] = mu_q[:, j] + s_q * draft_noise[:, j, -1]
            self._pending = pending
        return drafts, GaussianDrafts(mu_q, s_q, draft_noise[:, :K, -1], noise, real.to(dev))

    def update(self, state, result, target_rows, num_accepted):
        self.proposed += int(self._real.sum())
        self.accepted += int(num_accepted[self._active].sum())
        if self._pending is not None:
            # the draft cache holds the pending block and drafts x_1 .. x_{real-1}: keep the accepted ones
            kept = self._pending + torch.minimum(num_accepted, (self._real - 1).clamp(min=0))
            self.draft.rollback(kept)
            self._fed += kept
