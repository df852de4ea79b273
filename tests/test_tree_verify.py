"""``mmspec.verify_tree`` on its own: the three sibling rules are exact, a wrong rule is caught, greedy, shapes.

Setup: a vocabulary of V = 5, a fixed target row ``p0`` at the anchor and a fixed row ``p_t`` for each first token
``t`` (what the target would say after it). Every test draws N = 40,000 rows as one batch (one tree per row) and
checks by chi-square at alpha = 0.001 that the first emitted token follows ``p0`` and, where the path continues
through a node, that the second emitted token follows that node's row. A sampler that does not update the
residual between siblings must fail the same test.
"""

import pytest
import torch
from scipy.stats import chisquare

from mmspec.tree import DraftTree, block_ancestors, block_depth, block_parents, parse_tree, sibling_rank
from mmspec.verify import verify, verify_tree

V, N, ALPHA = 5, 40_000, 1e-3
G = torch.Generator().manual_seed(0)
P0 = torch.tensor([0.35, 0.25, 0.2, 0.15, 0.05], dtype=torch.float64)
PT = torch.softmax(torch.randn(V, V, generator=G, dtype=torch.float64) * 1.5, -1)  # row after first token t
Q = torch.tensor([0.1, 0.4, 0.3, 0.1, 0.1], dtype=torch.float64)  # the draft's row for first-level siblings


def _pvalue(samples, probs):
    observed = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs * observed.sum()
    assert float(observed[expected == 0].sum()) == 0, "sampled an outcome of probability zero"
    keep = expected > 0
    return chisquare(observed[keep].numpy(), expected[keep].numpy()).pvalue


def _tree(first, second_parent_rank=0, rows=N):
    """A tree of w first-level siblings ``first`` [rows, w] plus one deterministic child (token 0) under the
    sibling of rank ``second_parent_rank``."""
    w = first.shape[1]
    tokens = torch.cat([first, torch.zeros(rows, 1, dtype=torch.long)], 1)
    parents = torch.tensor([-1] * w + [second_parent_rank]).expand(rows, -1).contiguous()
    return tokens, parents


def _target(tokens):
    """[rows, N+1, V]: p0 at the anchor, PT[token] under each node."""
    return torch.cat([P0.expand(tokens.shape[0], 1, V), PT[tokens]], 1)


def _check(result, tokens):
    first, second = result.tokens[:, 0], result.tokens[:, 1]
    assert _pvalue(first, P0) > ALPHA
    continued = result.num_accepted >= 1
    for t in range(V):
        sel = continued & (first == t) & (second >= 0)
        if int(sel.sum()) > 500:
            assert _pvalue(second[sel], PT[t]) > ALPHA, f"second token after {t}"
    return continued.float().mean()


def _draw_without_replacement(q, w, gen):
    """w distinct tokens per row from q, each from q with the earlier ones removed -> tokens, their q rows."""
    rows = q.expand(N, V).clone()
    tokens, probs = [], []
    for _ in range(w):
        probs.append(rows / rows.sum(-1, keepdim=True))
        t = torch.multinomial(probs[-1], 1, generator=gen).squeeze(1)
        tokens.append(t)
        rows = rows.scatter(1, t.unsqueeze(1), 0.0)
    return torch.stack(tokens, 1), torch.stack(probs, 1)


def test_one_hot_siblings_exact():
    first = torch.tensor([[1, 3, 0]]).expand(N, 3)
    tokens, parents = _tree(first)
    tree = DraftTree(tokens, parents, None, torch.ones(N, 4, dtype=torch.bool), depth=2, width=3)
    res = verify_tree(tree, _target(tokens), "exact", torch.Generator().manual_seed(1))
    assert 0.3 < _check(res, tokens) < 1.0


def test_without_replacement_siblings_exact():
    gen = torch.Generator().manual_seed(2)
    first, q = _draw_without_replacement(Q, 3, gen)
    tokens, parents = _tree(first)
    probs = torch.cat([q, torch.nn.functional.one_hot(torch.zeros(N, 1, dtype=torch.long), V).double()], 1)
    tree = DraftTree(tokens, parents, probs, torch.ones(N, 4, dtype=torch.bool), depth=2, width=3)
    res = verify_tree(tree, _target(tokens), "exact", torch.Generator().manual_seed(3))
    _check(res, tokens)
    # a later sibling is accepted sometimes (the tree is doing work)
    assert bool((res.path[:, 0] >= 1).any())


def test_iid_siblings_exact():
    gen = torch.Generator().manual_seed(4)
    first = torch.multinomial(Q.expand(N, V), 2, replacement=True, generator=gen)
    tokens, parents = _tree(first)
    probs = torch.cat([Q.expand(N, 2, V), torch.nn.functional.one_hot(torch.zeros(N, 1, dtype=torch.long), V)], 1)
    tree = DraftTree(tokens, parents, probs.double(), torch.ones(N, 3, dtype=torch.bool), depth=2, width=2)
    _check(verify_tree(tree, _target(tokens), "exact", torch.Generator().manual_seed(5)), tokens)


def test_residual_not_updated_between_siblings_is_caught():
    """The classic mistake: test every sibling against the full p (not the running residual)."""
    from mmspec.acceptance import Criterion

    class Stale(Criterion):
        name = "stale"

        def __init__(self):
            self.p = None

        def acceptance(self, x, q, p):
            return (self.p.gather(-1, x.unsqueeze(-1)).squeeze(-1)).clamp(0, 1)

        def residual(self, x, q, p):
            return p.scatter(-1, x.unsqueeze(-1), 0.0)

    first = torch.tensor([[1, 3, 0]]).expand(N, 3)
    tokens, parents = _tree(first)
    tree = DraftTree(tokens, parents, None, torch.ones(N, 4, dtype=torch.bool), depth=2, width=3)
    crit = Stale()
    crit.p = _target(tokens)  # acceptance always against the untouched rows
    res = verify_tree(tree, crit.p, crit, torch.Generator().manual_seed(6))
    assert _pvalue(res.tokens[:, 0], P0) < 1e-6


def test_greedy_accepts_argmax_child_and_chain_matches_verify():
    gen = torch.Generator().manual_seed(7)
    B, K = 64, 6
    rows = torch.randn(B, K + 1, V, generator=gen)
    best = rows.argmax(-1)
    drafts = torch.where(torch.rand(B, K, generator=gen) < 0.7, best[:, :K], (best[:, :K] + 1) % V)
    chain = verify(drafts, None, rows, greedy=True)
    tree = verify_tree(DraftTree.chain(drafts), rows, greedy=True)
    assert torch.equal(chain.tokens, tree.tokens) and torch.equal(chain.num_accepted, tree.num_accepted)
    # with a wrong first sibling and the right second one, greedy descends into the second
    scores = torch.zeros(1, 4, V)
    scores[0, 0, 2] = 1  # anchor: argmax 2
    scores[0, 2, 4] = 1  # under node 1 (token 2): argmax 4
    t = DraftTree(torch.tensor([[1, 2, 4]]), torch.tensor([[-1, -1, 1]]), None, torch.ones(1, 3, dtype=torch.bool),
                  depth=2, width=2)
    r = verify_tree(t, scores, greedy=True)
    assert r.tokens.tolist() == [[2, 4, 0]] and r.path.tolist() == [[1, 2]]


def test_unused_nodes_are_never_accepted():
    scores = torch.zeros(1, 3, V)
    scores[0, 0, 2] = 1
    t = DraftTree(torch.tensor([[2, 2]]), torch.tensor([[-1, -1]]), None, torch.tensor([[False, True]]),
                  depth=1, width=2)
    r = verify_tree(t, scores, greedy=True)
    assert r.path.tolist() == [[1]] and r.accepted.tolist() == [[False, True]]


def test_tree_helpers():
    parents = torch.tensor([[-1, -1, 0, 2, 0]])
    bp = block_parents(parents)
    assert bp.tolist() == [[-1, 0, 0, 1, 3, 1]]
    assert block_depth(bp, 3).tolist() == [[0, 1, 1, 2, 3, 2]]
    anc = block_ancestors(bp, 3)[0]
    assert anc[4].nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert not anc[2, 1] and not anc[5, 3]  # siblings never see each other's branch
    assert sibling_rank(parents, torch.ones(1, 5, dtype=torch.bool)).tolist() == [[0, 1, 0, 0, 1]]
    assert parse_tree(None) is None and parse_tree((3, 4)) == (3, 4)
    for bad in [(0, 3), (2, 0), (2,), "3x3", (2.0, 3)]:
        with pytest.raises(ValueError, match="tree"):
            parse_tree(bad)


def test_greedy_path_of_deep_random_trees_matches_a_walk():
    """The accepted path through trees up to 24 levels deep (the path is followed by pointer doubling) equals a
    walk from the anchor that descends into the first child, in sibling order, whose token is its parent's argmax."""
    gen = torch.Generator().manual_seed(11)
    B, n = 32, 30
    parents = torch.full((B, n), -1)
    for b in range(B):
        for i in range(1, n):  # mostly chains (deep), sometimes a branch off an earlier node
            parents[b, i] = i - 1 if torch.rand(1, generator=gen) < 0.8 else torch.randint(-1, i, (1,), generator=gen)
    valid = torch.rand(B, n, generator=gen) < 0.95
    rows = torch.randn(B, n + 1, V, generator=gen)
    best = rows.argmax(-1)
    # a node's token: its parent's argmax (block row parent + 1) 80% of the time
    tokens = torch.where(torch.rand(B, n, generator=gen) < 0.8, best.gather(1, parents + 1),
                         (best.gather(1, parents + 1) + 1) % V)
    depth = block_depth(block_parents(parents), n)[:, 1:]
    width = int(sibling_rank(parents, valid).max()) + 1
    tree = DraftTree(tokens, parents, None, valid, depth=int(depth.max()), width=width)
    assert tree.depth >= 12
    res = verify_tree(tree, rows, greedy=True)
    for b in range(B):
        path, at = [], -1
        while True:
            kids = [i for i in range(n) if parents[b, i] == at and valid[b, i]]
            nxt = next((i for i in kids if tokens[b, i] == best[b, at + 1]), None)
            if nxt is None:
                break
            path.append(nxt)
            at = nxt
        assert res.path[b, : len(path)].tolist() == path and int(res.num_accepted[b]) == len(path)
        assert res.accepted[b].nonzero().flatten().tolist() == sorted(path)
        assert int(res.next_token[b]) == int(best[b, at + 1])


def test_block_depth_and_ancestors_of_deep_random_trees_match_a_walk():
    """Pointer doubling gives what walking up one parent at a time gives, at any bound >= the true depth; a tree
    computes them once, and its stacked copy (a guided forward's rows) carries them over."""
    gen = torch.Generator().manual_seed(5)
    for n in (1, 2, 7, 33):
        parents = torch.full((4, n), -1)
        for b in range(4):
            for i in range(1, n):
                parents[b, i] = i - 1 if torch.rand(1, generator=gen) < 0.75 else torch.randint(-1, i, (1,), generator=gen)
        bp = block_parents(parents)
        want_depth, want_anc = torch.zeros_like(bp), torch.zeros(4, n + 1, n + 1, dtype=torch.bool)
        for b in range(4):
            for i in range(n + 1):
                j = i
                while j >= 0:
                    want_anc[b, i, j] = True
                    want_depth[b, i] += j != i
                    j = int(bp[b, j])
        d = int(want_depth.max())
        for bound in (d, d + 1, d + 9):
            assert torch.equal(block_depth(bp, bound), want_depth) and torch.equal(block_ancestors(bp, bound), want_anc)
        tree = DraftTree(torch.zeros(4, n, dtype=torch.long), parents, None, torch.ones(4, n, dtype=torch.bool),
                         depth=d, width=int(sibling_rank(parents, torch.ones(4, n, dtype=torch.bool)).max()) + 1)
        assert torch.equal(tree.depths(), want_depth) and tree.depths() is tree.depths()
        two = tree.stacked(2)
        assert two.parents.shape == (8, n) and two.probs is None
        assert torch.equal(two.ancestors(), torch.cat([want_anc, want_anc]))
        assert torch.equal(two.node_depth(), torch.cat([want_depth, want_depth])[:, 1:])
