"""The decoding loop, once, for every method and modality.

    prefill -> repeat { propose K drafts -> one target forward -> verify -> commit -> roll back -> update } -> output

The loop talks to four objects and never asks which model or modality it runs:

* a target adapter (``mmspec.models.TargetAdapter``: ``prefill`` / ``checkpoint`` / ``forward`` / ``rollback``);
* a proposer (``mmspec.drafting.Proposer``), which drafts;
* a state (``State``): the committed tokens, which rows are still active, the block fed to the target and the
  verification step that turns the target's outputs into emitted tokens. ``DecodeState`` holds token ids (the
  logits pipeline, then ``mmspec.verify``); ``mmspec.continuous.ContinuousState`` holds continuous vectors (the
  diffusion head's means, then ``verify_continuous``);
* an acceptance criterion (``mmspec.acceptance``), of the state's kind.

The prefill's first token is a verification with no drafts. Host-side bookkeeping (committed counts, active rows)
lives on the CPU and is updated from one device -> host copy per step, in ``state.commit``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import acceptance as _acceptance
from .drafting.base import Proposer
from .kernels.decode_step import fused_verifier
from .sampling import LogitsPipeline
from .tree import DraftTree
from .verify import check_rows, verify, verify_tree

__all__ = ["DecodeState", "GenerationStats", "State", "decode"]


@dataclass
class GenerationStats:
    """What a decode cost and how well drafting worked.

    Attributes:
        target_forwards: target model forward calls, the prefill included (NFE).
        draft_forwards: forward calls of a separate draft model (0 for Jacobi, lookup and AR).
        new_tokens: tokens committed over all rows.
        new_tokens_per_row: list with one count per row.
        row_forwards: target forwards each row took part in while unfinished.
        accepted_histogram: ``accepted_histogram[k]`` = verify steps in which a row accepted k drafts (for token
            trees: the accepted depth).
        tree_nodes: draft nodes verified over all tree steps (0 when every step was a chain).
        mean_accepted: mean tokens committed per row per verify step (accepted drafts + 1).
        step_compression: tokens generated per target forward a row took part in (1.0 for plain AR).
        wall_time: seconds, including the prefill.
    """

    target_forwards: int = 0
    draft_forwards: int = 0
    new_tokens: int = 0
    new_tokens_per_row: list = field(default_factory=list)
    row_forwards: list = field(default_factory=list)
    accepted_histogram: list = field(default_factory=list)
    tree_nodes: int = 0
    wall_time: float = 0.0

    @property
    def mean_accepted(self) -> float:
        steps = sum(self.accepted_histogram)
        return sum((k + 1) * c for k, c in enumerate(self.accepted_histogram)) / steps if steps else 0.0

    @property
    def step_compression(self) -> float:
        forwards = sum(self.row_forwards)
        return self.new_tokens / forwards if forwards else 0.0

    @property
    def tree_nodes_per_step(self) -> float:
        """Mean draft nodes per row per verify step (0.0 for chains)."""
        steps = sum(self.accepted_histogram)
        return self.tree_nodes / steps if steps > 0 else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items()}
        d.update(mean_accepted=self.mean_accepted, step_compression=self.step_compression,
                 tree_nodes_per_step=self.tree_nodes_per_step)
        return d

    def __str__(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.target_forwards} target forwards "
            f"(+{self.draft_forwards} draft): step compression {self.step_compression:.2f}x, "
            f"mean accepted {self.mean_accepted:.2f}, {self.wall_time:.3f}s"
        )


class State(ABC):
    """What the loop keeps per row, and the four places where modalities differ.

    Attributes (CPU tensors unless noted):
        batch_size, max_new_tokens: B and the most new tokens per row.
        num_new: LongTensor [B], new tokens committed per row.
        active: BoolTensor [B], rows still generating.
        anchor: [B] (ids) or [B, C] (vectors) on ``device``: each row's last committed token, which opens the next
            block; set by ``commit``.
        prompt: tuple of the target's ``prefill`` positional arguments.
        generator: a ``torch.Generator`` or one per row; every random draw of the decode comes from it.
        device: where the target's inputs and outputs live.
    """

    batch_size: int
    max_new_tokens: int
    num_new: torch.Tensor
    active: torch.Tensor
    anchor: torch.Tensor | None = None
    prompt: tuple = ()
    generator = None
    device: torch.device

    @property
    def remaining(self) -> torch.Tensor:
        """LongTensor [B]: tokens each active row may still add (0 for finished rows)."""
        return (self.max_new_tokens - self.num_new) * self.active

    @abstractmethod
    def no_drafts(self) -> torch.Tensor:
        """An empty draft window [B, 0, ...] (the prefill is verified as a step without drafts)."""

    @abstractmethod
    def block(self, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's input for this step: ``anchor`` then the K drafts, [B, K+1, ...], and which of its places
        are real, BoolTensor [B, K+1] (CPU)."""

    @abstractmethod
    def verifier(self, target, proposer: Proposer, criterion, kernels: str) -> Callable:
        """The verification step for this decode: ``fn(drafts, draft_q, target_out [B, K+1, ...]) -> (result,
        target_rows)``; ``result`` has ``num_accepted`` [B], ``tokens`` [B, K+1, ...] and ``next_token``;
        ``target_rows`` is what ``proposer.update`` reads."""

    def kept(self, result, active: torch.Tensor, num_accepted: torch.Tensor) -> torch.Tensor:
        """What the target keeps of this step's block (``rollback``'s argument): LongTensor [B] counts for a chain
        (the anchor and the accepted drafts), or BoolTensor [B, K+1] block columns (a tree's accepted path)."""
        return torch.where(active, num_accepted + 1, 0)

    @abstractmethod
    def commit(self, result) -> torch.Tensor:
        """Append a step's emitted tokens to the active rows (the step's one device -> host copy), set ``anchor``
        and ``active``; return the accepted draft counts, LongTensor [B] (CPU)."""


class DecodeState(State):
    """Committed token ids and per-row progress, kept on the CPU.

    Attributes:
        tokens: LongTensor [B, T + max_new_tokens]: the (left-padded) prompt, then each row's new tokens.
        valid: BoolTensor, same shape: prompt attention mask, then True over committed new tokens.
        num_new: LongTensor [B], new tokens committed per row.
        active: BoolTensor [B], rows still generating.
        prompt_length: T.
        pipeline: the ``LogitsPipeline`` that turns target and draft scores into rows (``greedy`` when it does not
            sample).
        eos_token_ids: LongTensor of ids that end a row (kept), or None.
    """

    def __init__(self, input_ids, attention_mask, max_new_tokens, vocab_size, pipeline: LogitsPipeline, generator,
                 device, eos_token_ids: torch.Tensor | None = None):
        B, T = input_ids.shape
        self.batch_size, self.prompt_length, self.max_new_tokens = B, T, max_new_tokens
        self.vocab_size, self.pipeline, self.generator, self.device = vocab_size, pipeline, generator, device
        self.eos_token_ids = eos_token_ids
        self.greedy = not pipeline.do_sample
        self.prompt = (input_ids, attention_mask)
        self.tokens = torch.zeros(B, T + max_new_tokens, dtype=torch.long)
        self.tokens[:, :T] = input_ids.cpu()
        self.valid = torch.zeros(B, T + max_new_tokens, dtype=torch.bool)
        self.valid[:, :T] = attention_mask.cpu().bool()
        self.num_new = torch.zeros(B, dtype=torch.long)
        self.active = torch.full((B,), max_new_tokens > 0, dtype=torch.bool)
        # numpy views that share memory with the tensors (host bookkeeping writes through them)
        self._tokens_np, self._valid_np = self.tokens.numpy(), self.valid.numpy()
        self._num_new_np, self._active_np = self.num_new.numpy(), self.active.numpy()
        eos = None if eos_token_ids is None else set(eos_token_ids.flatten().tolist())
        self._eos = eos or None
        self._lists = None  # see ``token_lists``

    @property
    def lengths(self) -> torch.Tensor:
        """LongTensor [B]: end of each row's committed tokens in ``tokens``."""
        return self.prompt_length + self.num_new

    def last_tokens(self, n: int = 1) -> torch.Tensor:
        """LongTensor [B, n] (CPU): the last ``n`` committed tokens of each row."""
        idx = (self.lengths.unsqueeze(1) - n + torch.arange(n)).clamp_min(0)
        return self.tokens.gather(1, idx)

    def token_lists(self) -> list[list[int]]:
        """Each row's valid tokens (the prompt's, then the committed ones) as a Python list, for proposers that
        search them on the host (prompt lookup); built on first use, then extended as tokens are committed. Do
        not modify."""
        if self._lists is None:
            end = self.prompt_length + self._num_new_np
            self._lists = [row[:e][ok[:e]].tolist() for row, ok, e in zip(self._tokens_np, self._valid_np, end)]
        return self._lists

    def no_drafts(self) -> torch.Tensor:
        return torch.empty(self.batch_size, 0, dtype=torch.long, device=self.device)

    def block(self, drafts):
        if isinstance(drafts, DraftTree):  # [anchor, nodes]; unused nodes are holes
            block = torch.cat([self.anchor.unsqueeze(1), drafts.tokens.clamp_min(0)], dim=1)
            valid = torch.cat([torch.ones(self.batch_size, 1, dtype=torch.bool), drafts.valid], dim=1)
            return block, valid & self.active.unsqueeze(1)
        if drafts.shape[1] == 0:  # plain AR
            return self.anchor.unsqueeze(1), self.active.unsqueeze(1)
        # A row's slots after its own drafts (-1, see mmspec.drafting.base.pad_drafts) are fed a placeholder whose
        # outputs are never used.
        block = torch.cat([self.anchor.unsqueeze(1), drafts.clamp_min(0)], dim=1)  # [B, K+1]
        return block, self.active.unsqueeze(1).expand(-1, block.shape[1])

    def verifier(self, target, proposer, criterion, kernels):
        """Processed target scores (greedy) or probability rows (sampling) through ``mmspec.verify``, or the fused
        Triton step on raw logits (see ``mmspec.kernels.decode_step``)."""
        criterion = _acceptance.get(criterion, kind="tokens")
        fused = fused_verifier(kernels, self.pipeline, criterion, proposer, self.device)

        def step(drafts, draft_probs, logits):  # [B, K] (-1 after a row's own), [B, K, V] or None, [B, K+1, V]
            if isinstance(drafts, DraftTree):  # [B, N + 1, V] rows: the anchor's, then each node's
                scores = self.pipeline.process(logits, self.tokens, self.lengths, tree=drafts)
                if self.greedy:
                    return verify_tree(drafts, scores, greedy=True), scores
                rows = self.pipeline.probs(scores)
                return verify_tree(drafts, rows, criterion, self.generator), rows
            scores = self.pipeline.process(logits, self.tokens, self.lengths, drafts.clamp_min(0)) \
                if self.pipeline.processors else logits
            if self.greedy:
                return verify(drafts, None, scores, criterion, greedy=True, check=False), scores
            rows = self.pipeline.probs(scores)
            return verify(drafts, draft_probs, rows, criterion, self.generator, check=False), rows

        if fused is None:
            return step
        # the fused kernels verify chains; token trees keep the torch path
        return lambda drafts, draft_probs, logits: (step(drafts, draft_probs, logits) if isinstance(drafts, DraftTree)
                                                    else fused(drafts, draft_probs, logits, self.generator))

    def commit(self, result):
        self._path = None
        L = result.tokens.shape[1]
        tree = getattr(result, "path", None) is not None
        extra = result.accepted.long() if tree else getattr(result, "invalid", None)
        # the step's one device -> host copy: the tokens, with the tree's path mask or each row's validity code
        # riding on it; the few values per row are then handled as Python lists (after a forward has flushed the
        # CPU's caches, every distinct numpy or torch op on a handful of values costs tens of microseconds)
        rows = (result.tokens if extra is None else torch.cat([result.tokens, extra.view(-1, 1)
                                                                if extra.dim() == 1 else extra], dim=1)).tolist()
        if tree:
            self._path = torch.tensor([r[L:] for r in rows], dtype=torch.bool)
        elif extra is not None and any(r[L] for r in rows):
            check_rows(torch.tensor([r[L] for r in rows]), self.active)
        emitted = [r[:L] if len(r) > L else r for r in rows]
        self._append(emitted)
        self.anchor = result.next_token
        return torch.tensor([sum(t >= 0 for t in r) - 1 for r in emitted])

    def kept(self, result, active, num_accepted):
        if self._path is None:
            return super().kept(result, active, num_accepted)
        return torch.cat([active.unsqueeze(1), self._path & active.unsqueeze(1)], dim=1)

    def append(self, emitted) -> torch.Tensor:
        """Append emitted tokens [B, L] (-1 padded: a tensor, array or list of rows) to the active rows.

        Truncates at the first EOS (kept) and at ``max_new_tokens``; updates ``active``.
        Returns the number of tokens committed per row, LongTensor [B].

        Host bookkeeping on a few values per row, in Python over the rows, writing through numpy views that share
        memory with ``tokens``, ``valid``, ``num_new`` and ``active``.
        """
        return torch.tensor(self._append(emitted))

    def _append(self, emitted) -> list[int]:
        """``append`` without building the counts' tensor (``commit`` does not need it): a list of B counts."""
        if not isinstance(emitted, list):
            emitted = np.asarray(emitted).tolist()
        num_new, active = self._num_new_np, self._active_np
        T, budget, eos = self.prompt_length, self.max_new_tokens, self._eos
        counts = []
        for b, row in enumerate(emitted):
            n, count = int(num_new[b]), 0
            if active[b]:
                for t in row:
                    if t < 0 or n + count >= budget:
                        break
                    count += 1
                    if eos is not None and t in eos:  # the first EOS ends the row
                        active[b] = False
                        break
            if count:
                if self._lists is not None:
                    self._lists[b].extend(row[:count])
                self._tokens_np[b, T + n : T + n + count] = row[:count]
                self._valid_np[b, T + n : T + n + count] = True
                num_new[b] = n + count
                if n + count >= budget:
                    active[b] = False
            counts.append(count)
        return counts


@torch.no_grad()
def decode(
    target,
    proposer: Proposer,
    state: State,
    *,
    window: int,
    criterion="exact",
    model_kwargs: dict | None = None,
    progress: bool = False,
    callback=None,
    kernels: str = "auto",
) -> tuple[State, GenerationStats]:
    """Run the speculative loop; see the module docstring.

    Args:
        target: a ``mmspec.models.TargetAdapter`` (``prefill``, ``checkpoint``, ``forward``, ``rollback``).
        proposer: the drafter (``mmspec.drafting.Proposer``).
        state: a fresh ``DecodeState`` (token ids) or ``mmspec.continuous.ContinuousState`` (vectors); it holds
            the prompt, the budget, the sampling settings and the generator, and is returned filled.
        window: tokens verified per target forward (1 anchor + up to ``window - 1`` drafts).
        criterion: an acceptance criterion (name or object) of the state's kind.
        model_kwargs: extra arguments of the target's prefill (pixel values, unconditional prompts, ...).
        progress: a tqdm bar over the new tokens.
        callback: called as ``callback(step, state)`` after every commit (step 0 is the prefill).
        kernels: verification backend of token states, ``"auto"`` (the fused Triton step on CUDA when triton
            imports; the ``MMSPEC_KERNELS`` environment variable may force either), ``"triton"`` or ``"torch"``.
            The fused step takes the raw logits; it is skipped (torch path) when the pipeline has logits
            processors or the criterion is not fusable, see ``mmspec.kernels.decode_step``.
    Returns:
        the final state (committed tokens) and ``GenerationStats``.
    """
    t0 = time.perf_counter()
    stats = GenerationStats(accepted_histogram=[0] * window)
    row_forwards = [0] * state.batch_size
    bar = tqdm(total=state.max_new_tokens, disable=not progress, desc="tokens", leave=False)
    verify_step = state.verifier(target, proposer, criterion, kernels)

    if bool(state.active.any()):
        out = target.prefill(*state.prompt, **(model_kwargs or {}))  # the last position's output, [B, ...]
        stats.target_forwards += 1
        row_forwards = [1] * state.batch_size
        result, _ = verify_step(state.no_drafts(), None, out.unsqueeze(1))  # the first token: nothing to verify
        state.commit(result)
        bar.update(1)
        proposer.start(state)
        if callback is not None:
            callback(0, state)

    histogram = stats.accepted_histogram
    # per-row host bookkeeping on Python lists: a few values per row, and a forward flushes the CPU caches that
    # small numpy or torch ops would run from
    while any(active_rows := state.active.tolist()):
        active = state.active.clone()
        if window > 1:
            remaining = max(state.max_new_tokens - n for n, a in zip(state.num_new.tolist(), active_rows) if a)
            max_drafts = max(0, min(window - 1, remaining - 1))
        else:
            max_drafts = 0
        proposal = proposer.propose(state, max_drafts)  # (drafts [B, K, ...], what they were drawn from) or a tree
        drafts, draft_q = proposal if isinstance(proposal, tuple) else (proposal, None)
        block, valid = state.block(drafts)
        target.checkpoint()
        if isinstance(drafts, DraftTree):  # one forward over [anchor, nodes] with the ancestor mask
            out = target.forward(block, valid, tree=drafts)
            stats.tree_nodes += int(drafts.valid[active].sum())
        else:
            out = target.forward(block, valid)  # [B, K+1, ...]
        stats.target_forwards += 1
        row_forwards = [f + a for f, a in zip(row_forwards, active_rows)]
        result, rows = verify_step(drafts, draft_q, out)
        before = int(state.num_new.max()) if progress else 0
        num_accepted = state.commit(result)  # [B] (CPU)
        for k, a in zip(num_accepted.tolist(), active_rows):
            if a:
                histogram[k] += 1
        if progress:
            bar.update(int(state.num_new.max()) - before)
        target.rollback(state.kept(result, active, num_accepted))
        proposer.update(state, result, rows, num_accepted)
        if callback is not None:
            callback(stats.target_forwards - 1, state)

    bar.close()
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)
    stats.draft_forwards = proposer.draft_forwards
    stats.new_tokens_per_row = state.num_new.tolist()
    stats.new_tokens = int(state.num_new.sum())
    stats.row_forwards = row_forwards
    stats.wall_time = time.perf_counter() - t0
    return state, stats

