"""Prompt lookup: propose the continuation of an earlier occurrence of the last n tokens.

Among the occurrences, the one with the longest continuation (up to the draft length) wins, the latest on
ties: the most recent context when several can fill the whole window, else the longest draft available.
(Always taking the latest occurrence gives short drafts in repetitive text, where it sits just before the
end; always taking the earliest, as transformers does, ignores recency. On held-out code with the zoo
text model this choice needs fewer target forwards than either.) ``match="earliest"`` is transformers'
rule instead (the longest n-gram, then its first occurrence with any continuation): with ``max_ngram=2`` it
proposes exactly the drafts of ``model.generate(prompt_lookup_num_tokens=K)``, which makes the two loops
comparable step for step.

Deterministic drafts (one-hot ``q``), so exact acceptance stays exact. Vectorised over the batch, in numpy
on the CPU copy of the committed tokens; rows without a match get a shorter (or empty) draft,
padded with -1 so the batch shares one window while each row verifies only its own drafts. A row's draft
length cap is its own (``row_limits``), so its matches and drafts are those it would get alone.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tree import DraftTree, parse_tree
from .base import Proposer, row_limits

__all__ = ["LookupProposer"]


class LookupProposer(Proposer):
    """Prompt / n-gram lookup (Saxena 2023; transformers' ``prompt_lookup_num_tokens``).

    Args:
        num_drafts: most tokens proposed per step.
        max_ngram: longest n-gram to match (tries ``max_ngram`` down to ``min_ngram``).
        min_ngram: shortest n-gram to match.
        match: among the occurrences of the longest matching n-gram, ``"longest"`` takes the one with the
            longest continuation, the latest on ties (default); ``"earliest"`` the first one (transformers' rule).
        tree: ``(width, depth)``: up to ``width`` matches with different first tokens as sibling branches.
    """

    MATCHES = ("longest", "earliest")

    def __init__(self, num_drafts: int, max_ngram: int = 3, min_ngram: int = 1, tree=None, match: str = "longest"):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}.")
        if match not in self.MATCHES:
            raise ValueError(f"`lookup_match` must be one of {self.MATCHES}, got {match!r}.")
        self.match = match
        self.num_drafts, self.max_ngram, self.min_ngram = num_drafts, max_ngram, min_ngram
        self.tree = parse_tree(tree)
        if self.tree is not None and self.tree[0] * self.tree[1] > num_drafts:
            raise ValueError(
                f"tree={tree!r} has {self.tree[0] * self.tree[1]} nodes but the window allows {num_drafts} drafts; "
                f"use window >= {self.tree[0] * self.tree[1] + 1}."
            )

    def _matches(self, state, K, cap):
        """Every usable match in one pass -> numpy (score [B, P], continuation length [B, P]) over the continuation
        starts ``s = 0..P-1``, where a higher score is a longer n-gram (up to ``max_ngram``) ending right before
        ``s``, then a longer continuation (up to K, and ``cap[b]`` [B] in row b), then a later start (``match=
        "earliest"``: then an earlier start, whatever the continuation's length); -1 where nothing usable matches.
        Host-side integer work on the committed tokens, in numpy (a few microseconds)."""
        N, B = self.max_ngram, state.batch_size
        end = state.lengths.numpy()
        P = int(end.max())  # nothing after the longest row's committed tokens can match
        tokens = np.full((B, N + P), -1, dtype=np.int64)  # N invalid columns in front: every start has N before it
        valid = np.zeros((B, N + P), dtype=bool)
        tokens[:, N:], valid[:, N:] = state.tokens[:, :P].numpy(), state.valid[:, :P].numpy()
        rows, last = np.arange(B)[:, None], end[:, None] + np.arange(N)  # the last N committed tokens (padded index)
        pattern = np.where(valid[rows, last], tokens[rows, last], -2)  # [B, N]
        # the n-gram match length at s counts equal tokens backwards from s - 1
        ngram, run = np.zeros((B, P), dtype=np.int64), np.ones((B, P), dtype=bool)
        for k in range(1, N + 1):  # token s - k against the k-th last
            run &= (tokens[:, N - k : N - k + P] == pattern[:, N - k, None]) & valid[:, N - k : N - k + P]
            ngram += run
        start = np.arange(P)
        available = np.minimum(end[:, None] - start, cap[:, None])  # continuation length
        ok = (ngram >= self.min_ngram) & (available > 0)
        if self.match == "earliest":
            score = ngram * P + (P - 1 - start)
        else:
            score = (ngram * (K + 1) + available) * P + start
        return np.where(ok, score, -1), np.maximum(available, 0)

    def propose(self, state, max_tokens):
        if self.tree is not None:
            return self._propose_tree(state, max_tokens)
        K = min(self.num_drafts, max_tokens)
        if K <= 0:
            return torch.empty(state.batch_size, 0, dtype=torch.long, device=state.device), None
        score, available = self._matches(state, K, row_limits(state, K).numpy())
        rows = np.arange(state.batch_size)
        best = score.argmax(-1)  # the longest n-gram, then the longest continuation, then the latest
        # (finished rows have no usable match: their cap is 0)
        length = np.where(score[rows, best] >= 0, available[rows, best], 0)
        K = int(length.max())
        idx = np.minimum(best[:, None] + np.arange(K), state.tokens.shape[1] - 1)  # the continuation
        drafts = np.where(np.arange(K) < length[:, None], state.tokens.numpy()[rows[:, None], idx], -1)
        return torch.from_numpy(drafts).to(state.device), None

    def _propose_tree(self, state, max_tokens):
        """Up to ``width`` continuations with different first tokens, each a branch of up to ``depth`` tokens."""
        width, depth = self.tree
        D = min(depth, max_tokens)
        B, tokens = state.batch_size, state.tokens
        if D <= 0:
            return torch.empty(B, 0, dtype=torch.long, device=state.device), None
        score, avail = map(torch.from_numpy, self._matches(state, D, row_limits(state, D).numpy()))
        start = torch.arange(score.shape[1]).expand_as(score)
        branch_start, branch_len = [], []
        for _ in range(width):  # best remaining match, then drop every match with the same first token
            best = score.max(-1)
            found = (best.values >= 0) & state.active
            s = start.gather(1, best.indices.unsqueeze(1)).squeeze(1)
            branch_start.append(s)
            branch_len.append(torch.where(found, avail.gather(1, best.indices.unsqueeze(1)).squeeze(1), 0))
            first = tokens.gather(1, s.clamp(max=tokens.shape[1] - 1).unsqueeze(1))
            same = tokens.gather(1, start.clamp(max=tokens.shape[1] - 1)) == first
            score = torch.where(same | ~found.unsqueeze(1), -1, score)
        if not branch_len or int(torch.stack(branch_len).max()) == 0:
            return torch.empty(B, 0, dtype=torch.long, device=state.device), None
        W = len(branch_len)
        lengths = torch.stack(branch_len, 1)  # [B, W]
        D = int(lengths.max())
        offs = torch.arange(D)
        idx = torch.stack(branch_start, 1).unsqueeze(-1) + offs  # [B, W, D]
        node_tokens = tokens.gather(1, idx.view(B, -1).clamp(max=tokens.shape[1] - 1))  # [B, W * D]
        valid = (offs < lengths.unsqueeze(-1)).view(B, -1)
        node = torch.arange(W * D).view(W, D)
        parents = torch.where(offs == 0, -1, node - 1).view(-1).expand(B, -1).contiguous()
        return DraftTree(node_tokens.to(state.device), parents.to(state.device), None, valid, depth=D, width=W)
