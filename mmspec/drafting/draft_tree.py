"""Draft-model token trees, EAGLE-2 style: the draft expands its best nodes level by level, then the best nodes are kept.

``DraftModelProposer(tree=(width, depth))`` builds, per row and per step:

* level 1: ``width`` children of the anchor from the draft's row after the committed tokens;
* levels 2..depth: the ``width`` best nodes of the level above are fed to the draft in one forward (a tree block:
  ``[anchor, every node expanded so far]`` with the ancestor mask, ``mmspec.models.CausalLM.forward(tree=...)``),
  and each gets ``width`` children from its own row;
* the ``budget`` best nodes of the whole tree are verified (the node budget is the window minus the anchor).

Children are the node's top tokens when greedy, and draws without replacement from its processed draft row when
sampling, each with ``q`` = that row minus the earlier siblings, renormalised (``mmspec.tree.DraftTree``).

"Best" is one order over all nodes, by a score that never increases from a node to its children or to its later
siblings, ties broken by creation order (parents and earlier siblings first). Then taking the first ``n`` of any
set keeps parents with their children and siblings as a prefix. Greedy: the score is the draft's path probability
(what EAGLE-2 reranks by). Sampling: keeping a node *because of its own token* biases what is verified (a candidate
kept only when its ``q`` is high is no longer a draw from ``q``), so the score of a child is known before it is
drawn: the parent's path probability times the child's expected draft probability given the earlier siblings,
``sum_x q_j(x) q(x)``. Nothing ranked above a node then depends on its token, and recursive rejection sampling stays
exact (ALGORITHMS section 8; the enumeration tests in tests/test_draft_tree.py decide).

The draft's own chain (the first child of the anchor, its first child, ...) ranks above every other node, so the tree
always holds the chain to its full depth: a greedy tree accepts at least what the chain alone would (on the bundled
text pair this gains at large budgets and costs ~1% at a budget of 15).
"""

from __future__ import annotations

import torch

from ..sampling import sample_categorical

__all__ = ["CHAIN", "children", "child_scores", "best_first", "node_paths"]

#: added to the rank score of the draft's chain (scores are probabilities <= 1 otherwise)
CHAIN = 1.0


def children(rows: torch.Tensor, width: int, greedy: bool, generator=None, draws=None, probs_fn=None):
    """``width`` children of each of R parents, from their processed draft rows.

    Args:
        rows: [B, R, V] processed draft scores of the parents.
        greedy: top tokens (True) or draws without replacement from ``probs_fn(rows)``.
        generator, draws: the sampler's generator and LongTensor [B] (CPU) parents per row that really draw (the
            first ``draws[b]`` of the R; per-row generators draw for those only).
        probs_fn: scores -> probabilities (the logits pipeline's ``probs``), when sampling.
    Returns:
        tokens [B, R, W], q [B, R, W, V] (each child's distribution given its earlier siblings, float64; None when
        greedy), p [B, R, W] (the draft probability of each token, float64), e [B, R, W] (the rank factor: ``p``
        when greedy, the expected draft probability of the slot given the earlier siblings when sampling),
        ok [B, R, W] bool (False: no such child, e.g. top-k left fewer tokens).
    """
    if greedy:
        probs = rows.to(torch.float64).softmax(-1)
        k = min(width, rows.shape[-1])
        p, tokens = probs.topk(k, dim=-1)
        ok = torch.isfinite(rows.gather(-1, tokens))  # forced / masked tokens are never candidates
        if k < width:
            pad = (0, width - k)
            tokens, p, ok = (torch.nn.functional.pad(t, pad) for t in (tokens, p, ok))
        return tokens, None, p, p, ok
    q = probs_fn(rows).to(torch.float64)  # [B, R, V]
    left = q.clone()
    tokens, qs, ps, es, oks = [], [], [], [], []
    for _ in range(width):
        mass = left.sum(-1, keepdim=True)
        qj = torch.where(mass > 0, left / mass.clamp_min(1e-300), q)
        c = sample_categorical(qj, generator, draws)  # [B, R]
        tokens.append(c), qs.append(qj), oks.append(mass.squeeze(-1) > 0)
        es.append((qj * q).sum(-1))
        ps.append(q.gather(-1, c.unsqueeze(-1)).squeeze(-1))
        left = left.scatter(-1, c.unsqueeze(-1), 0.0)
    return (torch.stack(tokens, -1), torch.stack(qs, 2), torch.stack(ps, -1), torch.stack(es, -1),
            torch.stack(oks, -1))


def child_scores(parent_path: torch.Tensor, parent_score: torch.Tensor, p: torch.Tensor, e: torch.Tensor):
    """Path probabilities and rank scores of children.

    Args:
        parent_path, parent_score: [B, R] the parents' path probabilities and rank scores (the anchor: 1 and
            ``CHAIN + 1``).
        p, e: [B, R, W] from ``children``.
    Returns:
        (path [B, R, W], score [B, R, W]): ``path = parent_path * p``; ``score = parent_path * e``, cut so that it
        never exceeds the parent's score nor an earlier sibling's, plus ``CHAIN`` for the first child of a node on
        the draft's chain (the anchor's first child, its first child, ...): the chain ranks above every other node.
    """
    score = (parent_path.unsqueeze(-1) * e).cummin(-1).values
    first = torch.arange(score.shape[-1], device=score.device) == 0
    score = torch.where(first & (parent_score.unsqueeze(-1) > CHAIN), score + CHAIN, score)
    return parent_path.unsqueeze(-1) * p, torch.minimum(score, parent_score.unsqueeze(-1))


def best_first(score: torch.Tensor, ok: torch.Tensor, count: torch.Tensor, size: int | None = None):
    """The ``count[b]`` best usable nodes per row, best first.

    Args:
        score: [B, M] rank scores (>= 0), nodes in creation order.
        ok: [B, M] bool, usable nodes.
        count: LongTensor [B] (CPU) how many to take (at most the usable ones).
        size: the number of columns returned (default: the largest number taken), <= M.
    Returns:
        (index [B, n] distinct node indices, taken [B, n] bool on the CPU): ties go to the earlier node (a stable
        sort), so a parent comes before its children.
    """
    key = torch.where(ok, score, -1.0)
    order = key.sort(dim=-1, descending=True, stable=True).indices
    n_ok = ok.sum(-1).cpu()
    taken_count = torch.minimum(count, n_ok)
    n = size if size is not None else int(taken_count.max())
    taken = torch.arange(n) < taken_count.unsqueeze(1)
    return order[:, :n], taken


def node_paths(tokens: torch.Tensor, parents: torch.Tensor, index: torch.Tensor, level: int) -> torch.Tensor:
    """Tokens from the anchor's child down to each of the given nodes: [B, R, level] for nodes ``index`` [B, R] of
    depth ``level`` (``tokens``, ``parents`` [B, M] over all nodes, parents -1 at the anchor's children)."""
    out = [tokens.gather(1, index)]
    node = index
    for _ in range(level - 1):
        node = parents.gather(1, node).clamp_min(0)
        out.append(tokens.gather(1, node))
    return torch.stack(out[::-1], -1)
