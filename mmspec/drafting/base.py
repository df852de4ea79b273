"""The proposer protocol: what the decoding loop asks of a drafter."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

__all__ = ["Proposer", "NoDraft", "row_limits", "pad_drafts"]


def row_limits(state, max_tokens: int) -> torch.Tensor:
    """LongTensor [B] (CPU): the drafts each row may propose this step, from its own progress only.

    ``max_tokens`` is the loop's batch-wide cap (it follows the row with the most tokens left); a row's own cap
    is ``remaining - 1``. Proposing up to ``min(max_tokens, remaining[b] - 1)`` drafts in row ``b`` gives it the
    window it would have alone, so a row decodes the same tokens alone as in any batch (0 for finished rows).
    """
    return torch.minimum(state.remaining - 1, torch.as_tensor(max_tokens)).clamp_min(0)


def pad_drafts(drafts: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """[B, K] drafts -> the same with -1 from ``limit[b]`` on (the slots row ``b`` does not propose)."""
    own = torch.arange(drafts.shape[1], device=drafts.device) < limit.to(drafts.device).unsqueeze(1)
    return torch.where(own, drafts, -1)


class Proposer(ABC):
    """Proposes draft tokens for every row before each target forward.

    The loop calls ``start`` once after the target's prefill, then per step ``propose`` -> (target forward,
    verify, commit) -> ``update``. Proposers read the committed text from ``state`` (a
    ``mmspec.decoding.DecodeState``) and never touch the target's cache.
    """

    #: number of forwards this proposer ran on a separate draft model
    draft_forwards: int = 0

    def start(self, state) -> None:
        """Called once, after the target prefill and the first committed token."""

    @abstractmethod
    def propose(self, state, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return drafts [B, K] (K <= max_tokens, on ``state.device``) and the rows [B, K, V] they were
        drawn from, or None when every draft is deterministic (one-hot ``q``).

        Per-row reproducibility: a row proposes what it would alone (at most ``row_limits(state, max_tokens)``
        drafts, a number that depends on that row only) and fills the rest of the batch's window with -1
        (``pad_drafts``); every random draw over the window passes those per-row counts (``mmspec.sampling``)."""

    def update(self, state, result, target_rows: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """After verification: ``result`` is the ``VerifyResult``, ``target_rows`` [B, K+1, V] the target's
        probabilities (processed scores when greedy), ``num_accepted`` the CPU copy of the accepted counts."""


class NoDraft(Proposer):
    """Plain autoregressive decoding through the same loop: an empty window every step."""

    def propose(self, state, max_tokens):
        return torch.empty(state.batch_size, 0, dtype=torch.long, device=state.device), None
