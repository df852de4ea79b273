"""Adapter for transformers causal LMs: a per-row ragged KV cache that can be rolled back.

Rows of a batch accept different numbers of drafts in a step. Instead of cutting every row to the batch
minimum (which biases sampling, docs/algorithms.md section 7), the cache keeps one common length and
each row marks its rejected positions as *holes* in its attention mask. Position ids count valid tokens only,
so every row sees exactly the positions plain decoding would give it. Trailing positions that no row kept are
cropped from the transformers cache (``Cache.crop(-n)``, transformers 5.x).

Two cases need an explicit 4-D attention mask instead of the 2-D one, built here from the same bookkeeping:
* token trees (``forward(..., tree=...)``): each node attends to the committed prefix and its own ancestors
  only, at the position of its depth; after verification the accepted path is moved to the front of the block's
  columns and the rest cropped or left as holes like any rejection (``rollback`` with a column mask);
* sliding-window layers (Mistral, Gemma 2/3, Qwen2 with ``use_sliding_window``): the window must count
  *positions*, not cache columns, once holes exist. The cache then keeps every column (a plain
  ``DynamicCache``, no sliding layers that would drop what a row still sees), and each layer kind gets its mask.
Linear-attention / recurrent layers keep a state that a hole cannot undo: those models are refused.

``CausalLM(model, cache="static")`` keeps the keys and values in a preallocated cache with per-row lengths
instead (``mmspec.models.static_cache``): fixed shapes per window size, rollback by moving lengths, no holes;
``compile=True`` runs its window forward through ``torch.compile`` (``mmspec.compile``).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from .compat import cache_keyword, output_cache

__all__ = ["CACHE_KINDS", "CausalLM", "RollbackError", "input_device", "vocab_size_of"]

#: the KV caches an adapter can keep
CACHE_KINDS = ("dynamic", "static")


class RollbackError(TypeError):
    """The model's KV cache cannot be rolled back per row (not full attention)."""


def vocab_size_of(model) -> int:
    """Number of logits the model emits (the output embedding rows, else ``config.vocab_size``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def input_device(model) -> torch.device:
    """The device a model's input ids must be on, honouring accelerate's dispatch hooks (offloaded weights)."""
    module = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if module is None:
        return next(model.parameters()).device
    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device("cuda", execution) if isinstance(execution, int) else torch.device(execution)
    return module.weight.device


#: layer kinds whose attention mask mmspec builds itself (anything else, e.g. linear attention, is refused)
_MASKED_KINDS = ("full_attention", "sliding_attention")


def _attention_layout(model) -> tuple[tuple[str, ...] | None, int | None, str | None]:
    """-> (layer kinds when the model takes a dict of masks per kind, else None; sliding window or None;
    attention implementation). Raises ``RollbackError`` for layer kinds whose cache cannot take holes."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    impl = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    if kinds is not None:
        bad = sorted(set(kinds) - set(_MASKED_KINDS))
        if bad:
            raise RollbackError(
                f"this model has layers of kind {bad} (linear / chunked attention or recurrent state), which cannot "
                "be rolled back per row without changing the result; supported kinds: "
                f"{list(_MASKED_KINDS)}."
            )
        if "sliding_attention" not in kinds:
            return None, None, impl
        return tuple(sorted(set(kinds))), int(window), impl
    return None, (int(window) if isinstance(window, int) and window > 0 else None), impl


def _check_cache(cache) -> None:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache):
        raise RollbackError(
            f"mmspec rolls back the KV cache after rejected drafts, which needs a transformers DynamicCache; "
            f"this model returned {type(cache).__name__}."
        )
    bad = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if bad:
        raise RollbackError(
            f"this model's cache has layers of kind {sorted(bad)} (sliding-window or linear attention), which "
            "cannot be rolled back per row without changing the result."
        )


class CausalLM:
    """Runs a transformers causal LM step by step over blocks of tokens with per-row validity.

    Usage by the decoding loop::

        last_logits = lm.prefill(input_ids, attention_mask)      # [B, V]
        lm.checkpoint()
        logits = lm.forward(block, valid)                        # [B, L, V]
        lm.rollback(keep)                                        # keep[b] valid tokens since checkpoint

    ``valid`` masks are CPU bool tensors (they come from host-side bookkeeping), so cropping the cache needs
    no device sync.

    Args:
        model: a transformers causal LM.
        cache: ``"dynamic"`` (a transformers ``DynamicCache`` with holes, cropped on rollback and re-laid out
            without its holes once they pile up, ``_squeeze_holes``) or ``"static"``
            (preallocated with per-row lengths, ``mmspec.models.static_cache``; needs attention that takes a 4-D
            mask: ``"sdpa"`` or ``"eager"``).
        compile: run the window forward through ``torch.compile`` (static cache only; CUDA graphs on CUDA, one
            per window size, see ``mmspec.compile``).
        reserve: new columns the static cache reserves after the prompt (generate passes its budget); a run that
            needs more grows the cache (a copy, and one recompile when compiled).
    """

    def __init__(self, model, cache: str = "dynamic", compile: bool = False, reserve: int | None = None):
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"`model` must be a transformers causal LM, got {type(model).__name__}.")
        if getattr(config, "is_encoder_decoder", False):
            raise TypeError(
                f"`model` is an encoder-decoder model ({type(model).__name__}); mmspec.generate supports "
                "decoder-only causal LMs."
            )
        self.model = model
        self._cache_keyword = cache_keyword(model)  # read once (torch.compile traces call_model)
        self.vocab_size = vocab_size_of(model)
        params = inspect.signature(model.forward).parameters
        self._has_logits_to_keep = "logits_to_keep" in params
        self._has_cache_position = "cache_position" in params or any(
            p.kind == p.VAR_KEYWORD for p in params.values()
        )
        self._mask_kinds, self.sliding_window, self._attn = _attention_layout(model)
        self.cache = None
        self.mask = None  # [B, S] long on the model's device
        self._pos = None  # [B, S] the position of every cache column (any value at holes), on the device
        self._mbuf, self._cols = None, 0  # host mirror of the mask: numpy bool [B, capacity], columns used
        self._true_from = None  # columns from here to ``_cols`` are valid in every row but not yet written
        self._start = 0
        self._dense = False
        #: LongTensor [B] added to decode positions (set by adapters whose models number positions otherwise)
        self.position_offset = None
        if cache not in CACHE_KINDS:
            raise ValueError(f"`cache` must be one of {list(CACHE_KINDS)}, got {cache!r}.")
        if compile and cache != "static":
            raise ValueError("`compile=True` needs the static KV cache (cache='static'): a growing cache changes "
                             "shapes every step, which would recompile every step.")
        self.static = cache == "static"
        self.reserve = reserve
        self._lens = None  # static cache: LongTensor [B] (CPU) used columns per row, left padding included
        self._compiled = None
        if self.static:
            self._check_4d_mask("the static KV cache")
        if compile:
            from ..compile import compile_window

            self._compiled = compile_window(self._window_call, self.device)

    @property
    def device(self) -> torch.device:
        """Where input ids go: the input embedding's device, or its execution device when accelerate offloads
        it (``device_map`` with ``"cpu"`` / ``"disk"`` entries keeps the weight on ``meta``). Logits are moved
        here too, so a model sharded over several devices (``device_map="auto"``) needs nothing else."""
        return input_device(self.model)

    @property
    def _mask_cpu(self) -> torch.Tensor | None:
        """BoolTensor [B, S] (CPU): the host mirror of the cache's mask (a view of a growing numpy buffer, so
        appending a block is one slice write rather than a copy of the whole mask)."""
        return None if self._mbuf is None else torch.from_numpy(self._host_mask())

    @_mask_cpu.setter
    def _mask_cpu(self, mask: torch.Tensor) -> None:
        mask = mask.detach().to("cpu", torch.bool).numpy()
        self._mbuf = np.empty((mask.shape[0], max(64, 2 * mask.shape[1])), dtype=bool)
        self._cols, self._true_from = mask.shape[1], None
        self._mbuf[:, : self._cols] = mask

    def _host_mask(self) -> np.ndarray:
        """The host mirror, bool [B, S] (a view): blocks appended without holes are written here, on first read."""
        if self._true_from is not None:
            self._mbuf[:, self._true_from : self._cols] = True
            self._true_from = None
        return self._mbuf[:, : self._cols]

    def _append_mask(self, valid: np.ndarray | None, length: int) -> None:
        """Append ``length`` block columns to the host mirror (amortised O(L)): ``valid`` [B, L], or None when every
        place is valid (then nothing is written until the mirror is read: plain decoding never reads it)."""
        S, L = self._cols, length
        if S + L > self._mbuf.shape[1]:
            grown = np.empty((self._mbuf.shape[0], 2 * (S + L)), dtype=bool)
            grown[:, :S] = self._mbuf[:, :S]
            self._mbuf = grown
        if valid is None:
            self._true_from = S if self._true_from is None else self._true_from
        else:
            self._host_mask()
            self._mbuf[:, S : S + L] = valid
        self._cols = S + L

    @property
    def length(self) -> int:
        """Cache length (valid tokens plus holes; static cache: the longest row's used columns)."""
        if self.static and self._lens is not None:
            return int(self._lens.max())
        return self._cols

    def num_valid(self) -> torch.Tensor:
        """LongTensor [B] (CPU): valid tokens per row in the cache."""
        if self.static:
            return self._lens - self._pad
        return torch.from_numpy(self._host_mask().sum(-1))

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """Run the prompt (left padding allowed) and return the last position's logits [B, V].

        ``model_kwargs`` (``pixel_values`` and the like) go to this forward only.
        """
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        kwargs = dict(model_kwargs)
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        cache = None
        if self.sliding_window is not None:  # keep every column: holes make the window count positions
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache()
        logits, self.cache = self.call_model(input_ids, mask, position_ids, cache, **kwargs)
        _check_cache(self.cache)
        self.mask = mask
        self._pos = position_ids
        self._mask_cpu = attention_mask.detach().to("cpu", torch.bool)
        self._dense = bool(self._mask_cpu.all())
        # Models that expand the prompt (image placeholder tokens -> many embeddings) report their own length.
        seq_len = self.cache.get_seq_length()
        if seq_len != mask.shape[1]:
            raise RollbackError(
                f"the model cached {seq_len} positions for a prompt of {mask.shape[1]}; models that expand the "
                "prompt inside forward need their own adapter."
            )
        if self.static:
            self._start_static()
        return logits[:, -1].to(self.device)

    def call_model(self, input_ids, attention_mask, position_ids, past_key_values, **kwargs):
        """One forward of the wrapped model -> (logits [B, L, V], cache). Families with quirks (separate
        image-token embeddings or heads, condition embeddings) override this and nothing else."""
        kwargs[self._cache_keyword] = past_key_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, return_dict=True, **kwargs)
        return out.logits, output_cache(out)

    def checkpoint(self) -> None:
        """Mark the cache length; ``rollback`` then keeps a per-row number of tokens added since."""
        if self.static:
            self._ckpt, self._blocks = self._lens.clone(), 0
        self._start = self.length

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, logits_to_keep: int = 0, tree=None) -> torch.Tensor:
        """Append a block and return its logits.

        Args:
            tokens: LongTensor [B, L] on the model's device (values at invalid places are ignored).
            valid: BoolTensor [B, L] on the CPU; invalid places become holes in the attention mask.
            logits_to_keep: 0 for the logits of every position, n > 0 for the last n only (a drafter needs
                one row; skipping the others saves most of a small model's output projection).
            tree: None (the block is a chain), or a ``mmspec.tree.DraftTree`` of the ``L - 1`` tokens after the
                block's first one: each token then attends to the cache, the first token and its own ancestors,
                at the position of its depth.
        Returns:
            logits [B, L, V] (``[B, n, V]`` with ``logits_to_keep=n``).
        """
        if self.static:
            return self._static_forward(tokens, valid, logits_to_keep, tree)
        B, L = tokens.shape
        dev = tokens.device
        S = self.length
        cache_position = torch.arange(S, S + L, device=dev)
        # Without padding or holes (``dense``) every row holds S valid tokens, and the 2-D mask says nothing
        # causality does not: the model takes its fast (mask-free) attention path and no mask is kept.
        dense = self._dense and all(map(all, valid.tolist()))  # Python on a few values: see DecodeState.commit
        valid_dev = valid.to(dev, non_blocking=True).long() if not dense or self.mask is not None else None
        if tree is None:
            if dense:
                position_ids = cache_position.expand(B, L)
            else:
                start = self.num_valid().to(dev, non_blocking=True)
                position_ids = (start.unsqueeze(1) + valid_dev.cumsum(-1) - 1).clamp_min(0)
        else:
            start = self.num_valid().to(dev, non_blocking=True)
            position_ids = start.unsqueeze(1) + tree.depths().to(dev)
        self._append_mask(None if dense else valid.numpy(), L)
        if dense and tree is None and self.sliding_window is None:
            self.mask = None  # built again from the host mirror when needed
        elif self.mask is None:
            self.mask = self._mask_cpu.to(dev, non_blocking=True).long()
        else:
            self.mask = torch.cat([self.mask, valid_dev], dim=1)
        if self.sliding_window is not None:
            self._pos = torch.cat([self._pos, position_ids], dim=1)  # logical positions of the columns
        if self.position_offset is not None:
            position_ids = position_ids + self.position_offset.unsqueeze(1)
        kwargs = {"cache_position": cache_position} if self._has_cache_position else {}
        if logits_to_keep and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if tree is not None or (self.sliding_window is not None and not dense):
            mask = self._block_mask(S, L, None if tree is None else tree.ancestors())
        else:
            mask = None if dense else self.mask
        self._dense = dense and tree is None
        logits, self.cache = self.call_model(tokens, mask, position_ids, self.cache, **kwargs)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        # logits on the last device of a model sharded over devices
        return logits if logits.device == dev else logits.to(dev)

    def _check_4d_mask(self, what: str) -> None:
        if self._attn not in (None, "sdpa", "eager"):
            raise RollbackError(
                f"{what} needs a 4-D attention mask, which attention implementation {self._attn!r} does not take; "
                "load the model with attn_implementation='sdpa' or 'eager'."
            )

    def _block_mask(self, S: int, L: int, ancestors: torch.Tensor | None):
        """The 4-D mask [B, 1, L, S + L] of a block appended at cache column S: the valid cache columns, then the
        block's own causal (chain, ``ancestors=None``) or ancestor (tree: ``DraftTree.ancestors()`` [B, L, L])
        structure; sliding layers also cut keys more than the window behind the query's position. A dict per layer
        kind for models that take one."""
        self._check_4d_mask("token trees and sliding windows with holes")
        dev = self.mask.device
        key_valid = self.mask.bool()  # [B, S + L]
        B = key_valid.shape[0]
        if ancestors is None:
            inner = torch.ones(L, L, dtype=torch.bool, device=dev).tril().expand(B, L, L)
        else:
            inner = ancestors.to(dev)
        allowed = torch.cat([key_valid[:, None, :S].expand(B, L, S), inner & key_valid[:, None, S:]], dim=2)
        diag = torch.arange(L, device=dev)
        allowed[:, diag, S + diag] = True  # every query sees itself: no empty rows (invalid queries are ignored)
        masks = {"full_attention": allowed}
        if self.sliding_window is not None:
            q_pos = self._pos[:, S:]
            near = (q_pos.unsqueeze(2) - self._pos.unsqueeze(1)) < self.sliding_window
            masks["sliding_attention"] = allowed & near
        return self._mask_argument(masks["full_attention"], masks.get("sliding_attention"))

    def _mask_argument(self, full: torch.Tensor, sliding: torch.Tensor | None):
        """Boolean masks [B, L, S] -> the model's ``attention_mask``: [B, 1, L, S] (additive floats for eager
        attention), or a dict per layer kind for models that take one."""
        masks = {"full_attention": full, "sliding_attention": sliding}
        dtype = getattr(self.model, "dtype", torch.float32)
        for kind, m in masks.items():
            if m is None:
                continue
            m = m.unsqueeze(1)
            if self._attn == "eager":
                m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
            masks[kind] = m
        if self._mask_kinds is not None:
            return {kind: masks[kind] for kind in self._mask_kinds}
        return masks["sliding_attention" if self.sliding_window is not None else "full_attention"]

    def rollback(self, keep: torch.Tensor) -> None:
        """Keep, in row b, the first ``keep[b]`` valid tokens added since ``checkpoint`` (LongTensor [B]), or the
        block columns where ``keep[b, j]`` is True (BoolTensor [B, L], a tree's accepted path: moved to the front
        of the block's columns, as if fed alone); drop the rest. ``keep`` is on the CPU.
        """
        if self.static:
            return self._static_rollback(keep)
        start = self._start
        if self._dense and keep.dtype != torch.bool and min(keep.tolist()) >= self._cols - start:
            self._start = self._cols  # a block without holes, kept whole (plain AR, or every draft accepted)
            return
        tail = self._host_mask()[:, start:]  # host bookkeeping in numpy: a few values, many steps
        keep = keep.numpy()
        if keep.dtype == bool:
            kept = tail & keep[:, : tail.shape[1]]
        elif (keep >= tail.sum(-1)).all():  # nothing rejected (plain AR, or every draft accepted)
            self._start = self._cols
            return
        else:
            kept = tail & (tail.cumsum(-1) <= keep[:, None])
        if np.array_equal(kept, tail):
            self._start = self._cols
            return
        if keep.dtype == bool:
            kept = self._compact(kept)
        used = kept.any(0).nonzero()[0]
        new_tail = int(used[-1]) + 1 if used.size else 0
        drop = tail.shape[1] - new_tail
        kept = kept[:, :new_tail]
        if drop:
            self.cache.crop(-drop)
        self._mbuf[:, start : start + new_tail] = kept
        self._cols = start + new_tail
        if self.mask is not None:
            kept_dev = torch.from_numpy(kept).to(self.mask.device, non_blocking=True).long()
            self.mask = torch.cat([self.mask[:, :start], kept_dev], dim=1)
        self._pos = self._pos[:, : self._cols]
        self._start = self._cols
        self._dense = bool(self._host_mask().all())
        self._squeeze_holes()

    #: the dynamic cache is re-laid out once its holes reach this fraction of the longest row's valid columns (and at
    #: least ``SQUEEZE_MIN_HOLES``): rows that accept fewer drafts than the batch's best leave holes every step
    SQUEEZE_RATIO = 0.25
    SQUEEZE_MIN_HOLES = 32

    def _squeeze_holes(self) -> None:
        """Re-lay the dynamic cache out without its holes: each row's valid columns, in order, move to the end of
        ``max(valid per row)`` columns (shorter rows get holes in front, like left padding). Position ids are kept
        per token (RoPE is already in the keys; sliding windows read ``_pos``), so attention sees the same keys at
        the same positions; only the cost of attending over holes goes. Batched speculative decoding with ragged
        acceptance otherwise grows the cache by the *longest* acceptance per step: a batch of 16 images with SJD
        carried ~3x its real length. One gather per layer, amortised (it runs when the holes reach a quarter of the
        cache's live length).
        """
        from transformers.cache_utils import DynamicLayer

        S = self._cols
        valid = self._host_mask()
        counts = valid.sum(-1)
        N = int(counts.max())
        if S - N < max(self.SQUEEZE_RATIO * N, self.SQUEEZE_MIN_HOLES):
            return
        layers = [layer for layer in getattr(self.cache, "layers", [None])
                  if getattr(layer, "is_initialized", True) and getattr(layer, "keys", None) is not None]
        if not layers or any(type(layer) is not DynamicLayer or layer.keys.shape[-2] != S for layer in layers):
            return  # another cache layout (quantised, sliding, ...): keep the holes rather than half-move it
        src = np.argsort(valid, axis=-1, kind="stable")[:, S - N:]  # [B, N]: some holes, then the valid columns
        src_t = torch.from_numpy(src)
        for layer in layers:
            idx = src_t.to(layer.keys.device)[:, None, :, None]
            layer.keys = layer.keys.gather(2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))
        if self._pos is not None and self._pos.shape[1] == S:
            self._pos = self._pos.gather(1, src_t.to(self._pos.device))
        self._mbuf[:, :N] = np.arange(N) >= (N - counts)[:, None]
        self._cols = self._start = N
        self.mask = None  # built again from the host mirror when needed
        self._dense = bool(self._mbuf[:, :N].all())

    def _compact(self, kept: np.ndarray) -> np.ndarray:
        """Move each row's kept columns since the checkpoint (bool [B, T], host; a tree's accepted path) to the front
        of that span, in order, so they take the columns the path alone would have (no holes behind them); returns
        the new kept mask (a prefix per row)."""
        B, T = kept.shape
        order = np.argsort(~kept, axis=-1, kind="stable")  # [B, T] kept columns first, in block order
        count = kept.sum(-1)
        m = int(count.max())
        src = order[:, :m]
        if np.array_equal(src, np.broadcast_to(np.arange(m), (B, m))):
            return kept
        start = self._start
        src = torch.from_numpy(start + src)
        for layer in self.cache.layers:
            if not getattr(layer, "is_initialized", True) or layer.keys is None:
                continue
            for name in ("keys", "values"):
                t = getattr(layer, name)  # [B, H, S, D]
                idx = src.to(t.device)[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])
                t[:, :, start : start + m] = t.gather(2, idx)
        if self.sliding_window is not None:  # the columns' logical positions move with them
            self._pos[:, start : start + m] = self._pos.gather(1, src.to(self._pos.device))
        return np.arange(T) < count[:, None]

    # -- the static cache (mmspec.models.static_cache) -----------------------------------------------------------------

    def _start_static(self) -> None:
        """Move the prefill's cache into a static one; the prompt mask must be left padding."""
        from .static_cache import RowStaticCache

        mask = self._mask_cpu
        B, T = mask.shape
        pad = (~mask).sum(-1)
        if not torch.equal(mask, torch.arange(T).expand(B, T) >= pad.unsqueeze(1)):
            raise ValueError("the static KV cache needs left-padded prompts (0s then 1s in every attention_mask row).")
        reserve = 256 if self.reserve is None else int(self.reserve)
        self.cache = RowStaticCache.from_cache(self.cache, _round_up(T + reserve, 64))
        self._pad, self._lens = pad, torch.full((B,), T, dtype=torch.long)
        self._pad_dev = pad.to(self.device)
        self._unpadded = not bool(pad.any())
        self._ckpt, self._blocks, self._last = self._lens.clone(), 0, None

    def _static_forward(self, tokens, valid, logits_to_keep, tree):
        from ..compile import bucket
        from .static_cache import write_order

        B, L = tokens.shape
        dev = tokens.device
        valid = valid.to(torch.bool)
        W = bucket(L) if self._compiled is not None else L  # compiled: a few fixed shapes, padded at the front
        front = W - L
        if front:
            tokens = torch.cat([tokens.new_zeros(B, front), tokens], dim=1)
            valid = torch.cat([torch.zeros(B, front, dtype=torch.bool), valid], dim=1)
        need = int(self._lens.max()) + W
        if need > self.cache.capacity:
            self.cache = self.cache.grown(_round_up(max(need, 2 * self.cache.capacity), 64))
        if self._compiled is None and tree is None and bool(valid.all()):
            return self._dense_forward(tokens, need, logits_to_keep)
        rank, order = write_order(valid)  # [B, W] each, CPU
        start = self._lens - self._pad
        positions = (start.unsqueeze(1) + valid.long().cumsum(-1) - 1).clamp_min(0)
        # one host -> device copy of the step's bookkeeping
        packed = torch.cat([self._lens.unsqueeze(1), rank, order, valid.long(), positions], dim=1).to(dev, non_blocking=True)
        lens_d, rank_d, order_d, valid_d, positions_d = packed.split([1, W, W, W, W], dim=1)
        lens_d, valid_d = lens_d.squeeze(1), valid_d.bool()
        ancestors = None
        if tree is not None:
            anc, depth = tree.ancestors().to(dev), tree.depths().to(dev)  # [B, L, L], [B, L]
            ancestors = torch.zeros(B, W, W, dtype=torch.bool, device=dev)
            ancestors[:, front:, front:] = anc
            positions_d = torch.cat([positions_d[:, :front], start.to(dev).unsqueeze(1) + depth], dim=1)
        model_positions = positions_d if self.position_offset is None else positions_d + self.position_offset[:, None]
        self.cache.write_columns = lens_d.unsqueeze(1) + rank_d
        # eager: attend over the columns in use only (shapes may change); compiled: the whole, fixed capacity
        self.cache.kv_length = need if self._compiled is None else None
        call = self._window_call if self._compiled is None else self._compiled
        logits = call(tokens, valid_d, order_d, positions_d, lens_d, ancestors, model_positions, logits_to_keep)
        self._last = (rank[:, front:], valid[:, front:])
        self._lens = self._lens + valid.sum(-1)
        self._blocks += 1
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        elif front:
            logits = logits[:, front:]
        return logits.to(dev)

    def _dense_forward(self, tokens, need, logits_to_keep):
        """Eager, a chain whose places are all real (plain AR, most steps at batch 1): the block goes to columns
        ``lens .. lens + W - 1`` in order, and the mask is two comparisons (the general path's, without its
        permutation and gathers)."""
        B, W = tokens.shape
        dev = tokens.device
        lens = self._lens.to(dev, non_blocking=True)
        block = torch.arange(W, device=dev)
        columns = lens.unsqueeze(1) + block  # [B, W]
        positions = columns - self._pad_dev.unsqueeze(1)
        col = torch.arange(need, device=dev)
        key_pos = col - self._pad_dev.unsqueeze(1)  # [B, need]; < 0 at left padding
        full = (key_pos.unsqueeze(1) >= 0) & (col <= columns.unsqueeze(2))  # [B, W, need]
        sliding = None
        if self.sliding_window is not None:
            sliding = full & ((positions.unsqueeze(2) - key_pos.unsqueeze(1)) < self.sliding_window)
        self.cache.write_columns, self.cache.kv_length = columns, need
        if self.position_offset is not None:
            positions = positions + self.position_offset.unsqueeze(1)
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep and self._has_logits_to_keep else {}
        # One query per row that sees every returned column (no padding, equal lengths): the mask says nothing, and
        # SDPA runs faster without one (transformers skips it for a single query, as for the dynamic cache).
        no_mask = (W == 1 and self._attn == "sdpa" and sliding is None and self._unpadded
                   and int(self._lens.min()) + 1 == need)
        mask = None if no_mask else self._mask_argument(full, sliding)
        logits, _ = self.call_model(tokens, mask, positions, self.cache, **kwargs)
        self._last = (torch.arange(W).expand(B, W), torch.ones(B, W, dtype=torch.bool))
        self._lens = self._lens + W
        self._blocks += 1
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits.to(dev)

    def _window_call(self, tokens, valid, order, positions, lens, ancestors, model_positions, logits_to_keep):
        """The window forward over the static cache, in tensors of fixed shapes (what ``torch.compile`` traces):
        masks from the per-row lengths, then the model. Returns logits [B, W or n, V]."""
        from .static_cache import window_masks

        full, sliding = window_masks(lens, self._pad_dev, order, valid, positions,
                                     self.cache.kv_length or self.cache.capacity, ancestors, self.sliding_window)
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep and self._has_logits_to_keep else {}
        logits, _ = self.call_model(tokens, self._mask_argument(full, sliding), model_positions, self.cache, **kwargs)
        return logits

    def _static_rollback(self, keep: torch.Tensor) -> None:
        appended = self._lens - self._ckpt
        if keep.dtype != torch.bool:
            self._lens = self._ckpt + torch.minimum(keep.view(-1), appended)
            return
        if self._blocks != 1:
            raise RuntimeError("a column mask `keep` (a tree's path) rolls back exactly one forward since checkpoint.")
        rank, valid = self._last  # [B, L]
        kept = valid & keep[:, : valid.shape[1]]
        n = kept.sum(-1)
        L = rank.shape[1]
        offsets = torch.arange(L).expand_as(rank)
        src = torch.where(kept, rank, L).sort(dim=1).values  # the kept places' columns, in block order
        src = torch.where(offsets < n.unsqueeze(1), src, offsets)
        if not torch.equal(src, offsets):  # the path is not the block's first valid places: compact it
            dev = self.cache.write_columns.device
            base = self._ckpt.unsqueeze(1)
            self.cache.move((base + src).to(dev), (base + offsets).to(dev))
        self._lens = self._ckpt + n


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
