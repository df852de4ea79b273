"""Image-generation model families: how a model's prompts, layout and tokenizer fit the shared loop.

A family turns user inputs (prompts, negative prompts, class labels, prompt embeddings) into the
conditional and unconditional prefill inputs, says where the image span lives (``ImageLayout``), which
adapter drives the model, and how code indices become pixels. The pipeline picks the first registered
family whose ``matches(model)`` is true, so a new family is one small class in its own file, registered
with ``@register_family``; the loop and the core never change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .causal_lm import CausalLM
from .image_tokens import ImageLayout
from .vocab import warn_unknown_words

__all__ = ["ImageFamily", "JointVocabFamily", "register_family", "family_for", "FAMILIES", "PrefillInputs"]

FAMILIES: list[type] = []


def register_family(cls):
    """Class decorator adding an ``ImageFamily`` to the lookup used by the image pipeline."""
    FAMILIES.insert(0, cls)  # later registrations (more specific families) are tried first
    return cls


class PrefillInputs(dict):
    """``input_ids``, ``attention_mask`` [B, T] (cond rows), and for guidance ``uncond_input_ids``,
    ``uncond_attention_mask`` plus any other ``uncond_*`` / model keyword arguments."""


def left_pad_batch(seqs: list[list[int]], pad_id: int = 0):
    """Lists of ids -> (ids [B, T], mask [B, T]) left padded."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


class ImageFamily(ABC):
    """Base class: override what differs. ``conditioning`` is "text", "class" or "embeds"."""

    name = "base"
    conditioning = "text"
    adapter = CausalLM

    @classmethod
    def matches(cls, model) -> bool:
        return False

    def __init__(self, model, tokenizer=None, vq=None):
        self.model, self.tokenizer, self.vq = model, tokenizer, vq

    @abstractmethod
    def layout(self) -> ImageLayout:
        """The ``ImageLayout`` of the span this model generates."""

    @abstractmethod
    def prefill_inputs(self, prompts=None, negative_prompts=None, class_labels=None, prompt_embeds=None,
                       negative_prompt_embeds=None) -> PrefillInputs:
        """Conditional and unconditional prefill inputs from the user's conditioning."""

    def codebook(self) -> torch.Tensor:
        """[N, D] code vectors of the image tokenizer (for LANTERN / GSD neighbour tables)."""
        return self.vq.quantize.embedding.weight.detach()

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h * w] -> images [B, 3, H, W] in [-1, 1] (diffusers ``VQModel`` by default)."""
        layout = self.layout()
        vq = self.vq
        dtype = next(vq.parameters()).dtype
        channels = vq.quantize.embedding.weight.shape[1]
        shape = (codes.shape[0], layout.height, layout.width, channels)
        z = vq.quantize.get_codebook_entry(codes.to(vq.device), shape).to(dtype)
        return vq.decode(z, force_not_quantize=True).sample.clamp(-1, 1)


@register_family
class JointVocabFamily(ImageFamily):
    """A transformers causal LM over a joint text + image vocabulary, described by ``config.image_layout``.

    ``config.image_layout`` holds ``height, width, image_token_offset, codebook_size`` and optionally
    ``eol_token_id, eoi_token_id``; ``config.boi_token_id`` starts the image span. The conditional prompt is
    ``bos? + tokenize(prompt) + [boi]``; the unconditional one is ``tokenize(negative_prompt) + [boi]``
    (just ``[boi]`` without a negative prompt), matching caption-dropout training. The bundled zoo models
    use this form.
    """

    name = "joint-vocab"

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(getattr(getattr(model, "config", None), "image_layout", None), dict)

    def layout(self) -> ImageLayout:
        spec = dict(self.model.config.image_layout)
        return ImageLayout(**{k: spec[k] for k in ("height", "width", "image_token_offset", "codebook_size")},
                           eol_token_id=spec.get("eol_token_id"), eoi_token_id=spec.get("eoi_token_id"))

    def _encode(self, texts):
        if self.tokenizer is None:
            raise ValueError("this model is text-conditioned: the pipeline needs a `tokenizer`.")
        boi = self.model.config.boi_token_id
        warn_unknown_words(self.tokenizer, texts)
        enc = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        return left_pad_batch([list(e) + [boi] for e in enc])

    def prefill_inputs(self, prompts=None, negative_prompts=None, class_labels=None, prompt_embeds=None,
                       negative_prompt_embeds=None) -> PrefillInputs:
        if prompts is None:
            raise ValueError("this model is text-conditioned: pass `prompt`.")
        if class_labels is not None or prompt_embeds is not None:
            raise ValueError("this model is text-conditioned: `class_labels` and `prompt_embeds` are not accepted.")
        ids, mask = self._encode(prompts)
        negative = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        uids, umask = self._encode(negative)
        return PrefillInputs(input_ids=ids, attention_mask=mask, uncond_input_ids=uids, uncond_attention_mask=umask)


def family_for(model, tokenizer=None, vq=None) -> ImageFamily:
    """The first registered family that recognises ``model``."""
    for cls in FAMILIES:
        if cls.matches(model):
            return cls(model, tokenizer=tokenizer, vq=vq)
    raise TypeError(
        f"no image-generation family recognises {type(model).__name__}; known families: "
        f"{[c.name for c in FAMILIES]}. A causal LM over a joint vocabulary needs `config.image_layout`."
    )


# Families with quirks live in their own modules; importing them registers them.
from . import (  # noqa: E402,F401
    chameleon,
    emu3,
    janus,
    llamagen_family,  # noqa: E402,F401
)
