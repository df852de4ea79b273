"""The decoding loop, once, for every method and modality.

    prefill -> repeat { propose K tokens -> one target forward -> verify -> commit, roll back } -> output

The loop only talks to a target adapter (``prefill`` / ``checkpoint`` / ``forward`` / ``rollback``), a
proposer, the logits pipeline and a criterion; it never asks which model it runs. Host-side bookkeeping
(committed tokens, which rows are still active) lives on the CPU and is updated from one device->host copy
of the emitted tokens per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .drafting.base import Proposer
from .kernels.decode_step import fused_verifier
from .sampling import LogitsPipeline, sample_from_weights
from .tree import DraftTree
from .verify import verify, verify_tree

__all__ = ["DecodeState", "GenerationStats", "decode"]


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


class DecodeState:
    """Committed tokens and per-row progress, kept on the CPU.

    Attributes:
        tokens: LongTensor [B, T + max_new_tokens]: the (left-padded) prompt, then each row's new tokens.
        valid: BoolTensor, same shape: prompt attention mask, then True over committed new tokens.
        num_new: LongTensor [B], new tokens committed per row.
        active: BoolTensor [B], rows still generating.
        prompt_length: T.
    """

    def __init__(self, input_ids, attention_mask, max_new_tokens, vocab_size, pipeline, generator, device):
        B, T = input_ids.shape
        self.batch_size, self.prompt_length, self.max_new_tokens = B, T, max_new_tokens
        self.vocab_size, self.pipeline, self.generator, self.device = vocab_size, pipeline, generator, device
        self.greedy = not pipeline.do_sample
        self.tokens = torch.zeros(B, T + max_new_tokens, dtype=torch.long)
        self.tokens[:, :T] = input_ids.cpu()
        self.valid = torch.zeros(B, T + max_new_tokens, dtype=torch.bool)
        self.valid[:, :T] = attention_mask.cpu().bool()
        self.num_new = torch.zeros(B, dtype=torch.long)
        self.active = torch.full((B,), max_new_tokens > 0, dtype=torch.bool)

    @property
    def lengths(self) -> torch.Tensor:
        """LongTensor [B]: end of each row's committed tokens in ``tokens``."""
        return self.prompt_length + self.num_new

    @property
    def remaining(self) -> torch.Tensor:
        """LongTensor [B]: tokens each active row may still add (0 for finished rows)."""
        return torch.where(self.active, self.max_new_tokens - self.num_new, 0)

    def last_tokens(self, n: int = 1) -> torch.Tensor:
        """LongTensor [B, n] (CPU): the last ``n`` committed tokens of each row."""
        idx = (self.lengths.unsqueeze(1) - n + torch.arange(n)).clamp_min(0)
        return self.tokens.gather(1, idx)

    def commit(self, emitted: torch.Tensor, eos_token_ids: torch.Tensor | None) -> torch.Tensor:
        """Append this step's emitted tokens [B, L] (-1 padded, CPU) to the active rows.

        Truncates at the first EOS (kept) and at ``max_new_tokens``; updates ``active``.
        Returns the number of tokens committed per row, LongTensor [B].
        """
        B, L = emitted.shape
        pos = torch.arange(L).expand(B, L)
        count = (emitted >= 0).sum(-1)
        count = torch.minimum(count, self.remaining)
        if eos_token_ids is not None and eos_token_ids.numel():
            is_eos = torch.isin(emitted, eos_token_ids) & (pos < count.unsqueeze(1))
            first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, count)
            count = torch.minimum(count, first_eos)
            hit_eos = is_eos.any(-1)
        else:
            hit_eos = torch.zeros(B, dtype=torch.bool)
        take = pos < count.unsqueeze(1)
        rows, cols = take.nonzero(as_tuple=True)
        dest = self.lengths[rows] + cols
        self.tokens[rows, dest] = emitted[rows, cols]
        self.valid[rows, dest] = True
        self.num_new += count
        self.active &= ~hit_eos & (self.num_new < self.max_new_tokens)
        return count


@torch.no_grad()
def decode(
    target,
    proposer: Proposer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    window: int,
    pipeline: LogitsPipeline,
    criterion="exact",
    generator=None,
    eos_token_ids: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
    callback=None,
    kernels: str = "auto",
) -> tuple[DecodeState, GenerationStats]:
    """Run the speculative loop; see the module docstring.

    Args:
        target: an adapter with ``vocab_size``, ``prefill``, ``checkpoint``, ``forward``, ``rollback``.
        proposer: the drafter.
        input_ids, attention_mask: [B, T] prompt, left padded.
        window: tokens verified per target forward (1 anchor + up to ``window - 1`` drafts).
        callback: called as ``callback(step, state)`` after every commit (step 0 is the prefill).
        kernels: verification backend, ``"auto"`` (the fused Triton step on CUDA when triton imports; the
            ``MMSPEC_KERNELS`` environment variable may force either), ``"triton"`` or ``"torch"``. The fused
            step takes the raw logits; it is skipped (torch path) when the pipeline has logits processors or the
            criterion is not fusable, see ``mmspec.kernels.decode_step``.
    Returns:
        the final ``DecodeState`` (committed tokens) and ``GenerationStats``.
    """
    t0 = time.perf_counter()
    device = input_ids.device
    stats = GenerationStats(accepted_histogram=[0] * window)
    state = DecodeState(input_ids, attention_mask, max_new_tokens, target.vocab_size, pipeline, generator, device)
    row_forwards = torch.zeros(state.batch_size, dtype=torch.long)
    bar = tqdm(total=max_new_tokens, disable=not progress, desc="tokens", leave=False)
    fused = fused_verifier(kernels, pipeline, criterion, proposer, device)  # None: the torch path below

    if max_new_tokens > 0:
        last = target.prefill(input_ids, attention_mask, **(model_kwargs or {}))  # [B, V]
        stats.target_forwards += 1
        row_forwards += 1
        scores = pipeline.process(last.unsqueeze(1), state.tokens, state.lengths)[:, 0]
        if state.greedy:
            anchor = scores.argmax(-1)
        else:
            anchor = sample_from_weights(pipeline.probs(scores), generator)
        state.commit(anchor.cpu().unsqueeze(1), eos_token_ids)
        proposer.start(state)
        if callback is not None:
            callback(0, state)

    while bool(state.active.any()):
        active = state.active.clone()
        max_drafts = max(0, min(window - 1, int(state.remaining.max()) - 1))
        draft = proposer.propose(state, max_drafts)
        target.checkpoint()
        if isinstance(draft, DraftTree):
            result, rows = _tree_step(target, draft, anchor, active, state, pipeline, criterion, generator)
            stats.tree_nodes += int(draft.valid[active].sum())
            L = result.tokens.shape[1]
            packed = torch.cat([result.tokens, result.accepted.long()], dim=1).cpu()  # the step's one sync
            emitted, on_path = packed[:, :L], packed[:, L:].bool() & active.unsqueeze(1)
            keep = torch.cat([active.unsqueeze(1), on_path], dim=1)  # anchor + accepted path, per block column
        else:
            drafts, draft_probs = draft
            K = drafts.shape[1]
            block = torch.cat([anchor.unsqueeze(1), drafts], dim=1)
            logits = target.forward(block, active.unsqueeze(1).expand(-1, K + 1))
            if fused is not None:
                result, rows = fused(drafts, draft_probs, logits, generator)
            elif state.greedy:
                rows = pipeline.process(logits, state.tokens, state.lengths, drafts)
                result = verify(drafts, None, rows, greedy=True)
            else:
                rows = pipeline.probs(pipeline.process(logits, state.tokens, state.lengths, drafts))
                result = verify(drafts, draft_probs, rows, criterion, generator)
            emitted = result.tokens.cpu()  # the one device -> host sync of the step
            keep = None
        stats.target_forwards += 1
        row_forwards += active
        num_accepted = (emitted >= 0).sum(-1) - 1
        for k in num_accepted[active].tolist():
            stats.accepted_histogram[k] += 1
        before = int(state.num_new.max())
        state.commit(emitted, eos_token_ids)
        bar.update(int(state.num_new.max()) - before)
        target.rollback(torch.where(active, num_accepted + 1, 0) if keep is None else keep)
        proposer.update(state, result, rows, num_accepted)
        anchor = result.next_token
        if callback is not None:
            callback(stats.target_forwards - 1, state)

    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.draft_forwards = proposer.draft_forwards
    stats.new_tokens_per_row = state.num_new.tolist()
    stats.new_tokens = int(state.num_new.sum())
    stats.row_forwards = row_forwards.tolist()
    stats.wall_time = time.perf_counter() - t0
    return state, stats


def _tree_step(target, tree: DraftTree, anchor, active, state, pipeline, criterion, generator):
    """One target forward over ``[anchor, tree nodes]`` and the tree's verification -> (result, rows [B, N+1, V])."""
    B = anchor.shape[0]
    block = torch.cat([anchor.unsqueeze(1), tree.tokens], dim=1)
    valid = active.unsqueeze(1) & torch.cat([torch.ones(B, 1, dtype=torch.bool), tree.valid], dim=1)
    logits = target.forward(block, valid, tree=tree)
    rows = pipeline.process(logits, state.tokens, state.lengths, tree=tree)
    if state.greedy:
        return verify_tree(tree, rows, greedy=True), rows
    rows = pipeline.probs(rows)
    return verify_tree(tree, rows, criterion, generator), rows
