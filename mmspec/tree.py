"""Token trees: several draft candidates per position, checked in one target forward.

A ``DraftTree`` holds, per row, N draft *nodes* in topological order: node ``i`` carries a token and the index
of its parent (``-1``: a child of the anchor, the last committed token that starts every step). One target
forward over ``[anchor, node_0 .. node_{N-1}]`` with an ancestor-only attention mask (``block_ancestors``) and
positions by depth (``block_depth``) yields, at block position ``i + 1``, the target row for the children of
node ``i`` (row 0 is the anchor's). ``mmspec.verify.verify_tree`` then keeps one root-to-leaf path per row.

A chain of K drafts is the tree whose node ``i`` has parent ``i - 1``; the decode loop keeps its own
(faster) chain path for it, so trees cost nothing when not asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DraftTree", "block_parents", "block_depth", "block_ancestors", "sibling_rank", "parse_tree"]


@dataclass
class DraftTree:
    """Draft nodes of one step, per row.

    Attributes:
        tokens: LongTensor [B, N] node tokens (any value at unused nodes).
        parents: LongTensor [B, N] parent node index, ``-1`` for children of the anchor; ``parents[b, i] < i``.
            Siblings (nodes of one parent) are verified in index order.
        probs: [B, N, V] the distribution each node was drawn from *given its earlier siblings* (the condition
            that makes recursive rejection sampling exact), or None when every node is deterministic (one-hot
            ``q``: argmax / top-k candidates, n-gram matches, init tokens).
        valid: BoolTensor [B, N] on the CPU: False at unused nodes (a common node budget per batch). Unused
            nodes must not be parents of used ones.
        depth: the largest node depth (a child of the anchor has depth 1), a host int.
        width: the largest number of siblings, a host int.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    probs: torch.Tensor | None
    valid: torch.Tensor
    depth: int
    width: int

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @classmethod
    def chain(cls, tokens: torch.Tensor, probs: torch.Tensor | None = None, valid: torch.Tensor | None = None):
        """The chain ``x_1 -> x_2 -> ... -> x_K`` as a tree (tokens [B, K])."""
        B, K = tokens.shape
        parents = (torch.arange(K, device=tokens.device) - 1).expand(B, K).contiguous()
        valid = torch.ones(B, K, dtype=torch.bool) if valid is None else valid.cpu()
        return cls(tokens, parents, probs, valid, depth=K, width=1 if K else 0)

    def node_depth(self) -> torch.Tensor:
        """LongTensor [B, N]: depth of every node (1 for children of the anchor)."""
        return block_depth(block_parents(self.parents), self.depth)[:, 1:]


def parse_tree(tree) -> tuple[int, int] | None:
    """Validate a user's ``tree=(width, depth)`` argument -> the tuple, or None for a chain."""
    if tree is None:
        return None
    if (not isinstance(tree, (tuple, list)) or len(tree) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in tree)):
        raise ValueError(f"`tree` must be None (a chain) or a pair of ints (width, depth), got {tree!r}.")
    width, depth = tree
    if width < 1 or depth < 1:
        raise ValueError(f"`tree=(width, depth)` needs width >= 1 and depth >= 1, got {tree!r}.")
    return int(width), int(depth)


def block_parents(parents: torch.Tensor) -> torch.Tensor:
    """Node parents [B, N] -> parents of the block ``[anchor, nodes]`` [B, N + 1] (block indices, anchor -1)."""
    B = parents.shape[0]
    return torch.cat([parents.new_full((B, 1), -1), parents + 1], dim=1)


def block_depth(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Block parents [B, L] (-1 at roots) -> depth [B, L] (0 at roots). ``max_depth`` bounds the iterations."""
    depth = torch.zeros_like(parents)
    has_parent = parents >= 0
    src = parents.clamp_min(0)
    for _ in range(max_depth):
        depth = torch.where(has_parent, depth.gather(1, src) + 1, 0)
    return depth


def block_ancestors(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Block parents [B, L] -> BoolTensor [B, L, L]: ``[b, i, j]`` is True iff j is i or an ancestor of i."""
    B, L = parents.shape
    eye = torch.eye(L, dtype=torch.bool, device=parents.device).expand(B, L, L)
    anc = eye.clone()
    has_parent = (parents >= 0).unsqueeze(-1)
    src = parents.clamp_min(0).unsqueeze(-1).expand(B, L, L)
    for _ in range(max_depth):
        anc = eye | (has_parent & anc.gather(1, src))
    return anc


def sibling_rank(parents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """LongTensor [B, N]: how many used nodes before node i share its parent (its order among siblings)."""
    N = parents.shape[1]
    earlier = torch.ones(N, N, dtype=torch.bool, device=parents.device).tril(-1)  # [i, j]: j < i
    same = (parents.unsqueeze(2) == parents.unsqueeze(1)) & earlier & valid.unsqueeze(1)
    return same.sum(-1)
