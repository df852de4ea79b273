"""Draft-verify with a separate small causal LM sharing the target's tokenizer.

The drafter keeps its own ragged KV cache (``mmspec.models.CausalLM``) and rolls it back after each
verification. Tokens committed by the target that the drafter has not seen yet (the correction token, and
the last draft when every draft was accepted) are fed as a short *pending* block at the start of the next
step, with holes where a row has fewer of them.
"""

from __future__ import annotations

import inspect

import torch

from ..models.causal_lm import CausalLM
from ..sampling import sample_from_weights
from ..tree import parse_tree, tree_size, with_alternatives
from .base import Proposer, row_limits

__all__ = ["DraftModelProposer"]


class DraftModelProposer(Proposer):
    """Proposes with a draft model, sampled through the same logits pipeline as the target.

    Args:
        draft_model: a transformers causal LM with the target's vocabulary.
        num_drafts: drafts per step (the starting value when ``adaptive``).
        adaptive: per row, grow the draft length by 2 when the row accepted all its drafts, else shrink it to
            ``max(1, n - 1)`` (transformers' "heuristic" schedule), capped at ``max_drafts``.
        max_drafts: the cap for ``adaptive`` (defaults to ``num_drafts``).
        confidence: a row stops drafting once the draft's top probability falls under this value (the token
            drawn from that row is kept); drafting stops when every active row has (a host sync per draft
            token), None to disable.

    Every choice is per row (draft length, stop), so a row drafts alone what it drafts in any batch.
        prefill_kwargs: extra arguments for the draft adapter's prefill (e.g. unconditional prompts).
        tree: ``(width, depth)``: besides its chain, the draft proposes ``width - 1`` further candidates at each
            of its first ``depth`` levels (the next-best tokens when greedy; draws without replacement from its row
            when sampling), and those levels form a full ``width``-ary tree (``mmspec.tree.tree_size`` nodes; the
            level's candidates under every node, the chain's token first). They cost no draft forward: only the
            chain is fed to the draft, and its rows stand in for the other branches'. None: a chain.
        dynamic_tree: spread the same number of extra candidates, ``(width - 1) * depth``, over all levels by the
            draft's cumulative probability instead (EAGLE-2 style): more where the chain is likely to be reached
            and its token is least sure.

    ``draft_model`` may also be an adapter (``CausalLM``, ``GuidedLM``) so that image drafters get the same
    guidance and structural forcing as the target.
    """

    def __init__(self, draft_model, num_drafts: int, adaptive: bool = False, max_drafts: int | None = None,
                 confidence: float | None = None, prefill_kwargs: dict | None = None, tree=None,
                 dynamic_tree: bool = False):
        self.lm = draft_model if hasattr(draft_model, "prefill") else CausalLM(draft_model)
        self.prefill_kwargs = prefill_kwargs or {}
        self.num_drafts = num_drafts
        self.max_drafts = max_drafts or num_drafts
        self.adaptive, self.confidence = adaptive, confidence
        self.tree, self.dynamic_tree = parse_tree(tree), bool(dynamic_tree)
        if self.tree is not None:  # the chain keeps what the other candidates leave of the window
            width, depth = self.tree
            extra = (width - 1) * depth if self.dynamic_tree else tree_size(width, depth) - depth
            if extra + depth > self.max_drafts:
                raise ValueError(
                    f"tree={tree!r} needs {extra + depth} nodes but the window allows {self.max_drafts} drafts; "
                    f"use window >= {extra + depth + 1}."
                )
            self.num_drafts = self.max_drafts = self.max_drafts - extra
        self.draft_forwards = 0
        # Only the last position's draft logits are used: ask adapters that can skip the others to do so.
        can_skip = "logits_to_keep" in inspect.signature(self.lm.forward).parameters
        self._last_only = {"logits_to_keep": 1} if can_skip else {}

    def start(self, state):
        dev = self._device = self.lm.device  # the draft may live on any device; its logits come back to state's
        T = state.prompt_length
        self.lm.prefill(state.tokens[:, :T].to(dev), state.valid[:, :T].to(dev), **self.prefill_kwargs)
        self.draft_forwards += 1
        self._pending = state.last_tokens(1).to(state.device)  # [B, P] right-aligned
        self._pending_valid = torch.ones(state.batch_size, 1, dtype=torch.bool)
        self._k = torch.full((state.batch_size,), self.num_drafts, dtype=torch.long)  # per-row draft length

    def _draft_rows(self, state, logits, drafts, draws):
        """Draft logits [B, V] -> (token [B], q [B, V] or None, rows for the confidence stop) through the
        target's pipeline. ``draws`` [B] (0/1): the rows that draft this token (per-row generators draw only
        for them)."""
        pipe = state.pipeline
        if pipe.processors:
            window = torch.stack(drafts, 1) if drafts else None
            logits = pipe.process(logits.unsqueeze(1), state.tokens, state.lengths, window, first=len(drafts))[:, 0]
        if state.greedy:
            return logits.argmax(-1), None, logits.softmax(-1) if self.confidence or self.tree else logits
        q = pipe.probs(logits)
        return sample_from_weights(q.unsqueeze(1), state.generator, draws)[:, 0], q, q

    def propose(self, state, max_tokens):
        B, dev = state.batch_size, state.device
        limit = torch.minimum(row_limits(state, max_tokens), self._k)  # [B] CPU, each row's own draft length
        K = int(limit.max())
        if K <= 0:
            return torch.empty(B, 0, dtype=torch.long, device=dev), None
        self.lm.checkpoint()
        active = self._active = state.active.clone()
        pending, pending_valid = self._pending, self._pending_valid & active.unsqueeze(1)
        # Pending blocks are right-aligned: leading columns that no active row feeds (the last draft after a
        # rejection, at batch size 1 every step) would only leave holes in the draft cache, which cost memory
        # and force the masked attention path from then on. Skip them.
        skip = int(pending_valid.any(0).long().argmax())
        pending, pending_valid = pending[:, skip:], pending_valid[:, skip:]
        self._fed_pending = pending_valid.sum(-1)
        logits = self.lm.forward(pending.to(self._device), pending_valid, **self._last_only)[:, -1].to(dev)
        self.draft_forwards += 1
        drafts, probs, rows = [], [], []
        while True:
            i = len(drafts)
            token, q, conf = self._draft_rows(state, logits, drafts, (i < limit).long())
            drafts.append(token)
            probs.append(q)
            rows.append(conf)
            if self.confidence is not None:  # a row whose draft is unsure stops after this token
                unsure = (conf.max(-1).values < self.confidence).cpu()
                limit = torch.where(unsure & (limit > i + 1), i + 1, limit)
            if not bool((limit > i + 1).any()):
                break
            logits = self.lm.forward(token.unsqueeze(1).to(self._device), active.unsqueeze(1))[:, -1].to(dev)
            self.draft_forwards += 1
        self._limit = limit
        drafted = torch.stack(drafts, 1)
        self._drafted = drafted.clamp_min(0)
        own = torch.arange(drafted.shape[1]) < limit.unsqueeze(1)
        drafts = torch.where(own.to(dev), drafted, -1)
        q = None if state.greedy else torch.stack(probs, 1)
        if self.tree is None:
            return drafts, q
        rows = torch.stack(rows, 1)  # [B, K, V] draft probabilities
        width, depth = self.tree
        budget = None
        if self.dynamic_tree:
            sure = rows.gather(-1, self._drafted.unsqueeze(-1)).squeeze(-1).double()  # [B, K]
            reach = torch.cat([torch.ones_like(sure[:, :1]), sure[:, :-1]], 1).cumprod(1)
            score = (reach * (1 - sure)).unsqueeze(-1) * 0.5 ** torch.arange(width - 1, device=sure.device)
            score = score.masked_fill(~own.to(dev).unsqueeze(-1), -1.0)
            take = min((width - 1) * depth, score[0].numel())
            top = score.flatten(1).topk(take, dim=1).indices
            chosen = torch.zeros_like(score.flatten(1), dtype=torch.bool).scatter_(1, top, True)
            budget = chosen.view_as(score).sum(-1)
        usable = torch.ones_like(self._drafted, dtype=torch.bool)
        return with_alternatives(drafts, q, rows, usable, width, depth, state.greedy, state.generator, budget)

    def update(self, state, result, target_rows, num_accepted):
        K = target_rows.shape[1] - 1
        B = state.batch_size
        if K == 0:
            # Nothing was drafted: the pending tokens were not fed; append the new token to them.
            self._pending = torch.cat([self._pending, result.next_token.unsqueeze(1)], dim=1)
            self._pending_valid = torch.cat([self._pending_valid, torch.ones(B, 1, dtype=torch.bool)], dim=1)
            return
        K = self._drafted.shape[1]  # the chain (a tree's other candidates were never fed to the draft)
        path = getattr(result, "path", None)
        on_chain = num_accepted if path is None else ((path >= 0) & (path < K)).sum(-1).cpu()
        # The draft cache holds the pending block and drafts x_1..x_{K-1} (a row's slots after its own drafts hold
        # placeholders, never accepted); keep the accepted ones. What the target committed beyond them (x_K, or
        # every path token after the path left the chain, then the correction / bonus token) is fed next step,
        # right-aligned.
        kept = on_chain.clamp(max=K - 1)
        self.lm.rollback(self._fed_pending + kept)
        count = num_accepted + 1 - kept  # [B] >= 1
        P = int(count.max())
        src = num_accepted.unsqueeze(1) + 1 - P + torch.arange(P)  # emitted index of each pending column
        self._pending = result.tokens.gather(1, src.clamp_min(0).to(result.tokens.device)).clamp_min(0)
        self._pending_valid = src >= kept.unsqueeze(1)
        if self.adaptive:  # per row: a row's schedule depends on its own acceptances only
            full = num_accepted >= self._limit
            k = torch.where(full, (self._k + 2).clamp(max=self.max_drafts), (self._k - 1).clamp(min=1))
            self._k = torch.where(self._active, k, self._k)
