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

from .sampling import sample_from_weights as sample_weights

__all__ = ["DraftTree", "block_parents", "block_depth", "block_ancestors", "block_paths", "sibling_rank",
           "parse_tree", "with_alternatives"]


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


def block_paths(tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafts each block position continues: (tokens [B, N + 1, depth], lengths [B, N + 1]); position ``j``
    (0 = anchor) continues ``tokens[b, j, :lengths[b, j]]``, the node tokens from the anchor's child down to it."""
    parents = block_parents(tree.parents)
    depth = block_depth(parents, tree.depth)  # [B, L]
    anc = block_ancestors(parents, tree.depth)  # [B, L, L]
    B, L = parents.shape
    block_tokens = torch.cat([tree.tokens.new_zeros(B, 1), tree.tokens], dim=1)
    # ancestor k of position j (k != anchor) sits at slot depth[k] - 1 of j's path
    slot = torch.where(anc & (depth > 0).unsqueeze(1), depth.unsqueeze(1) - 1, tree.depth)  # [B, L, L]
    out = block_tokens.new_zeros(B, L, tree.depth + 1)
    out.scatter_(2, slot, block_tokens.unsqueeze(1).expand(B, L, L))
    return out[:, :, : tree.depth], depth


def with_alternatives(drafts, q, rows, usable, width: int, depth: int, greedy: bool, generator, budget=None):
    """A chain of drafts plus ``width - 1`` siblings at each of its first ``depth`` slots: a DraftTree.

    Args:
        drafts: LongTensor [B, K] the chain (node i's parent is node i - 1, the anchor for i = 0).
        q: [B, K, V] the rows the chain's drafts were drawn from (None when greedy / deterministic).
        rows: [B, >= min(K, depth), V] the row each slot's draft came from: probabilities when sampling (siblings
            are drawn from it without replacement, after the draft: each sibling's q is that row with the draft
            and the earlier siblings removed, renormalised -- the condition for exact recursive rejection
            sampling), any scores when greedy (siblings are the next-best tokens, deterministic).
        usable: BoolTensor [B, K] slots that may get siblings (False: the draft has no such row).
        budget: None, or LongTensor [B, K]: how many siblings each slot gets (<= width - 1; chosen from anything
            but the siblings themselves, e.g. the draft's confidence), over all K slots instead of the first
            ``depth``; unused nodes are packed away.
    Returns:
        a ``DraftTree`` with the chain first (nodes 0..K-1), then the siblings of slot d after it, or the plain
        ``(drafts, q)`` when no slot can have siblings.
    """
    B, K = drafts.shape
    D = K if budget is not None else min(depth, K)
    if K == 0 or width == 1 or D == 0:
        return drafts, q
    dev, V = drafts.device, rows.shape[-1]
    rows = rows[:, :D]
    usable = usable[:, :D].cpu()
    if budget is not None:
        usable = usable.unsqueeze(-1) & (torch.arange(width - 1) < budget[:, :D].cpu().unsqueeze(-1))  # [B, D, w-1]
    else:
        usable = usable.unsqueeze(-1).expand(B, D, width - 1)
    alt, alt_q, ok = [], [], []
    if greedy:
        ranked = rows.topk(min(width, V), dim=-1).indices  # [B, D, width]
        is_draft = ranked == drafts[:, :D].unsqueeze(-1)
        order = torch.where(is_draft, width, torch.arange(ranked.shape[-1], device=dev)).sort(-1).indices
        alt = ranked.gather(-1, order)[..., : width - 1]
        ok = torch.ones(B, D, alt.shape[-1], dtype=torch.bool)
    else:
        remaining = rows.to(torch.float64).scatter(-1, drafts[:, :D].unsqueeze(-1), 0.0)
        fallback = torch.zeros_like(remaining).scatter(-1, drafts[:, :D].unsqueeze(-1), 1.0)
        for _ in range(width - 1):
            mass = remaining.sum(-1, keepdim=True)
            ok.append((mass.squeeze(-1) > 0).cpu())
            qa = torch.where(mass > 0, remaining / mass.clamp_min(1e-300), fallback)
            cand = sample_weights(qa, generator)
            alt.append(cand), alt_q.append(qa)
            remaining = remaining.scatter(-1, cand.unsqueeze(-1), 0.0)
        alt, ok = torch.stack(alt, -1), torch.stack(ok, -1)
    valid = torch.cat([torch.ones(B, K, dtype=torch.bool), (ok & usable[..., : alt.shape[-1]]).reshape(B, -1)], 1)
    if not bool(valid[:, K:].any()):
        return drafts, q
    w1 = alt.shape[-1]
    tokens = torch.cat([drafts, alt.reshape(B, D * w1)], dim=1)
    parents = torch.cat([torch.arange(K, device=dev) - 1, (torch.arange(D, device=dev) - 1).repeat_interleave(w1)])
    parents = parents.expand(B, -1).contiguous()
    probs = None if q is None else torch.cat([q, torch.stack(alt_q, 2).reshape(B, D * w1, V).to(q.dtype)], dim=1)
    tree = DraftTree(tokens, parents, probs, valid, depth=K, width=w1 + 1)
    return tree if budget is None else _pack_valid(tree)


def _pack_valid(tree: DraftTree) -> DraftTree:
    """Move every row's used nodes to the front (stable, so parents stay before children) and drop the columns
    no row uses."""
    B, N = tree.tokens.shape
    dev = tree.tokens.device
    order = torch.where(tree.valid, 0, 1).mul(N).add(torch.arange(N)).argsort(-1)  # [B, N] new -> old (CPU)
    n = int(tree.valid.sum(-1).max())
    order = order[:, :n]
    new_index = torch.full((B, N + 1), -1, dtype=torch.long)
    new_index.scatter_(1, order, torch.arange(n).expand(B, n))
    od = order.to(dev)
    parents = tree.parents.gather(1, od)
    parents = torch.where(parents >= 0, new_index.to(dev).gather(1, parents.clamp_min(0)), -1)
    probs = None if tree.probs is None else tree.probs.gather(1, od.unsqueeze(-1).expand(-1, -1, tree.probs.shape[-1]))
    return DraftTree(tree.tokens.gather(1, od), parents, probs, tree.valid.gather(1, order), tree.depth, tree.width)
