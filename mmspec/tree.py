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

from dataclasses import dataclass, field

import torch

from .sampling import sample_categorical

__all__ = ["DraftTree", "block_parents", "block_depth", "block_ancestors", "block_paths", "sibling_rank",
           "parse_tree", "tree_size", "with_alternatives", "closest_rows"]


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
    #: what :meth:`depths` and :meth:`ancestors` computed (a new tree, ``dataclasses.replace`` included, starts empty)
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
        return self.depths()[:, 1:]

    def depths(self) -> torch.Tensor:
        """LongTensor [B, N + 1]: :func:`block_depth` of the block ``[anchor, nodes]`` (0 at the anchor), computed
        once per tree (the forward's positions, its cache bookkeeping and the next window all ask for it)."""
        return self._cached("depths", lambda: block_depth(block_parents(self.parents), self.depth))

    def ancestors(self) -> torch.Tensor:
        """BoolTensor [B, N + 1, N + 1]: :func:`block_ancestors` of the block (the attention mask's tree part),
        computed once per tree."""
        return self._cached("ancestors", lambda: block_ancestors(block_parents(self.parents), self.depth))

    def stacked(self, times: int = 2) -> DraftTree:
        """The tree of ``times`` stacked copies of the batch (rows ``[B * times]``, e.g. a guided forward's cond and
        uncond rows), for a forward: ``probs`` is dropped; :meth:`depths` and :meth:`ancestors` (the forward needs both;
        this tree keeps them for the next window) are computed once here and carried over."""
        self.depths(), self.ancestors()
        out = DraftTree(self.tokens.repeat(times, 1), self.parents.repeat(times, 1), None, self.valid.repeat(times, 1),
                        self.depth, self.width)
        out._derived.update({k: v.repeat(times, *[1] * (v.dim() - 1)) for k, v in self._derived.items()})
        return out

    def _cached(self, name: str, make):
        if name not in self._derived:
            self._derived[name] = make()
        return self._derived[name]


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


def _up(parents: torch.Tensor) -> torch.Tensor:
    """Block parents [B, L] -> pointers [B, L + 1] for pointer doubling: each position's parent, roots point to a
    sink at index L, which points to itself."""
    B, L = parents.shape
    return torch.cat([torch.where(parents < 0, L, parents), parents.new_full((B, 1), L)], dim=1)


def block_depth(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Block parents [B, L] (-1 at roots) -> depth [B, L] (0 at roots). ``max_depth`` bounds the depth.

    Pointer doubling: after k rounds ``up`` points 2^k levels up (or to the sink, of depth 0) and ``depth`` counts
    the levels passed, so ceil(log2(max_depth)) rounds of two gathers suffice (a GPU launches a handful of kernels
    where a walk up one level at a time would launch 2 * max_depth)."""
    B, L = parents.shape
    up = _up(parents)
    depth = torch.cat([(parents >= 0).to(parents.dtype), parents.new_zeros(B, 1)], dim=1)
    for _ in range(max(max_depth - 1, 0).bit_length()):
        depth = depth + depth.gather(1, up)
        up = up.gather(1, up)
    return depth[:, :L]


def block_ancestors(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Block parents [B, L] -> BoolTensor [B, L, L]: ``[b, i, j]`` is True iff j is i or an ancestor of i.

    Pointer doubling, as :func:`block_depth`: after k rounds row i holds i and its ancestors less than 2^k levels up,
    and the next round adds the row of the position 2^k levels up."""
    B, L = parents.shape
    up = _up(parents)
    eye = torch.eye(L, dtype=torch.bool, device=parents.device).expand(B, L, L)
    reach = torch.cat([eye, eye.new_zeros(B, 1, L)], dim=1)  # [B, L + 1, L]: the sink's row is empty
    batch = torch.arange(B, device=parents.device).unsqueeze(1)
    for _ in range(max(max_depth, 0).bit_length()):
        reach = reach | reach[batch, up]
        up = up.gather(1, up)
    return reach[:, :L].contiguous()


def sibling_rank(parents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """LongTensor [B, N]: how many used nodes before node i share its parent (its order among siblings)."""
    N = parents.shape[1]
    earlier = torch.ones(N, N, dtype=torch.bool, device=parents.device).tril(-1)  # [i, j]: j < i
    same = (parents.unsqueeze(2) == parents.unsqueeze(1)) & earlier & valid.unsqueeze(1)
    return same.sum(-1)


def block_paths(tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafts each block position continues: (tokens [B, N + 1, depth], lengths [B, N + 1]); position ``j``
    (0 = anchor) continues ``tokens[b, j, :lengths[b, j]]``, the node tokens from the anchor's child down to it."""
    depth, anc = tree.depths(), tree.ancestors()  # [B, L], [B, L, L]
    B, L = depth.shape
    block_tokens = torch.cat([tree.tokens.new_zeros(B, 1), tree.tokens], dim=1)
    # ancestor k of position j (k != anchor) sits at slot depth[k] - 1 of j's path
    slot = torch.where(anc & (depth > 0).unsqueeze(1), depth.unsqueeze(1) - 1, tree.depth)  # [B, L, L]
    out = block_tokens.new_zeros(B, L, tree.depth + 1)
    out.scatter_(2, slot, block_tokens.unsqueeze(1).expand(B, L, L))
    return out[:, :, : tree.depth], depth


def closest_rows(tree: DraftTree, committed: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Per depth, the block position whose drafts agree longest with what was committed: the rows to continue from.

    After verifying ``tree``, ``committed`` [B, M] holds the accepted path then the correction (or bonus) token, -1
    padded (``TreeVerifyResult.tokens``). For each depth ``e < num_rows`` this picks the block position of depth ``e``
    (0 = the anchor) whose path from the anchor matches the longest prefix of ``committed``, the lowest index on
    ties (so the chain, nodes ``0..K-1``, wins unless a branch matches better). Its row predicts depth ``e + 1``
    given the best-conditioned context the forward computed: the accepted branch's own subtree when the path left
    the chain, and the node equal to the correction when there is one. Returns LongTensor [B, num_rows] (block
    positions; every depth below ``num_rows`` must hold a valid node in every row, as a chain's do)."""
    toks, depth = block_paths(tree)  # [B, L, D], [B, L]
    B, L, D = toks.shape
    M = min(D, committed.shape[1])
    eq = toks[:, :, :M] == committed[:, None, :M].to(toks.device)
    in_path = torch.arange(M, device=toks.device) < depth.unsqueeze(-1)  # [B, L, M]
    match = (eq & in_path).long().cumprod(-1).sum(-1)  # [B, L] agreeing prefix length
    valid = torch.cat([torch.ones(B, 1, dtype=torch.bool), tree.valid], 1).to(toks.device)
    key = torch.where(valid, match * (L + 1) + (L - torch.arange(L, device=toks.device)), -1)
    best = torch.full((B, max(num_rows, int(depth.max()) + 1)), -1, dtype=torch.long, device=toks.device)
    best.scatter_reduce_(1, depth, key, reduce="amax")
    return L - best[:, :num_rows] % (L + 1)


def tree_size(width: int, depth: int) -> int:
    """Nodes of the full ``width``-ary tree over ``depth`` levels: ``width + width**2 + ... + width**depth``."""
    return sum(width**d for d in range(1, depth + 1))


def _candidates(drafts, rows, usable, width, greedy, generator):
    """Per slot, the chain's draft then ``width - 1`` further candidates from the slot's row -> (tokens [B, D, w],
    their q rows [B, D, w, V] or None, usable [B, D, w] on the CPU)."""
    B, D = drafts.shape
    V = rows.shape[-1]
    if greedy:
        ranked = rows.topk(min(width, V), dim=-1).indices  # [B, D, width]
        is_draft = ranked == drafts.unsqueeze(-1)
        order = torch.where(is_draft, width, torch.arange(ranked.shape[-1], device=drafts.device)).sort(-1).indices
        alt = ranked.gather(-1, order)[..., : width - 1]
        ok = usable.unsqueeze(-1).expand(B, D, alt.shape[-1])
        return torch.cat([drafts.unsqueeze(-1), alt], -1), None, torch.cat([torch.ones(B, D, 1, dtype=torch.bool), ok], -1)
    remaining = rows.to(torch.float64).scatter(-1, drafts.unsqueeze(-1), 0.0)
    fallback = torch.zeros_like(remaining).scatter(-1, drafts.unsqueeze(-1), 1.0)
    alt, alt_q, ok = [], [], []
    for _ in range(width - 1):
        mass = remaining.sum(-1, keepdim=True)
        ok.append((mass.squeeze(-1) > 0).cpu() & usable)
        qa = torch.where(mass > 0, remaining / mass.clamp_min(1e-300), fallback)
        cand = sample_categorical(qa, generator)
        alt.append(cand), alt_q.append(qa)
        remaining = remaining.scatter(-1, cand.unsqueeze(-1), 0.0)
    tokens = torch.stack([drafts] + alt, -1)
    q_rows = torch.stack([rows.to(torch.float64)] + alt_q, 2)
    return tokens, q_rows, torch.stack([torch.ones(B, D, dtype=torch.bool)] + ok, -1)


_LAYOUTS: dict = {}


def _full_layout(K: int, D: int, W: int):
    """The static node layout of a chain of K with a full W-ary tree over its first D levels -> (parents [N],
    source [N] index into the [D, W] candidate grid (-1: a chain node beyond the tree's levels), chain [N] bool)."""
    key = (K, D, W)
    if key not in _LAYOUTS:
        parents = list(range(-1, K - 1))
        source = [d * W if d < D else -1 for d in range(K)]  # chain node d: branch 0 of level d + 1
        level = [-1]  # nodes at the current level (the anchor first)
        for d in range(D):
            nxt = []
            for parent in level:
                for b in range(W):
                    if b == 0 and (parent == -1 or parent < K):
                        nxt.append(d)  # the chain's own node is the chain parent's first child
                        continue
                    parents.append(parent)
                    source.append(d * W + b)
                    nxt.append(len(parents) - 1)
            level = nxt
        _LAYOUTS[key] = (torch.tensor(parents), torch.tensor(source))
    return _LAYOUTS[key]


def with_alternatives(drafts, q, rows, usable, width: int, depth: int, greedy: bool, generator):
    """A chain of drafts grown into a tree of alternatives (SJD-PAC's proactive drafting).

    Each of the first ``depth`` slots gets ``width`` candidates: the chain's own draft, then ``width - 1`` more from
    the row the draft came from (drawn without replacement when sampling, so each candidate's q is that row with
    the draft and the earlier candidates removed, renormalised -- the condition for exact recursive rejection
    sampling; the next-best tokens when greedy). Every node of the first ``depth`` levels has all of its level's
    candidates as children (a full ``width``-ary tree, ``tree_size(width, depth)`` nodes), the chain's draft first;
    below that the chain continues alone.

    Args:
        drafts: LongTensor [B, K] the chain (node i's parent is node i - 1, the anchor for i = 0).
        q: [B, K, V] the rows the chain's drafts were drawn from (None when greedy / deterministic).
        rows: [B, >= min(K, depth), V] the row each slot's draft came from: probabilities when sampling, any
            scores when greedy.
        usable: BoolTensor [B, K] slots that may get candidates (False: the draft has no such row).
    Returns:
        a ``DraftTree`` (the chain first, nodes 0..K-1), or the plain ``(drafts, q)`` when no slot can branch.
    """
    B, K = drafts.shape
    D = min(depth, K)
    if K == 0 or width == 1 or D == 0:
        return drafts, q
    dev, V = drafts.device, rows.shape[-1]
    own = (drafts >= 0).cpu()  # -1: slots after a row's own drafts (mmspec.drafting.base.pad_drafts)
    drafts = drafts.clamp_min(0)
    usable = usable[:, :D].cpu() & own[:, :D]
    cand, cand_q, ok = _candidates(drafts[:, :D], rows[:, :D], usable, width, greedy, generator)
    if q is not None:  # the chain's draft keeps its own q under every parent (one-hot for fresh init tokens)
        cand_q[:, :, 0] = q[:, :D].to(cand_q.dtype)
    parents, source = _full_layout(K, D, width)
    N = len(parents)
    grid = source.clamp_min(0)
    is_tree = source >= 0
    chain_src = torch.arange(N).clamp(max=K - 1).to(dev)
    tokens = torch.where(is_tree.to(dev), cand.reshape(B, D * width)[:, grid.to(dev)], drafts[:, chain_src])
    tokens[:, :K] = drafts
    valid = torch.where(is_tree, ok.reshape(B, D * width)[:, grid], own[:, torch.arange(N).clamp(max=K - 1)])
    valid[:, :K] = own
    for _ in range(D):  # a node is usable only below usable nodes
        valid = valid & torch.where(parents >= 0, valid[:, parents.clamp_min(0)], True)
    if not bool(valid[:, K:].any()):
        return drafts, q
    probs = None
    if q is not None:
        probs = cand_q.reshape(B, D * width, V)[:, grid.to(dev)].to(q.dtype)
        probs[:, :K] = q
    return DraftTree(tokens, parents.to(dev).expand(B, N).contiguous(), probs, valid, depth=K, width=width)
