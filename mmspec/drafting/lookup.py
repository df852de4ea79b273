"""Prompt lookup: propose the continuation of an earlier occurrence of the last n tokens.

Among the occurrences, the one with the longest continuation (up to the draft length) wins, the latest on
ties: the most recent context when several can fill the whole window, else the longest draft available.
(Always taking the latest occurrence gives short drafts in repetitive text, where it sits just before the
end; always taking the earliest, as transformers does, ignores recency. On held-out code with the zoo
text model this choice needs fewer target forwards than either.)

Deterministic drafts (one-hot ``q``), so exact acceptance stays exact. Vectorised over the batch with
``unfold`` on the CPU copy of the committed tokens; rows without a match get a shorter (or empty) draft,
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
    """

    def __init__(self, num_drafts: int, max_ngram: int = 3, min_ngram: int = 1, tree=None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}.")
        self.num_drafts, self.max_ngram, self.min_ngram = num_drafts, max_ngram, min_ngram
        self.tree = parse_tree(tree)
        if self.tree is not None and self.tree[0] * self.tree[1] > num_drafts:
            raise ValueError(
                f"tree={tree!r} has {self.tree[0] * self.tree[1]} nodes but the window allows {num_drafts} drafts; "
                f"use window >= {self.tree[0] * self.tree[1] + 1}."
            )

    def _matches(self, state, K, cap):
        """Every usable match -> (score [B, M], first proposed index [B, M], continuation length [B, M]), where a
        higher score is a longer n-gram, then a longer continuation (up to K), then a later start."""
        tokens, valid, end = state.tokens, state.valid, state.lengths  # CPU
        scores, starts, lengths = [], [], []
        P = tokens.shape[1]
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if K <= 0 or P <= n:
                continue
            pattern = state.last_tokens(n)  # [B, n]
            grams = tokens.unfold(1, n, 1)  # [B, P - n + 1, n], gram i covers [i, i + n)
            ok = valid.unfold(1, n, 1).all(-1) & (grams == pattern.unsqueeze(1)).all(-1)
            start = torch.arange(grams.shape[1])
            available = torch.minimum(end.unsqueeze(1) - (start + n).unsqueeze(0), cap)  # continuation length
            ok &= available > 0
            scores.append(torch.where(ok, (n * (K + 1) + available) * P + start.unsqueeze(0), -1))
            starts.append((start + n).expand_as(available))
            lengths.append(available.clamp_min(0))
        if not scores:
            empty = torch.empty(state.batch_size, 0, dtype=torch.long)
            return empty, empty, empty
        return torch.cat(scores, 1), torch.cat(starts, 1), torch.cat(lengths, 1)

    def propose(self, state, max_tokens):
        if self.tree is not None:
            return self._propose_tree(state, max_tokens)
        K = min(self.num_drafts, max_tokens)
        B = state.batch_size
        cap = row_limits(state, K).unsqueeze(1)  # [B, 1] each row's own draft length cap
        tokens, valid, end = state.tokens, state.valid, state.lengths  # CPU
        best_start = torch.full((B,), -1, dtype=torch.long)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if K <= 0 or tokens.shape[1] <= n:
                break
            pattern = state.last_tokens(n)  # [B, n]
            grams = tokens.unfold(1, n, 1)  # [B, P, n], gram i covers [i, i + n)
            ok = valid.unfold(1, n, 1).all(-1) & (grams == pattern.unsqueeze(1)).all(-1)
            start = torch.arange(grams.shape[1])
            available = torch.minimum(end.unsqueeze(1) - (start + n).unsqueeze(0), cap)  # continuation length
            ok &= available > 0
            # Longest continuation first, then the latest start: one argmax over a combined score.
            score = torch.where(ok, available * grams.shape[1] + start.unsqueeze(0), -1).max(-1)
            found = (score.values >= 0) & (best_start < 0)
            best_start = torch.where(found, score.indices + n, best_start)  # index of the first proposed token
        length = torch.where(best_start >= 0, torch.minimum(end - best_start, cap[:, 0]), 0)
        length = torch.where(state.active, length, 0)
        K = int(length.max()) if K > 0 else 0
        idx = best_start.clamp_min(0).unsqueeze(1) + torch.arange(K)
        drafts = tokens.gather(1, idx.clamp(max=tokens.shape[1] - 1))
        drafts = torch.where(torch.arange(K) < length.unsqueeze(1), drafts, -1)
        return drafts.to(state.device), None

    def _propose_tree(self, state, max_tokens):
        """Up to ``width`` continuations with different first tokens, each a branch of up to ``depth`` tokens."""
        width, depth = self.tree
        D = min(depth, max_tokens)
        B, tokens = state.batch_size, state.tokens
        score, start, avail = self._matches(state, D, row_limits(state, D).unsqueeze(1))
        branch_start, branch_len = [], []
        for _ in range(width):  # best remaining match, then drop every match with the same first token
            best = score.max(-1) if score.shape[1] else None
            if best is None:
                break
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
