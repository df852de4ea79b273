"""Adapter for transformers causal LMs: a per-row ragged KV cache that can be rolled back.

Rows of a batch accept different numbers of drafts in a step. Instead of cutting every row to the batch
minimum (which biases sampling, docs/algorithms.md section 7), the cache keeps one common length and each row
marks its rejected positions as *holes* in its 2-D attention mask. Position ids count valid tokens only,
so every row sees exactly the positions plain decoding would give it. Trailing positions that no row
kept are cropped from the transformers cache (``Cache.crop(-n)``, transformers 5.x).

Holes are only correct for full-attention layers: sliding-window and linear-attention (state-space)
layers would see the rejected tokens, so those cache kinds are refused with a clear error.
"""

from __future__ import annotations

import inspect

import torch

from .compat import cache_keyword, output_cache

__all__ = ["CausalLM", "RollbackError", "input_device", "vocab_size_of"]


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
            "cannot be rolled back per row without changing the result; only full-attention models are supported."
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
    """

    def __init__(self, model):
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"`model` must be a transformers causal LM, got {type(model).__name__}.")
        if getattr(config, "is_encoder_decoder", False):
            raise TypeError(
                f"`model` is an encoder-decoder model ({type(model).__name__}); mmspec.generate supports "
                "decoder-only causal LMs."
            )
        self.model = model
        self.vocab_size = vocab_size_of(model)
        params = inspect.signature(model.forward).parameters
        self._has_logits_to_keep = "logits_to_keep" in params
        self._has_cache_position = "cache_position" in params or any(
            p.kind == p.VAR_KEYWORD for p in params.values()
        )
        self.cache = None
        self.mask = None  # [B, S] long on the model's device
        self._mask_cpu = None  # [B, S] bool host mirror
        self._start = 0
        self._dense = False
        #: LongTensor [B] added to decode positions (set by adapters whose models number positions otherwise)
        self.position_offset = None

    @property
    def device(self) -> torch.device:
        """Where input ids go: the input embedding's device, or its execution device when accelerate offloads
        it (``device_map`` with ``"cpu"`` / ``"disk"`` entries keeps the weight on ``meta``). Logits are moved
        here too, so a model sharded over several devices (``device_map="auto"``) needs nothing else."""
        return input_device(self.model)

    @property
    def length(self) -> int:
        """Cache length (valid tokens plus holes)."""
        return 0 if self._mask_cpu is None else self._mask_cpu.shape[1]

    def num_valid(self) -> torch.Tensor:
        """LongTensor [B] (CPU): valid tokens per row in the cache."""
        return self._mask_cpu.sum(-1)

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
        logits, self.cache = self.call_model(input_ids, mask, position_ids, None, **kwargs)
        _check_cache(self.cache)
        self.mask = mask
        self._mask_cpu = attention_mask.detach().to("cpu", torch.bool)
        self._dense = bool(self._mask_cpu.all())
        # Models that expand the prompt (image placeholder tokens -> many embeddings) report their own length.
        seq_len = self.cache.get_seq_length()
        if seq_len != mask.shape[1]:
            raise RollbackError(
                f"the model cached {seq_len} positions for a prompt of {mask.shape[1]}; models that expand the "
                "prompt inside forward need their own adapter."
            )
        return logits[:, -1].to(self.device)

    def call_model(self, input_ids, attention_mask, position_ids, past_key_values, **kwargs):
        """One forward of the wrapped model -> (logits [B, L, V], cache). Families with quirks (separate
        image-token embeddings or heads, condition embeddings) override this and nothing else."""
        kwargs[cache_keyword(self.model)] = past_key_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, return_dict=True, **kwargs)
        return out.logits, output_cache(out)

    def checkpoint(self) -> None:
        """Mark the cache length; ``rollback`` then keeps a per-row number of tokens added since."""
        self._start = self.length

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Append a block and return its logits.

        Args:
            tokens: LongTensor [B, L] on the model's device (values at invalid places are ignored).
            valid: BoolTensor [B, L] on the CPU; invalid places become holes in the attention mask.
            logits_to_keep: 0 for the logits of every position, n > 0 for the last n only (a drafter needs
                one row; skipping the others saves most of a small model's output projection).
        Returns:
            logits [B, L, V] (``[B, n, V]`` with ``logits_to_keep=n``).
        """
        B, L = tokens.shape
        dev = tokens.device
        valid_dev = valid.to(dev, non_blocking=True).long()
        start = self.num_valid().to(dev, non_blocking=True)
        position_ids = (start.unsqueeze(1) + valid_dev.cumsum(-1) - 1).clamp_min(0)
        if self.position_offset is not None:
            position_ids = position_ids + self.position_offset.unsqueeze(1)
        S = self.length
        self._mask_cpu = torch.cat([self._mask_cpu, valid.to(torch.bool)], dim=1)
        self.mask = torch.cat([self.mask, valid_dev], dim=1)
        kwargs = {"cache_position": torch.arange(S, S + L, device=dev)} if self._has_cache_position else {}
        if logits_to_keep and self._has_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        # Without padding or holes the 2-D mask says nothing causality does not: let the model take its
        # fast (mask-free) attention path.
        mask = None if self._dense and bool(valid.all()) else self.mask
        self._dense = mask is None
        logits, self.cache = self.call_model(tokens, mask, position_ids, self.cache, **kwargs)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits.to(dev)  # no-op unless the model is sharded over devices (logits on the last one)

    def rollback(self, keep: torch.Tensor) -> None:
        """Keep the first ``keep[b]`` valid tokens added since ``checkpoint`` in row b; drop the rest.

        Args:
            keep: LongTensor [B] on the CPU.
        """
        tail = self._mask_cpu[:, self._start :]
        kept = tail & (tail.long().cumsum(-1) <= keep.view(-1, 1))
        if torch.equal(kept, tail):  # nothing rejected (plain AR, or every draft accepted)
            self._start = self.length
            return
        used = kept.any(0).nonzero()
        new_tail = int(used[-1]) + 1 if len(used) else 0
        drop = tail.shape[1] - new_tail
        kept = kept[:, :new_tail]
        if drop:
            self.cache.crop(-drop)
        self._mask_cpu = torch.cat([self._mask_cpu[:, : self._start], kept], dim=1)
        self.mask = torch.cat(
            [self.mask[:, : self._start], kept.to(self.mask.device, non_blocking=True).long()], dim=1
        )
        self._start = self.length
        self._dense = bool(self._mask_cpu.all())
