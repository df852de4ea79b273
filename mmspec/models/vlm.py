"""Adapter for vision-language models (LLaVA, Qwen2-VL, Idefics3/SmolVLM, PaliGemma, ...).

A VLM is a causal LM whose prefill also sees images: the processor has already expanded every image into
placeholder tokens, the model's forward swaps their embeddings for vision features. After the prefill the
model decodes text exactly like a causal LM, so ``CausalLM`` does the rest (ragged cache, holes, rollback).

Two things differ from a text LM, and both are read from the model's own generation hooks rather than from
its name, so a LLaVA-style family that is not listed here works without new code:

1. **Prefill inputs.** ``model._prepare_position_ids_for_generation`` (overridden by models with their own
   rope layout, e.g. Qwen2-VL's 3-D multimodal rope) and ``model.prepare_inputs_for_generation`` (e.g.
   PaliGemma's 1-indexed positions and its ``token_type_ids`` prefix) build the prefill forward's
   arguments exactly as ``model.generate`` would.
2. **Decode positions.** Every rope model continues text one past the largest prompt position: plain LMs
   at ``n`` for ``n`` prompt tokens, PaliGemma at ``n + 1``, Qwen2-VL at ``max(3-D positions) + 1`` (its
   ``rope_deltas``). The adapter stores ``offset[b] = max position + 1 - n[b]`` per row and adds it to the
   valid-token count that ``CausalLM`` uses, so holes and ragged rows keep the positions plain decoding
   gives them.
"""

from __future__ import annotations

import torch

from .causal_lm import CausalLM, RollbackError, _check_cache
from .compat import cache_keyword, output_cache

__all__ = ["VisionLM", "is_vision_language_model", "adapter_for"]


def is_vision_language_model(model) -> bool:
    """True when ``model`` has a vision encoder feeding its language model (its config has a
    ``vision_config``)."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def adapter_for(model, **options):
    """The decoding adapter for a transformers model: ``VisionLM`` for VLMs, ``CausalLM`` otherwise.

    ``options`` (``cache``, ``compile``, ``reserve``) go to the adapter (see ``CausalLM``). Objects that already are
    adapters (they have ``prefill``) are returned unchanged.
    """
    if hasattr(model, "prefill") and hasattr(model, "rollback"):
        return model
    return VisionLM(model, **options) if is_vision_language_model(model) else CausalLM(model, **options)


class VisionLM(CausalLM):
    """``CausalLM`` whose prefill takes the processor's outputs (``pixel_values``, ``image_sizes``,
    ``image_grid_thw``, ``pixel_attention_mask``, ``token_type_ids``, ``mm_token_type_ids``, ...) and whose
    decode positions follow the model's own position layout (see the module docstring).

    Attributes:
        position_offset: LongTensor [B] on the model's device, set by ``prefill``: added to the valid-token
            count to give a new token's position id.
    """

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """Run the prompt with its images and return the last position's logits [B, V].

        Args:
            input_ids: LongTensor [B, T], left padded, image placeholders already expanded by the processor.
            attention_mask: [B, T], 0 over left padding.
            **model_kwargs: everything else the processor returned; used by this forward only.
        """
        model = self.model
        mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        inputs = self._prepare_prefill(input_ids, mask, model_kwargs)
        positions = inputs.get("position_ids")
        if self._has_logits_to_keep:
            inputs["logits_to_keep"] = 1
        inputs.update(use_cache=True, return_dict=True)
        if self.sliding_window is not None:  # keep every column (see mmspec.models.causal_lm)
            from transformers.cache_utils import DynamicCache

            inputs[cache_keyword(model)] = DynamicCache()
        out = model(**inputs)
        self.cache = output_cache(out)
        _check_cache(self.cache)
        seq_len = self.cache.get_seq_length()
        if seq_len != mask.shape[1]:
            raise RollbackError(
                f"the model cached {seq_len} positions for a prompt of {mask.shape[1]} tokens: it expands image "
                "placeholders inside forward. Pass the processor's outputs (which expand them in `input_ids`) "
                "instead of hand-made ids."
            )
        self.position_offset = self._offset(positions, mask)
        self.mask = mask
        self._pos = (mask.cumsum(-1) - 1).clamp_min(0)
        self._mask_cpu = attention_mask.detach().to("cpu", torch.bool)
        self._dense = bool(self._mask_cpu.all())
        if self.static:
            self._start_static()
        return out.logits[:, -1]

    def _prepare_prefill(self, input_ids, mask, model_kwargs) -> dict:
        """The prefill forward's keyword arguments, as the model's own ``generate`` would build them."""
        model = self.model
        kwargs = dict(model_kwargs, attention_mask=mask)
        if hasattr(model, "_prepare_position_ids_for_generation"):
            positions = model._prepare_position_ids_for_generation(input_ids, kwargs)
        else:
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if hasattr(model, "prepare_inputs_for_generation"):
            inputs = model.prepare_inputs_for_generation(input_ids, position_ids=positions, use_cache=True,
                                                         is_first_iteration=True, **kwargs)
            inputs.pop("use_cache", None)
            return dict(inputs)
        return dict(kwargs, input_ids=input_ids, position_ids=positions)

    @staticmethod
    def _offset(positions, mask) -> torch.Tensor:
        """Per-row offset [B] of the next token's position over the valid-token count.

        ``positions`` is [B, T] or [R, B, T] (R = 3 multimodal rope axes: time, height, width); the next text
        token sits one past the largest position of the row's valid tokens. transformers' generate hands 3-D
        rope models [1 + 3, B, T], whose leading row is the plain text position used only to build masks, so
        a fourth row is skipped.
        """
        n = mask.sum(-1)
        if positions is None:
            return torch.zeros_like(n)
        p = positions if positions.dim() == 3 else positions.unsqueeze(0)
        if p.shape[0] == 4:
            p = p[1:]
        p = p.to(mask.device).masked_fill(mask.unsqueeze(0) == 0, torch.iinfo(p.dtype).min)
        return p.amax(dim=(0, 2)) + 1 - n
