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
from ..sampling import sample_categorical
from ..tree import DraftTree, parse_tree
from ..verify import take_rows
from .base import Proposer, row_limits
from .draft_tree import CHAIN, best_first, child_scores, children, node_paths

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
        prefill_kwargs: extra arguments for the draft adapter's prefill (e.g. unconditional prompts).
        tree: ``(width, depth)``: draft a token tree instead of a chain (EAGLE-2 style, ``mmspec.drafting.draft_tree``):
            ``depth`` levels, one draft forward each; at every level the ``width`` best nodes (by the draft's path
            probability) are fed to the draft together, each getting ``width`` children (its top tokens when greedy;
            draws without replacement from its row when sampling); then the ``num_drafts`` best nodes are kept
            (``num_drafts`` = window - 1, the node budget; parents always kept with their children). None: a chain.

    Every choice is per row (draft length, stop, the tree's shape), so a row drafts alone what it drafts in any batch.
    ``draft_model`` may also be an adapter (``CausalLM``, ``GuidedLM``) so that image drafters get the same
    guidance and structural forcing as the target.
    """

    def __init__(self, draft_model, num_drafts: int, adaptive: bool = False, max_drafts: int | None = None,
                 confidence: float | None = None, prefill_kwargs: dict | None = None, tree=None):
        self.lm = draft_model if hasattr(draft_model, "prefill") else CausalLM(draft_model)
        self.prefill_kwargs = prefill_kwargs or {}
        self.num_drafts = num_drafts
        self.max_drafts = max_drafts or num_drafts
        self.adaptive, self.confidence = adaptive, confidence
        self.tree = parse_tree(tree)
        if self.tree is not None:
            width, depth = self.tree
            if adaptive or confidence is not None:
                raise ValueError("a draft tree (`tree`) sizes itself from the window; it takes neither `adaptive` nor "
                                 "`draft_confidence`.")
            if depth > self.max_drafts:
                raise ValueError(
                    f"tree={tree!r} drafts {depth} levels but the window leaves {self.max_drafts} nodes "
                    f"(window - 1); use window >= {depth + 1}."
                )
            self.num_drafts = self.max_drafts  # the node budget
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
            return logits.argmax(-1), None, logits.softmax(-1) if self.confidence else logits
        q = pipe.probs(logits)
        return sample_categorical(q.unsqueeze(1), state.generator, draws)[:, 0], q, q

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
        if self.tree is not None:
            return self._propose_tree(state, logits, limit)
        drafts, probs = [], []
        while True:
            i = len(drafts)
            token, q, conf = self._draft_rows(state, logits, drafts, (i < limit).long())
            drafts.append(token)
            probs.append(q)
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
        return drafts, q

    def _propose_tree(self, state, logits, budget):
        """The EAGLE-2-style tree (``mmspec.drafting.draft_tree``) from the draft's row after the pending block,
        ``logits`` [B, V]; ``budget`` [B] (CPU) each row's draft limit (``row_limits``), which caps its depth.
        Returns a ``DraftTree`` of at most ``max_drafts`` nodes per row."""
        width, depth = self.tree
        B, dev, pipe, greedy = state.batch_size, state.device, state.pipeline, state.greedy
        active = self._active
        levels_b = budget.clamp(max=depth) * active  # [B] CPU: each row's own depth (its remaining tokens - 1)
        budget = torch.where(levels_b > 0, self.max_drafts, 0)  # nodes: the window's, whatever the depth
        levels = int(levels_b.max())
        if pipe.processors:
            logits = pipe.process(logits.unsqueeze(1), state.tokens, state.lengths)[:, 0]
        one = torch.ones(B, 1, dtype=torch.float64, device=dev)
        tok, q, p, e, ok = children(logits.unsqueeze(1), width, greedy, state.generator, (levels_b > 0).long(),
                                    pipe.probs)
        path, score = child_scores(one, one + CHAIN, p, e)
        # every node of the step, in creation order: level 1 (W nodes), then W * W per further level
        tokens, parents, paths, scores = [tok.flatten(1)], [torch.full((B, width), -1, device=dev)], \
            [path.flatten(1)], [score.flatten(1)]
        usable, qs = [ok.flatten(1)], [None if q is None else q.flatten(1, 2)]
        fed, fed_valid, first = [], [], 0  # nodes fed to the draft (expanded), level by level
        for level in range(1, levels):
            # expand the ``width`` best nodes of this level: feed [anchor, every node expanded so far] to the draft
            here = usable[-1] & (levels_b > level).to(dev).unsqueeze(1)
            pick, taken = best_first(scores[-1], here, torch.full((B,), width), size=width)
            if not bool(taken.any()):
                break
            pick = pick + first  # node indices over the whole step
            fed.append(pick), fed_valid.append(taken)
            all_tokens, all_parents = torch.cat(tokens, 1), torch.cat(parents, 1)
            logits = self._tree_forward(state, all_tokens, all_parents, fed, fed_valid)  # [B, W, V]
            if pipe.processors:
                seen = node_paths(all_tokens, all_parents, pick, level).cpu()
                logits = pipe._process_paths(logits, state.tokens, state.lengths, seen,
                                             torch.full((B, width), level))
            tok, q, p, e, ok = children(logits, width, greedy, state.generator, taken.sum(-1), pipe.probs)
            path, score = child_scores(torch.cat(paths, 1).gather(1, pick), torch.cat(scores, 1).gather(1, pick), p, e)
            first += tokens[-1].shape[1]
            tokens.append(tok.flatten(1)), parents.append(pick.unsqueeze(-1).expand(-1, -1, width).flatten(1))
            paths.append(path.flatten(1)), scores.append(score.flatten(1))
            usable.append((ok & taken.to(dev).unsqueeze(-1)).flatten(1))
            qs.append(None if q is None else q.flatten(1, 2))
        # keep the ``budget`` best nodes of the whole tree, best first (parents before children)
        node_level = torch.cat([torch.full((t.shape[1],), i + 1) for i, t in enumerate(tokens)])
        within = torch.cat(usable, 1) & (node_level.unsqueeze(0) <= levels_b.unsqueeze(1)).to(dev)
        keep, valid = best_first(torch.cat(scores, 1), within, budget)
        all_parents = torch.cat(parents, 1)
        position = torch.full_like(all_parents, -1).scatter_(1, keep, torch.arange(keep.shape[1], device=dev)
                                                             .expand_as(keep).contiguous())
        parent = all_parents.gather(1, keep)
        parent = torch.where((parent >= 0) & valid.to(dev), position.gather(1, parent.clamp_min(0)), -1)
        probs = None
        if not greedy:
            probs = take_rows(torch.cat(qs, 1), keep)
            probs = probs.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        kept_level = node_level[keep.cpu()]
        self._kept, self._fed, self._fed_valid = keep, fed, fed_valid
        return DraftTree(torch.cat(tokens, 1).gather(1, keep), parent, probs, valid,
                         depth=int(kept_level[valid].max()), width=width)

    def _tree_forward(self, state, tokens, parents, fed, fed_valid):
        """One draft forward over ``[anchor, fed nodes]`` (the nodes expanded so far, level by level, as a tree);
        returns the draft logits [B, W, V] of the last level's fed nodes. The previous tree forward of this step is
        rolled back first (its nodes are fed again: one forward per level, each a fresh block on the committed
        cache, which every adapter can take)."""
        B, width = tokens.shape[0], self.tree[0]
        dev = tokens.device
        if len(fed) == 1:  # the pending block's last token is the anchor of every tree forward: take it out
            self.lm.rollback((self._fed_pending - 1).clamp_min(0))
        else:
            self.lm.rollback(torch.zeros(B, dtype=torch.long))
        self.lm.checkpoint()
        nodes, valid = torch.cat(fed, 1), torch.cat(fed_valid, 1)  # [B, F] node indices, CPU validity
        F = nodes.shape[1]
        where = torch.full_like(parents, -1).scatter_(1, nodes, torch.arange(F, device=dev).expand(B, F).contiguous())
        up = parents.gather(1, nodes)
        block_parents = torch.where(up >= 0, where.gather(1, up.clamp_min(0)), -1)
        block_parents = torch.where(valid.to(dev), block_parents, -1)
        tree = DraftTree(tokens.gather(1, nodes), block_parents, None, valid, depth=len(fed), width=width)
        anchor = state.anchor.view(B, 1).to(dev)
        block = torch.cat([anchor, tree.tokens], 1).to(self._device)
        block_valid = torch.cat([torch.ones(B, 1, dtype=torch.bool), valid], 1) & self._active.unsqueeze(1)
        keep = {"logits_to_keep": width} if self._last_only else {}
        logits = self.lm.forward(block, block_valid, tree=tree, **keep)[:, -width:].to(dev)
        self.draft_forwards += 1
        return logits

    def update(self, state, result, target_rows, num_accepted):
        K = target_rows.shape[1] - 1
        B = state.batch_size
        if K == 0:
            # Nothing was drafted: the pending tokens were not fed; append the new token to them.
            self._pending = torch.cat([self._pending, result.next_token.unsqueeze(1)], dim=1)
            self._pending_valid = torch.cat([self._pending_valid, torch.ones(B, 1, dtype=torch.bool)], dim=1)
            return
        if self.tree is not None:
            self._update_tree(state, result, num_accepted)
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
        self._set_pending(result, num_accepted, kept)
        if self.adaptive:  # per row: a row's schedule depends on its own acceptances only
            full = num_accepted >= self._limit
            k = torch.where(full, (self._k + 2).clamp(max=self.max_drafts), (self._k - 1).clamp(min=1))
            self._k = torch.where(self._active, k, self._k)

    def _update_tree(self, state, result, num_accepted):
        """After a tree step: keep in the draft cache the anchor and the accepted path's nodes that were fed (the
        expanded ones, a prefix of the path); the rest of the path and the correction / bonus token become pending."""
        B = state.batch_size
        path = result.path.cpu()  # [B, depth] kept-node indices, -1 after the path
        if not self._fed:  # one level: only the pending block was fed
            kept = torch.zeros(B, dtype=torch.long)
            self.lm.rollback(self._fed_pending)
        else:
            nodes = torch.cat(self._fed, 1).cpu()  # [B, F] node indices over the step
            F = nodes.shape[1]
            node = self._kept.cpu().gather(1, path.clamp_min(0))  # [B, depth]
            column = torch.where(torch.cat(self._fed_valid, 1).unsqueeze(1) & (nodes.unsqueeze(1) == node.unsqueeze(2)),
                                 torch.arange(F), F).min(-1).values  # the fed column of each path node, or F
            on = (path >= 0) & (column < F)
            keep = torch.zeros(B, F + 2, dtype=torch.bool)
            keep.scatter_(1, torch.where(on, column + 1, F + 1), True)
            keep[:, 0] = self._active
            self.lm.rollback(keep[:, : F + 1] & self._active.unsqueeze(1))
            kept = on.sum(-1) * self._active
        self._set_pending(result, num_accepted, kept)

    def _set_pending(self, result, num_accepted, kept):
        """The committed tokens after the ``kept`` [B] the draft cache holds: fed next step, right-aligned."""
        count = num_accepted + 1 - kept  # [B] >= 1
        P = int(count.max())
        src = num_accepted.unsqueeze(1) + 1 - P + torch.arange(P)  # emitted index of each pending column
        self._pending = result.tokens.gather(1, src.clamp_min(0).to(result.tokens.device)).clamp_min(0)
        self._pending_valid = src >= kept.unsqueeze(1)
