"""Prompt lookup: propose the continuation of an earlier occurrence of the last n tokens.

Among the occurrences, the one with the longest continuation (up to the draft length) wins, the latest on
ties: the most recent context when several can fill the whole window, else the longest draft available.
(Always taking the latest occurrence gives short drafts in repetitive text, where it sits just before the
end; always taking the earliest, as transformers does, ignores recency. On held-out code with the zoo
text model this choice needs fewer target forwards than either.) ``match="earliest"`` is transformers'
rule instead (the longest n-gram, then its first occurrence with any continuation): with ``max_ngram=2`` it
proposes exactly the drafts of ``model.generate(prompt_lookup_num_tokens=K)``, which makes the two loops
comparable step for step.

Deterministic drafts (one-hot ``q``), so exact acceptance stays exact. Host-side work on each row's committed
tokens as a Python list (``DecodeState.token_lists``); rows without a match get a shorter (or empty) draft,
padded with -1 so the batch shares one window while each row verifies only its own drafts. A row's draft
length cap is its own (``row_limits``), so its matches and drafts are those it would get alone.
"""

from __future__ import annotations

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

    def _candidates(self, seq: list, cap: int) -> list[tuple[tuple, int, int]]:
        """Every usable match in one row -> [(key, start, length)]: ``start`` is where a continuation begins in
        ``seq`` (the row's tokens), ``length`` its usable length (up to ``cap``), ``key`` orders them (higher is
        better): a longer n-gram (up to ``max_ngram``) ending right before ``start``, then a longer continuation,
        then a later start (``match="earliest"``: then an earlier start, whatever the continuation's length).

        Host-side work on a Python list: ``list.index`` finds each occurrence of the row's last token at C speed,
        and only those are extended backwards (cheaper than array ops on a few hundred tokens, each of which pays
        for the CPU caches a forward has flushed)."""
        E, N = len(seq), self.max_ngram
        if cap <= 0 or E < 2:
            return []
        last, out, i = seq[-1], [], -1
        while True:
            try:
                i = seq.index(last, i + 1, E - 1)  # an earlier occurrence: its continuation starts at i + 1 < E
            except ValueError:
                return out
            start, n = i + 1, 1
            while n < N and n < start and seq[start - 1 - n] == seq[E - 1 - n]:
                n += 1
            if n >= self.min_ngram:
                length = min(E - start, cap)
                key = (n, -start) if self.match == "earliest" else (n, length, start)
                out.append((key, start, length))

    def propose(self, state, max_tokens):
        if self.tree is not None:
            return self._propose_tree(state, max_tokens)
        K = min(self.num_drafts, max_tokens)
        if K <= 0:
            return torch.empty(state.batch_size, 0, dtype=torch.long, device=state.device), None
        drafts = []
        for seq, cap in zip(state.token_lists(), row_limits(state, K).tolist()):
            found = self._candidates(seq, cap)
            _, start, length = max(found) if found else (None, 0, 0)
            drafts.append(seq[start : start + length])
        K = max(map(len, drafts))
        padded = torch.tensor([d + [-1] * (K - len(d)) for d in drafts], dtype=torch.long)
        return padded.view(state.batch_size, K).to(state.device), None

    def _propose_tree(self, state, max_tokens):
        """Up to ``width`` continuations with different first tokens, each a branch of up to ``depth`` tokens."""
        width, depth = self.tree
        D = min(depth, max_tokens)
        B = state.batch_size
        if D <= 0:
            return torch.empty(B, 0, dtype=torch.long, device=state.device), None
        branches = []  # per row: up to ``width`` token lists
        for seq, cap in zip(state.token_lists(), row_limits(state, D).tolist()):
            row, firsts = [], set()
            for _, start, length in sorted(self._candidates(seq, cap), reverse=True):
                if seq[start] not in firsts:  # the best match per first token
                    firsts.add(seq[start])
                    row.append(seq[start : start + length])
                    if len(row) == width:
                        break
            branches.append(row)
        D = max((len(b) for row in branches for b in row), default=0)
        if D == 0:
            return torch.empty(B, 0, dtype=torch.long, device=state.device), None
        W = width
        node_tokens = torch.zeros(B, W * D, dtype=torch.long)
        valid = torch.zeros(B, W * D, dtype=torch.bool)
        for b, row in enumerate(branches):
            for w, branch in enumerate(row):
                node_tokens[b, w * D : w * D + len(branch)] = torch.tensor(branch)
                valid[b, w * D : w * D + len(branch)] = True
        offs = torch.arange(D)
        node = torch.arange(W * D).view(W, D)
        parents = torch.where(offs == 0, -1, node - 1).view(-1).expand(B, -1).contiguous()
        return DraftTree(node_tokens.to(state.device), parents.to(state.device), None, valid, depth=D, width=W)
