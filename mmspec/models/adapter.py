"""The target-adapter contract: what the decoding loop asks of a model.

An adapter turns a model into four calls over a per-row cache that can be rolled back. ``CausalLM`` (transformers
causal LMs), ``VisionLM`` (VLMs), ``GuidedLM`` (image and video token models with guidance and structural
forcing) and ``mar.MARRunner`` (continuous tokens) implement it; a new model kind needs only these.

    out = adapter.prefill(*prompt, **model_kwargs)   # [B, ...]: output at each row's last prompt position
    adapter.checkpoint()                             # mark the cache
    out = adapter.forward(block, valid)              # block [B, L, ...], valid [B, L] -> [B, L, ...]
    adapter.rollback(keep)                           # keep[b] block places of row b, drop the rest
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["TargetAdapter"]


@runtime_checkable
class TargetAdapter(Protocol):
    """A model behind the decoding loop (``mmspec.decoding.decode``); drafters that are models use it too.

    Attributes:
        vocab_size: logits per position (token ids), or None for continuous tokens.
        device: where inputs go and outputs come back.
    """

    vocab_size: int | None

    @property
    def device(self) -> torch.device: ...

    def prefill(self, *prompt, **model_kwargs) -> torch.Tensor:
        """Run the prompt (token ids: ``input_ids, attention_mask`` [B, T], left padded; continuous models: class
        labels [B]) and return the output at each row's last position: logits [B, V] or conditions [B, ...]."""

    def checkpoint(self) -> None:
        """Mark the current cache; the next ``rollback`` keeps a per-row number of places appended since."""

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Append a block [B, L] (ids) or [B, L, C] (vectors) and return the output at each of its places
        [B, L, ...]. ``valid`` [B, L] (bool, CPU) marks real places; the others are computed and never kept."""

    def rollback(self, keep: torch.Tensor) -> None:
        """Keep the first ``keep[b]`` places appended since ``checkpoint`` in row b (LongTensor [B], CPU)."""
