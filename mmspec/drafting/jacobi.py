"""Speculative Jacobi decoding: the target drafts for itself (SJD, Teng et al. 2024).

The window holds draft tokens beyond the committed prefix together with the row ``q`` each was drawn
from. After a step with ``n`` accepted drafts, the target's own rows ``p`` at the later window positions
(computed in the same forward) become the next drafts: ``y_j ~ p_j`` with ``q = p_j``. Slots that have no
such row are filled by an *init strategy*; their ``q`` is one-hot (deterministic given the generator).

With ``coupled=True`` a slot that already held a draft ``x`` (drawn from ``q_old``) is redrawn from the new
row ``p`` by keeping ``x`` with probability ``min(1, p(x)/q_old(x))``, else drawing from
``max(p - q_old, 0)`` (MC-SJD / SCD). Its marginal is still ``p``, so verification stays exact, while drafts
stop churning between iterations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sampling import onehot, sample_categorical, uniform
from ..tree import DraftTree, closest_rows, parse_tree, tree_size, with_alternatives
from ..verify import _row, speculative_redraw, take_rows
from .base import Proposer, pad_drafts, row_limits

__all__ = ["JacobiProposer", "INIT_STRATEGIES", "register_init", "random_tokens"]

#: name -> fn(state, proposer, window [B, 1 + K] (anchor then drafts), fill [B, K] bool) -> tokens [B, K],
#: or (tokens, probs [B, K, V]) when the init tokens are drawn from a distribution (else their q is one-hot).
#: Random draws pass ``counts=proposer.limit`` (each row's own window, see ``mmspec.sampling``).
INIT_STRATEGIES: dict[str, Callable] = {}


def register_init(name: str):
    """Register a Jacobi init strategy for new window slots."""

    def wrap(fn):
        INIT_STRATEGIES[name] = fn
        return fn

    return wrap


def random_tokens(shape, low: int, high: int, generator, device, counts=None) -> torch.Tensor:
    """Uniform token ids in ``[low, high)`` from ``generator`` (one per row allowed; ``counts`` as ``uniform``)."""
    u = uniform(shape, generator, device, counts)  # (0, 1]
    return (low + ((1.0 - u) * (high - low)).floor().long()).clamp_(low, high - 1)


@register_init("random")
def _init_random(state, proposer, window, fill):
    low, high = proposer.token_range or (0, state.vocab_size)
    return random_tokens(fill.shape, low, high, state.generator, window.device, proposer.limit)


@register_init("repeat")
@register_init("horizontal")
def _init_repeat(state, proposer, window, fill):
    """Copy the left neighbour: each empty slot repeats the last token before it."""
    K = fill.shape[1]
    pos = torch.arange(1, K + 1, device=window.device).expand_as(fill)
    src = torch.where(fill, torch.zeros_like(pos), pos).cummax(-1).values  # last filled index (0 = anchor)
    return window.gather(1, src)


@register_init("vertical")
def _init_vertical(state, proposer, window, fill):
    """Copy the token one grid row above (committed, or a draft earlier in the window); rows without a row
    above fall back to the left neighbour. Needs the proposer's ``layout``."""
    layout = proposer.layout
    if layout is None:
        raise ValueError("Jacobi init 'vertical' needs an image layout (use it through an image pipeline).")
    K, stride, dev = fill.shape[1], layout.row_stride, window.device
    committed = state.num_new.to(dev)  # new tokens committed; the anchor is new index committed - 1
    slot_index = committed.unsqueeze(1) - 1 + torch.arange(1, K + 1, device=dev)  # new index of each slot
    above = slot_index - stride
    horizontal = _init_repeat(state, proposer, window, fill)
    # Above a slot is either committed text (new index < committed) or an earlier window slot.
    lengths = (state.prompt_length + above.clamp_min(0)).cpu()
    from_committed = state.tokens.gather(1, lengths.clamp(max=state.tokens.shape[1] - 1)).to(dev)
    tokens = torch.where(fill, horizontal, window[:, 1:])
    in_window = above >= committed.unsqueeze(1)
    for _ in range(-(-K // stride)):  # slots above may themselves be fresh: resolve one grid row per pass
        src = (above - committed.unsqueeze(1) + 1).clamp(1, K)  # window index of the slot above
        from_window = torch.cat([window[:, :1], tokens], dim=1).gather(1, src)
        vertical = torch.where(in_window, from_window, from_committed)
        tokens = torch.where(fill & (above >= 0), vertical, tokens)
    return tokens


def _copy_back(state, window, fill, stride: int, base: torch.Tensor) -> torch.Tensor:
    """Fill empty slots with the token ``stride`` new-token positions earlier: committed, or an earlier window
    slot (itself possibly filled this way). Slots with no such position keep ``base`` [B, K], which must hold
    the current drafts at the non-empty slots."""
    K, dev = fill.shape[1], window.device
    committed = state.num_new.to(dev).unsqueeze(1)  # the anchor is new index committed - 1
    source = committed - 1 + torch.arange(1, K + 1, device=dev) - stride  # new index copied by each slot
    lengths = (state.prompt_length + source.clamp_min(0)).cpu()
    from_committed = state.tokens.gather(1, lengths.clamp(max=state.tokens.shape[1] - 1)).to(dev)
    in_window = source >= committed
    src = (source - committed + 1).clamp(1, K)  # window index of the source slot
    copy = fill & (source >= 0)
    tokens = base
    for _ in range(-(-K // stride)):  # a source may itself be an empty slot: resolve one stride per pass
        from_window = torch.cat([window[:, :1], tokens], dim=1).gather(1, src)
        tokens = torch.where(copy, torch.where(in_window, from_window, from_committed), base)
    return tokens


@register_init("temporal")
def _init_temporal(state, proposer, window, fill):
    """Copy the token at the same place in the previous frame (committed, or a draft earlier in the window,
    so windows may span frame borders); slots of the first frame fall back to ``vertical``. Needs the
    proposer's layout; a single image (an ``ImageLayout`` without frames) has no previous frame."""
    layout = proposer.layout
    if layout is None:
        raise ValueError("Jacobi init 'temporal' needs a video layout (use it through the video pipeline).")
    base = _init_vertical(state, proposer, window, fill)
    stride = getattr(layout, "frame_stride", None)
    if stride is None or getattr(layout, "frames", 1) < 2:
        return base
    return _copy_back(state, window, fill, stride, base)


@register_init("sample_horizon")
def _init_sample_horizon(state, proposer, window, fill):
    """Draw empty slots from the target's furthest row of the last step (its horizon), q = that row.
    Before the first verification there is no such row, so slots repeat the left neighbour."""
    horizon = getattr(proposer, "horizon", None)
    if horizon is None:
        return _init_repeat(state, proposer, window, fill)
    rows = horizon.unsqueeze(1).expand(-1, fill.shape[1], -1)
    if state.greedy:
        return rows.argmax(-1), None
    return sample_categorical(rows, state.generator, proposer.limit), rows


class JacobiProposer(Proposer):
    """The target's own previous-iteration predictions as drafts.

    Args:
        window: tokens per target forward (1 anchor + ``window - 1`` drafts).
        init: name in ``INIT_STRATEGIES`` (``"random"``, ``"repeat"``, ...) for slots with no prediction yet.
        coupled: redraw continuing slots with the coupled rule (sampling only; greedy drafts are argmax).
        token_range: ``(low, high)`` ids that random init may draw (default: the layout's image tokens, else
            the whole vocabulary).
        layout: an ``ImageLayout`` (or ``VideoLayout``) for grid-aware init (``vertical``, ``temporal``) and
            forced structural tokens.
        tree: ``(width, depth)`` for proactive drafting (SJD-PAC): each of the first ``depth`` window slots that
            continues a draft gets ``width - 1`` further candidates drawn from the same stale row without
            replacement (the next-best tokens when greedy), and those levels form a full ``width``-ary tree of
            ``mmspec.tree.tree_size(width, depth)`` nodes (the slot's draft first among every node's children);
            the chain of drafts continues alone below, in what is left of the window. None: a plain chain.
    """

    def __init__(self, window: int, init: str = "random", coupled: bool = False, token_range=None, layout=None,
                 tree=None):
        if init not in INIT_STRATEGIES:
            raise ValueError(f"unknown Jacobi `init` {init!r}; available: {sorted(INIT_STRATEGIES)}.")
        self.tree = parse_tree(tree)
        self.num_drafts = window - 1
        if self.tree is not None:
            width, depth = self.tree
            self.num_drafts = window - 1 - (tree_size(width, depth) - depth)
            if self.num_drafts < depth:
                raise ValueError(
                    f"tree={tree!r} needs a window of at least {1 + tree_size(width, depth)} tokens (1 anchor + a "
                    f"full {width}-ary tree over {depth} levels), got window={window}."
                )
        self.init, self.coupled, self.layout = init, coupled, layout
        self.token_range = token_range or (layout.token_range if layout is not None else None)
        self.horizon = None  # the target's last row of the previous step [B, V]
        self.tokens = None  # [B, K] continuing drafts (left-aligned)
        self.probs = None  # [B, K, V] their q rows (sampling only)
        self.rows = None  # [B, K, V] the target rows the continuing drafts came from (for tree alternatives)
        self.count = None  # [B] how many of them are real predictions; the rest are filled by init
        self.limit = None  # [B] (CPU) drafts each row proposes this step (its own window)

    def start(self, state):
        B, dev = state.batch_size, state.device
        self.tokens = torch.zeros(B, self.num_drafts, dtype=torch.long, device=dev)
        self.probs = None
        self.rows = None
        self.count = torch.zeros(B, dtype=torch.long, device=dev)
        self.horizon = None
        self._tree = None
        self._anchor = state.last_tokens(1).to(dev)[:, 0]

    def propose(self, state, max_tokens):
        K = min(self.num_drafts, max_tokens)
        self.limit = row_limits(state, K)
        tokens = self.tokens[:, :K]
        self._proposed_len = K
        fill = torch.arange(K, device=tokens.device).unsqueeze(0) >= self.count.unsqueeze(1)
        window = torch.cat([self._anchor.unsqueeze(1), tokens], dim=1)
        init = INIT_STRATEGIES[self.init](state, self, window, fill)
        init, init_probs = init if isinstance(init, tuple) else (init, None)
        if self.layout is not None:  # structural slots (end of line / image) get their forced token
            slot_index = state.num_new.to(tokens.device).unsqueeze(1) + torch.arange(K, device=tokens.device)
            forced = self.layout.forced_token(self.layout.kind(slot_index))
            init = torch.where(forced >= 0, forced, init)
            init_probs = None if init_probs is None else torch.where(
                (forced >= 0).unsqueeze(-1), onehot(init, state.vocab_size, init_probs.dtype), init_probs)
        drafts = pad_drafts(torch.where(fill, init, tokens), self.limit)
        if state.greedy:
            return (drafts, None) if self.tree is None else self._with_alternatives(state, drafts, None, fill)
        q = onehot(drafts.clamp_min(0), state.vocab_size, dtype=torch.float64)
        if init_probs is not None:
            q = torch.where(fill.unsqueeze(-1), init_probs.to(q.dtype), q)
        if self.probs is not None:
            q = torch.where(fill.unsqueeze(-1), q, self.probs[:, :K].to(q.dtype))
        self._proposed, self._proposed_probs = drafts, q
        if self.tree is None:
            return drafts, q
        return self._with_alternatives(state, drafts, q, fill)

    def _with_alternatives(self, state, drafts, q, fill):
        """The chain plus siblings from the stale rows (``mmspec.tree.with_alternatives``); fresh init slots have
        no row and get none."""
        if self.rows is None:
            return drafts, q
        width, depth = self.tree
        self._tree = with_alternatives(drafts, q, self.rows, ~fill, width, depth, state.greedy, state.generator)
        return self._tree

    def update(self, state, result, target_rows, num_accepted):
        tree = getattr(self, "_tree", None)
        self._tree = None
        if isinstance(tree, DraftTree):  # per depth, the row of the node that agrees longest with what was committed
            index = closest_rows(tree, result.tokens, self._proposed_len + 1)
            target_rows = take_rows(target_rows, index)
        elif self.tree is not None:  # a chain step (no alternatives this time): its rows come first in the block
            target_rows = target_rows[:, : self._proposed_len + 1]
        B, K1, V = target_rows.shape
        K = K1 - 1
        limit = self.limit.to(target_rows.device)  # each row's own window: rows past it are never drawn or read
        if state.greedy:
            new = target_rows.argmax(-1)  # [B, K+1]
        else:
            new = sample_categorical(target_rows, state.generator, self.limit + 1)
            if self.coupled and K > 0:
                redrawn = speculative_redraw(self._proposed, self._proposed_probs, target_rows[:, :K], state.generator,
                                             self.limit)
                new = torch.cat([redrawn, new[:, K:]], dim=1)
        n = result.num_accepted
        # Position j of the next window is the slot right after the new anchor (index n) plus j.
        src = n.unsqueeze(1) + 1 + torch.arange(self.num_drafts, device=n.device)
        have = src <= limit.unsqueeze(1)
        src = src.clamp(max=K)
        self.tokens = new.gather(1, src)
        self.count = have.sum(-1)
        if not state.greedy:
            self.probs = take_rows(target_rows, src)
        if self.tree is not None:
            self.rows = self.probs if not state.greedy else take_rows(target_rows, src)
        self.horizon = _row(target_rows, limit)
        self._anchor = result.next_token
