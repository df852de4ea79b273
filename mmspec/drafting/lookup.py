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
        """Every usable match in one pass -> (score [B, P], first proposed index [B, P], continuation length
        [B, P]) over the continuation starts ``s = 0..P-1``, where a higher score is a longer n-gram (up to
        ``max_ngram``) ending right before ``s``, then a longer continuation (up to K), then a later start;
        -1 where nothing usable matches."""
        N = self.max_ngram
        end = state.lengths  # CPU
        P = int(end.max())  # nothing after the longest row's committed tokens can match
        tokens = torch.nn.functional.pad(state.tokens[:, :P], (N, 0), value=-1)
        valid = torch.nn.functional.pad(state.valid[:, :P], (N, 0), value=False)
        idx = (end.unsqueeze(1) - N + torch.arange(N)).clamp_min(0)  # the last N committed tokens
        pattern = torch.where(state.valid.gather(1, idx), state.tokens.gather(1, idx), -2)  # [B, N]
        # grams[:, s] are the N tokens before s; the n-gram match length counts equal tokens backwards from s-1
        same = (tokens.unfold(1, N, 1)[:, :P] == pattern.unsqueeze(1)) & valid.unfold(1, N, 1)[:, :P]
        ngram = same.flip(-1).cumprod(-1).sum(-1)  # [B, P]
        start = torch.arange(P)
        available = torch.minimum(end.unsqueeze(1) - start, cap)  # continuation length
        ok = (ngram >= self.min_ngram) & (available > 0)
        score = torch.where(ok, (ngram * (K + 1) + available) * P + start, -1)
        return score, start.expand(state.batch_size, P), available.clamp_min(0)

    def propose(self, state, max_tokens):
        if self.tree is not None:
            return self._propose_tree(state, max_tokens)
        K = min(self.num_drafts, max_tokens)
        if K <= 0:
            return torch.empty(state.batch_size, 0, dtype=torch.long, device=state.device), None
        score, _, available = self._matches(state, K, row_limits(state, K).unsqueeze(1))
        best = score.max(-1)  # the longest n-gram, then the longest continuation, then the latest
        # (finished rows have no usable match: their cap is 0)
        length = torch.where(best.values >= 0, available.gather(1, best.indices.unsqueeze(1))[:, 0], 0)
        K = int(length.max())
        idx = best.indices.unsqueeze(1) + torch.arange(K)  # the continuation starts at the best index
        drafts = state.tokens.gather(1, idx.clamp(max=state.tokens.shape[1] - 1))
        drafts = torch.where(torch.arange(K) < length.unsqueeze(1), drafts, -1)
        return drafts.to(state.device), None

    def _propose_tree(self, state, max_tokens):
        """Up to ``width`` continuations with different first tokens, each a branch of up to ``depth`` tokens."""
        width, depth = self.tree
        D = min(depth, max_tokens)
        B, tokens = state.batch_size, state.tokens
        if D <= 0:
            return torch.empty(B, 0, dtype=torch.long, device=state.device), None
        score, start, avail = self._matches(state, D, row_limits(state, D).unsqueeze(1))
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
