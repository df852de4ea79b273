"""Jacobi and a draft model in one tree: the Jacobi window (chain or SJD-PAC tree) plus the draft's chain as one more
branch under the anchor.

Jacobi's drafts come from rows the *last* forward computed, conditioned on drafts that were partly wrong; after a
rejection its first slots are stale. A draft model conditions on the committed tokens themselves (the correction
included), so its first tokens are fresh, while Jacobi keeps the long converged runs. One target forward checks
both: the anchor's children are Jacobi's candidates first, then the draft's first token. The draft's token is drawn
independently of Jacobi's, so its ``q`` given the earlier siblings is the draft's own row and recursive rejection
sampling stays exact (ALGORITHMS section 8). When the draft's branch is accepted, the next Jacobi window continues
from the rows of that branch (``mmspec.tree.closest_rows``), which were computed on the committed path itself.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..tree import DraftTree
from .base import Proposer
from .jacobi import JacobiProposer
from .model import DraftModelProposer

__all__ = ["JacobiDraftProposer"]


class JacobiDraftProposer(Proposer):
    """Jacobi window + a draft model's chain as a sibling branch, verified in one forward.

    Args:
        jacobi: the ``JacobiProposer`` (its window must leave ``draft.num_drafts`` nodes for the draft).
        draft: the ``DraftModelProposer`` (a chain: ``tree=None``).
    """

    def __init__(self, jacobi: JacobiProposer, draft: DraftModelProposer):
        if draft.tree is not None:
            raise ValueError("the draft branch of method='jacobi-draft' is a chain; give `tree` to the Jacobi part.")
        self.jacobi, self.draft = jacobi, draft
        self._offset = None

    @property
    def draft_forwards(self) -> int:
        return self.draft.draft_forwards

    def start(self, state):
        self.jacobi.start(state)
        self.draft.start(state)

    def propose(self, state, max_tokens):
        own = self.jacobi.propose(state, max_tokens)
        d_tokens, d_q = self.draft.propose(state, max_tokens)
        self._offset = None
        if d_tokens.shape[1] == 0:
            return own
        if isinstance(own, tuple):  # Jacobi's plain chain (no alternatives this step)
            tokens, q = own
            own = DraftTree.chain(tokens.clamp_min(0), q, valid=(tokens >= 0).cpu())
        B, N = own.tokens.shape
        Kd = d_tokens.shape[1]
        dev = own.tokens.device
        d_parents = torch.arange(N - 1, N + Kd - 1, device=dev)
        d_parents[0] = -1
        probs = None
        if own.probs is not None:
            dtype = own.probs.dtype
            probs = torch.cat([own.probs, d_q.to(device=dev, dtype=dtype)], 1)
        self._offset = N
        tree = DraftTree(torch.cat([own.tokens, d_tokens.clamp_min(0).to(dev)], 1),
                         torch.cat([own.parents, d_parents.expand(B, Kd)], 1), probs,
                         torch.cat([own.valid, (d_tokens >= 0).cpu()], 1),
                         depth=max(own.depth, Kd), width=own.width + 1)
        self.jacobi._tree = tree  # its next window continues from the rows closest to the committed path
        return tree

    def update(self, state, result, target_rows, num_accepted):
        self.jacobi.update(state, result, target_rows, num_accepted)
        if self._offset is None:  # the draft proposed nothing: nothing of it was fed
            self.draft.update(state, result, target_rows[:, :1], num_accepted)
            return
        path = result.path
        mine = replace(result, path=torch.where(path >= self._offset, path - self._offset, -1))
        self.draft.update(state, mine, target_rows, num_accepted)
