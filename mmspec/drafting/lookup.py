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

from .base import Proposer, row_limits

__all__ = ["LookupProposer"]


class LookupProposer(Proposer):
    """Prompt / n-gram lookup (Saxena 2023; transformers' ``prompt_lookup_num_tokens``).

    Args:
        num_drafts: most tokens proposed per step.
        max_ngram: longest n-gram to match (tries ``max_ngram`` down to ``min_ngram``).
        min_ngram: shortest n-gram to match.
    """

    def __init__(self, num_drafts: int, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}.")
        self.num_drafts, self.max_ngram, self.min_ngram = num_drafts, max_ngram, min_ngram

    def propose(self, state, max_tokens):
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
