"""Lookahead decoding (Fu et al. 2024): Jacobi iterations feed an n-gram pool whose matches are verified.

Plain Jacobi on text rarely converges: the window's drafts are the target's predictions after *guessed*
tokens, and one wrong guess spoils everything after it. Lookahead keeps those iterations but reads them
differently: each iteration's outputs, stacked on the previous iterations' tokens at the positions before
them (the 2-D window), form n-grams -- ``(x^{t-N+2}_{p-N+2}, ..., x^t_p, y^{t+1}_{p+1})``, each token the
model's prediction after the one before it in an earlier iteration. The n-grams go into a pool keyed by
their first token; when the last committed token is a key, its best continuation is the draft.

Here the lookahead branch and the verification branch share the loop's single block (one target forward
per step, no custom attention mask yet): the block is ``[anchor, candidate (N-1 tokens), Jacobi slots]``.
The Jacobi slots are the previous iteration's predictions at those positions (they are also verified, so
a converged tail is accepted too); slots without one continue the candidate through the pool, else repeat.
With ``tree=(width, depth)`` the pool's next ``width - 1`` candidates (first ``depth`` tokens each) join the block as
sibling branches, merged into a trie with the chain (shared prefixes are one node), out of the same window.

The pool also takes every n-gram of the committed text (prompt and accepted tokens), which are exact.
All drafts are deterministic given the past (one-hot ``q``), so the exact criterion stays exact.
"""

from __future__ import annotations

import torch

from ..tree import DraftTree, closest_rows, parse_tree
from ..verify import take_rows
from .base import Proposer

__all__ = ["LookaheadProposer", "NGramPool", "lookahead_config", "rank_candidates", "DEFAULT_LOOKAHEAD"]

#: (window, ngram, pool): Jacobi slots per step, n-gram length, continuations kept per first token. The
#: paper's 7B setting is (15, 5, 15); small models pay more per verified token, so the default is smaller.
DEFAULT_LOOKAHEAD = (7, 4, 7)


def lookahead_config(lookahead, window):
    """Validate ``lookahead=(window, ngram, pool)`` against ``generate``'s ``window``.

    Returns ``((W, N, G), W + 1)``: the proposer's arguments and the verified block length.
    """
    if lookahead is None:
        W = DEFAULT_LOOKAHEAD[0] if window is None else window - 1
        lookahead = (W, *DEFAULT_LOOKAHEAD[1:])
    if not isinstance(lookahead, (tuple, list)) or len(lookahead) != 3:
        raise ValueError(f"`lookahead` must be (window, ngram, pool), got {lookahead!r}.")
    names = ("lookahead window", "lookahead ngram", "lookahead pool")
    for value, name, low in zip(lookahead, names, (1, 2, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    W = lookahead[0]
    if window is not None and window != W + 1:
        raise ValueError(f"`window` ({window}) must be lookahead window + 1 ({W + 1}) for method='lookahead'.")
    return tuple(lookahead), W + 1


class NGramPool:
    """N-grams of one row keyed by first token: ``{token: {continuation tuple: score}}``, at most ``size``
    continuations per token (the least recently seen one is evicted). Re-seeing an n-gram adds ``weight`` to
    its score and makes it the most recent. When the token before the n-gram is known (``context``), the
    n-gram is also filed under ``(context, first)``, so that candidates seen in the same context rank first."""

    def __init__(self, size: int):
        self.size = size
        self.table: dict = {}

    def add(self, first: int, continuation: tuple, weight: float = 1.0, context: int | None = None) -> None:
        for key in (first,) if context is None else (first, (context, first)):
            entry = self.table.setdefault(key, {})
            entry[continuation] = entry.pop(continuation, 0.0) + weight
            if len(entry) > self.size:
                del entry[next(iter(entry))]

    def get(self, key) -> dict:
        return self.table.get(key, {})


def rank_candidates(pool: NGramPool, token: int, limit: int, context: int | None = None) -> list[tuple]:
    """The pool's continuations after ``token``, best first: those seen after ``context`` (the token before
    ``token``) first, then the rest; within each group highest score, then most recent; at most ``limit``.
    (The loop verifies the first; token trees will verify several as sibling branches.)"""
    out = []
    for key in (token,) if context is None else ((context, token), token):
        ranked = sorted(enumerate(pool.get(key).items()), key=lambda e: (e[1][1], e[0]), reverse=True)
        out += [cont for _, (cont, _) in ranked if cont not in out]
    return out[:limit]


class LookaheadProposer(Proposer):
    """Lookahead decoding as a proposer: a Jacobi window plus an n-gram pool per row.

    Args:
        window: Jacobi slots per step (the verified block is ``window + 1`` tokens).
        ngram: n-gram length N (candidates are ``N - 1`` tokens after the current one).
        pool: continuations kept per first token.
        committed_weight: score of an n-gram of the committed text relative to a lookahead n-gram (1.0).
        tree: ``(width, depth)``: besides the best candidate (which the Jacobi slots continue), the next
            ``width - 1`` candidates, cut to ``depth`` tokens, are verified as sibling branches; their nodes come
            out of ``window`` (the Jacobi slots shrink by ``(width - 1) * depth``). None: one candidate.
    """

    def __init__(self, window: int, ngram: int, pool: int, committed_weight: float = 1.0, tree=None):
        (self.window, self.ngram, self.pool_size), _ = lookahead_config((window, ngram, pool), None)
        self.committed_weight = committed_weight
        self.tree = parse_tree(tree)
        self.chain = window
        if self.tree is not None:
            width, depth = self.tree
            self.chain = window - (width - 1) * depth
            if self.chain < max(depth, 1):
                raise ValueError(f"tree={tree!r} takes {(width - 1) * depth} of the lookahead window's {window} "
                                 f"slots and leaves {self.chain} for the chain; use a lookahead window >= "
                                 f"{(width - 1) * depth + depth}.")

    def start(self, state):
        B = state.batch_size
        self.pools = [NGramPool(self.pool_size) for _ in range(B)]
        self._seen = torch.zeros(B, dtype=torch.long)  # committed tokens already added to the pool, per row
        self._add_committed(state)
        self.guess = torch.zeros(B, self.window, dtype=torch.long)  # Jacobi slots after the anchor
        self.count = torch.zeros(B, dtype=torch.long)  # how many slots hold a real prediction
        self.levels = []  # previous iterations: (first position [B], block tokens [B, K + 1]), newest first
        self.candidates_used = 0

    def _add_committed(self, state):
        """Add the n-grams of each row's committed text that end after what was added before."""
        N = self.ngram
        tokens, valid = state.tokens, state.valid
        for b in range(state.batch_size):
            end = int(state.lengths[b])
            begin = max(int((~valid[b, :end]).sum()), int(self._seen[b]) - N + 1)  # skip left padding
            row = tokens[b, begin:end].tolist()
            for i in range(len(row) - N + 1):
                self.pools[b].add(row[i], tuple(row[i + 1:i + N]), self.committed_weight, row[i - 1] if i else None)
            self._seen[b] = end

    def propose(self, state, max_tokens):
        K = min(self.chain, max_tokens)
        B = state.batch_size
        before, anchors = state.last_tokens(2).T.tolist()
        drafts = torch.zeros(B, K, dtype=torch.long)
        guess, count = self.guess.tolist(), self.count.tolist()
        for b in range(B):
            if K == 0 or not bool(state.active[b]):
                continue
            row = []
            best = rank_candidates(self.pools[b], anchors[b], 1, before[b])
            if best:
                row.extend(best[0][:K])
                self.candidates_used += 1
            # Jacobi slots keep their prediction; empty ones continue through the pool, else repeat.
            while len(row) < K:
                j = len(row)
                if j < count[b]:
                    row.append(guess[b][j])
                    continue
                last = row[-1] if row else anchors[b]
                context = row[-2] if len(row) > 1 else anchors[b] if row else before[b]
                more = rank_candidates(self.pools[b], last, 1, context)
                row.extend(more[0][: K - j] if more else [last])
            drafts[b] = torch.tensor(row)
        self._start = state.lengths - 1  # position of the anchor in ``state.tokens``
        self._block = torch.cat([torch.tensor(anchors).unsqueeze(1), drafts], dim=1)
        self._active = state.active.clone()
        self._tree = None
        if self.tree is not None and K > 0:
            self._tree = self._branches(state, drafts, anchors, before, min(self.tree[1], K))
            if self._tree is not None:
                return self._tree
        return drafts.to(state.device), None

    def _branches(self, state, drafts, anchors, before, depth):
        """The chain ``drafts`` [B, K] plus the pool's next candidates as branches, merged into a trie (a node per
        distinct (parent, token)) -> a ``DraftTree`` (the chain first), or None when no row has another candidate."""
        B, K = drafts.shape
        width = self.tree[0]
        rows = []
        for b in range(B):
            chain = drafts[b].tolist()
            tokens, parents = list(chain), list(range(-1, K - 1))
            child = {(p, t): i for i, (p, t) in enumerate(zip(parents, tokens))}
            if bool(state.active[b]):
                for cand in rank_candidates(self.pools[b], anchors[b], width, before[b])[1:]:
                    node = -1
                    for t in cand[:depth]:
                        if (node, t) not in child:
                            child[(node, t)] = len(tokens)
                            tokens.append(t), parents.append(node)
                        node = child[(node, t)]
            rows.append((tokens, parents))
        N = max(len(t) for t, _ in rows)
        if N == K:
            return None
        tokens = torch.zeros(B, N, dtype=torch.long)
        parents = torch.full((B, N), -1, dtype=torch.long)
        valid = torch.zeros(B, N, dtype=torch.bool)
        for b, (t, p) in enumerate(rows):
            tokens[b, : len(t)], parents[b, : len(p)], valid[b, : len(t)] = torch.tensor(t), torch.tensor(p), True
        dev = state.device
        return DraftTree(tokens.to(dev), parents.to(dev), None, valid, depth=K, width=width)

    def update(self, state, result, target_rows, num_accepted):
        guess_rows = target_rows
        if self._tree is not None:  # the chain's rows feed the pool; the Jacobi slots continue the accepted branch
            K = self._block.shape[1] - 1
            index = closest_rows(self._tree, result.tokens, K + 1)
            guess_rows = take_rows(target_rows, index)
            target_rows = target_rows[:, : K + 1]
        B, K1, _ = target_rows.shape
        K = K1 - 1
        out = target_rows.argmax(-1).cpu()  # [B, K+1]: the model's next token after each block position
        self._add_lookahead(state, out)
        self._add_committed(state)
        # Jacobi: slots after the new anchor take the predictions made at their positions this step.
        src = num_accepted.unsqueeze(1) + 1 + torch.arange(self.window)
        self.count = (src <= K).sum(-1)
        guess = guess_rows.argmax(-1).cpu() if guess_rows is not target_rows else out
        self.guess = guess.gather(1, src.clamp(max=K)) if K > 0 else torch.zeros(B, self.window, dtype=torch.long)

    def _add_lookahead(self, state, out):
        """Diagonal n-grams of the 2-D window: for the output after block position p, the tokens at p - d
        of the iteration d steps back (committed text where p - d is committed; this iteration's token where
        no earlier iteration reached p - d)."""
        N, block, start = self.ngram, self._block, self._start
        levels = [(start, block)] + self.levels  # newest first
        for b in range(block.shape[0]):
            if not bool(self._active[b]):
                continue
            s0 = int(start[b])
            rows = [(int(s[b]), blk[b].tolist()) for s, blk in levels]
            committed = state.tokens[b, max(0, s0 - N + 1): s0 + 1].tolist()
            c0 = s0 + 1 - len(committed)
            outs = out[b].tolist()
            for j in range(len(outs)):
                p = s0 + j  # position of the input token; outs[j] is predicted for p + 1
                gram = [outs[j]]
                for d in range(N):  # N - 1 tokens before the output, then one of context
                    q = p - d
                    if q <= s0:
                        if q < c0:
                            break
                        gram.append(committed[q - c0])
                        continue
                    s, toks = rows[d] if d < len(rows) and 0 <= q - rows[d][0] < len(rows[d][1]) else rows[0]
                    gram.append(toks[q - s])
                if len(gram) >= N:
                    context = gram[N] if len(gram) > N else None
                    gram = gram[N - 1::-1]
                    self.pools[b].add(gram[0], tuple(gram[1:]), 1.0, context)
        self.levels = levels[: N - 2]
