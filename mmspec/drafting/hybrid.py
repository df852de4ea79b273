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
        jacobi: the ``JacobiProposer`` (its window must leave the draft's nodes free).
        draft: the ``DraftModelProposer``: a chain, or a tree (its nodes join under the anchor after Jacobi's).
    """

    def __init__(self, jacobi: JacobiProposer, draft: DraftModelProposer):
        self.jacobi, self.draft = jacobi, draft
        self._offset = None

    @property
    def draft_forwards(self) -> int:
        return self.draft.draft_forwards

    def start(self, state):
        self.jacobi.start(state)
        self.draft.start(state)

    def propose(self, state, max_tokens):
        proposal = self.jacobi.propose(state, max_tokens)
        mine = _as_tree(self.draft.propose(state, max_tokens))
        self._offset = None
        if mine.num_nodes == 0:
            return proposal
        own = _as_tree(proposal)
        B, N = own.tokens.shape
        dev = own.tokens.device
        parents = mine.parents.to(dev)
        probs = None
        if own.probs is not None or mine.probs is not None:  # sampling: q rows for every node
            V = (own.probs if own.probs is not None else mine.probs).shape[-1]
            probs = torch.cat([_rows(own, V, dev), _rows(mine, V, dev)], 1)
        self._offset = N
        tree = DraftTree(torch.cat([own.tokens, mine.tokens.clamp_min(0).to(dev)], 1),
                         torch.cat([own.parents, torch.where(parents >= 0, parents + N, -1)], 1), probs,
                         torch.cat([own.valid, mine.valid], 1),
                         depth=max(own.depth, mine.depth), width=own.width + mine.width)
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


def _rows(tree: DraftTree, V: int, device) -> torch.Tensor:
    """The tree's q rows [B, N, V] (float32 at least), one-hot at its tokens where it has none (deterministic nodes:
    Jacobi init tokens, an empty side)."""
    if tree.probs is not None:
        return tree.probs.to(device=device, dtype=torch.promote_types(tree.probs.dtype, torch.float32))
    one_hot = torch.zeros(*tree.tokens.shape, V, device=device)
    return one_hot.scatter_(-1, tree.tokens.clamp_min(0).to(device).unsqueeze(-1), 1.0)


def _as_tree(proposal):
    """A proposer's output as a ``DraftTree`` (a chain's -1 slots become unused nodes)."""
    if isinstance(proposal, DraftTree):
        return proposal
    tokens, q = proposal
    return DraftTree.chain(tokens.clamp_min(0), q, valid=(tokens >= 0).cpu())
