"""The proposer protocol: what the decoding loop asks of a drafter."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

__all__ = ["Proposer", "NoDraft"]


class Proposer(ABC):
    """Proposes draft tokens for every row before each target forward.

    The loop calls ``start`` once after the target's prefill, then per step ``propose`` -> (target forward,
    verify, commit) -> ``update``. Proposers read the committed tokens from ``state`` (a ``mmspec.decoding.State``:
    ``DecodeState`` for ids, ``mmspec.continuous.ContinuousState`` for vectors) and never touch the target's cache.
    """

    #: number of forwards this proposer ran on a separate draft model
    draft_forwards: int = 0

    def start(self, state) -> None:
        """Called once, after the target prefill and the first committed token."""

    @abstractmethod
    def propose(self, state, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return drafts [B, K] (K <= max_tokens, on ``state.device``) and the rows [B, K, V] they were
        drawn from, or None when every draft is deterministic (one-hot ``q``). Continuous proposers return
        drafts [B, K, C] and a ``GaussianDrafts``."""

    def update(self, state, result, target_rows: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """After verification: ``result`` is the ``VerifyResult``, ``target_rows`` [B, K+1, V] the target's
        probabilities (processed scores when greedy), ``num_accepted`` the CPU copy of the accepted counts."""


class NoDraft(Proposer):
    """Plain autoregressive decoding through the same loop: an empty window every step."""

    def propose(self, state, max_tokens):
        return state.no_drafts(), None
