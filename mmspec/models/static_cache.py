"""A static KV cache with per-row lengths: preallocated once, rolled back by moving lengths.

``CausalLM(model, cache="static")`` keeps its keys and values here instead of in a growing ``DynamicCache``.
Every layer holds ``[B, H_kv, capacity, D]`` tensors allocated once (after the prefill, which runs on the
model's usual cache and is copied in). Row ``b`` keeps its left padding at columns ``[0, pad[b])`` and its
valid tokens, contiguous, at ``[pad[b], lens[b])``; the position of column ``c`` is ``c - pad[b]``.

A block of W places is written at each row's own offset in one scatter: the row's valid places go to columns
``lens[b] + 0, 1, ...`` in block order and its invalid ones (holes: a finished row, a draft slot the row does
not use, bucket padding) after them, so the valid tokens stay contiguous without a copy. Rollback moves
``lens`` back; rejected columns are overwritten by the next block, nothing is cropped. A token tree's accepted
path (a subset of the block, not a prefix) is compacted after verification by a gather/scatter of those
columns inside each layer (W columns per layer: cheap next to the forward), which keeps the invariant above.
That choice, rather than keeping off-path nodes as holes, is what lets positions, masks and rollback depend on
the per-row lengths alone, with fixed shapes per window size (what ``torch.compile`` and CUDA graphs need).

The attention mask ``[B, 1, W, capacity]`` is built from ``lens``, ``pad``, the block's write order and the
block's own structure (causal for a chain, ancestors for a tree); sliding-window layers also cut keys more
than the window behind the query's position.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer

__all__ = ["RowStaticCache", "RowStaticLayer", "write_order", "window_masks"]


class RowStaticLayer(StaticLayer):
    """One layer's preallocated keys and values ``[B, H_kv, capacity, D]``, written at per-row columns.

    transformers' ``StaticLayer`` writes one column range shared by the batch; this one takes a column per row
    and place (``RowStaticCache.write_columns``). It never drops columns: sliding-window layers keep all of
    them and get their window from the mask.
    """

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, columns: torch.Tensor,
              length: int | None = None):
        """key/value states [B, H, W, D], columns [B, W] -> keys and values [B, H, length or capacity, D] (views of
        the first ``length`` columns: what the block may see)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, W, D = key_states.shape
        self.keys.scatter_(2, columns[:, None, :, None].expand(B, H, W, D), key_states)
        self.values.scatter_(2, columns[:, None, :, None].expand(B, H, W, value_states.shape[-1]), value_states)
        if length is None:
            return self.keys, self.values
        return self.keys[:, :, :length], self.values[:, :, :length]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy columns ``src`` [B, M] to ``dst`` [B, M] in every row (a tree's accepted path to the row's next
        columns); all sources are read before any destination is written."""
        for name in ("keys", "values"):
            t = getattr(self, name)
            B, H, _, D = t.shape
            moved = t.gather(2, src[:, None, :, None].expand(B, H, src.shape[1], D))
            t.scatter_(2, dst[:, None, :, None].expand(B, H, dst.shape[1], D), moved)

    def get_seq_length(self) -> int:
        return self.max_cache_len if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Refused on purpose: rejected columns are overwritten, the adapter moves its per-row lengths instead."""
        from .causal_lm import RollbackError

        raise RollbackError("a RowStaticCache is rolled back by its adapter's per-row lengths, not cropped; "
                            "use CausalLM.rollback.")


class RowStaticCache(Cache):
    """A transformers ``Cache`` of ``RowStaticLayer`` s. The adapter sets ``write_columns`` (LongTensor [B, W] on
    the device) before each forward; every layer's ``update`` scatters the block's keys and values there and
    returns the full preallocated tensors (the mask hides the columns a row does not see), or their first
    ``kv_length`` columns when the adapter sets it (eager runs: attention over the used columns only; compiled runs
    keep the full, fixed shape)."""

    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[RowStaticLayer(max_cache_len=capacity) for _ in range(num_layers)])
        self.capacity = capacity
        self.write_columns: torch.Tensor | None = None
        self.kv_length: int | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].write(key_states, value_states, self.write_columns, self.kv_length)

    @property
    def is_compileable(self) -> bool:
        return True

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """(key columns attention sees, offset 0), for transformers' own mask code (a single query without padding,
        where the adapter passes no mask)."""
        return (self.kv_length or self.capacity), 0

    @classmethod
    def from_cache(cls, cache, capacity: int) -> RowStaticCache:
        """A static cache holding what a ``DynamicCache`` (the prefill's) holds, at columns ``[0, T)``."""
        layers = list(cache.layers)
        T = layers[0].keys.shape[2]
        if capacity < T:
            raise ValueError(f"a static cache of capacity {capacity} cannot hold the prompt's {T} columns.")
        new = cls(len(layers), capacity)
        for src, dst in zip(layers, new.layers):
            dst.lazy_initialization(src.keys, src.values)
            dst.keys[:, :, :T].copy_(src.keys)
            dst.values[:, :, :T].copy_(src.values)
        return new

    def grown(self, capacity: int) -> RowStaticCache:
        """A larger copy (a run that outgrew its reservation; under ``torch.compile`` this costs one recompile)."""
        new = RowStaticCache(len(self.layers), capacity)
        for src, dst in zip(self.layers, new.layers):
            dst.lazy_initialization(src.keys, src.values)
            dst.keys[:, :, : self.capacity].copy_(src.keys)
            dst.values[:, :, : self.capacity].copy_(src.values)
        return new

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for layer in self.layers:
            layer.move(src, dst)


def write_order(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each block place goes: valid places first (in block order), then the holes.

    Args:
        valid: BoolTensor [B, W] (CPU).
    Returns:
        (rank [B, W]: the column offset of block place j, order [B, W]: the block place at column offset r), the
        inverse permutations of each other.
    """
    B, W = valid.shape
    if bool(valid.all()):
        ar = torch.arange(W).expand(B, W)
        return ar, ar
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(W).expand(B, W).contiguous())
    return rank, order


def window_masks(lens: torch.Tensor, pad: torch.Tensor, order: torch.Tensor, valid: torch.Tensor,
                 positions: torch.Tensor, capacity: int, ancestors: torch.Tensor | None = None,
                 sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Boolean attention masks of a block over the whole static cache.

    Args:
        lens, pad: LongTensor [B]: each row's used columns before the block and its left padding.
        order: LongTensor [B, W]: the block place written at column ``lens[b] + r`` (``write_order``).
        valid: BoolTensor [B, W] on the device: real block places.
        positions: LongTensor [B, W]: each block place's position (``pad``-free count, without model offsets).
        capacity: cache columns.
        ancestors: BoolTensor [B, W, W] (query, key; a tree's ``block_ancestors``), None for a chain (causal).
        sliding_window: also return the mask of sliding-window layers (keys less than this many positions back).
    Returns:
        (full [B, W, capacity], sliding [B, W, capacity] or None): True where a query sees a key.
    """
    B, W = order.shape
    dev = order.device
    col = torch.arange(capacity, device=dev)
    rel = col - lens[:, None]  # [B, C] column offset into the block
    in_block = (rel >= 0) & (rel < W)
    committed = (col >= pad[:, None]) & (rel < 0)
    key_place = order.gather(1, rel.clamp(0, W - 1))  # [B, C] block place held by each block column
    if ancestors is None:
        ancestors = torch.ones(W, W, dtype=torch.bool, device=dev).tril().expand(B, W, W)
    eye = torch.eye(W, dtype=torch.bool, device=dev)
    inner = (ancestors & valid[:, None, :]) | eye  # every query sees itself: no empty rows
    block = inner.gather(2, key_place[:, None, :].expand(B, W, capacity)) & in_block[:, None, :]
    full = block | committed[:, None, :]
    if sliding_window is None:
        return full, None
    key_pos = torch.where(in_block, positions.gather(1, key_place), col - pad[:, None])  # [B, C]
    near = (positions[:, :, None] - key_pos[:, None, :]) < sliding_window
    return full, full & near
