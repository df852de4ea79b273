"""LlamaGen in the image pipeline: class-conditional (c2i) and caption-conditional (t2i) GPTs.

LlamaGen's GPT (:class:`~mmspec.models.llamagen.LlamaGenGPT`) has no text prompt: its prefix is
``cls_token_num`` condition embeddings (one class embedding for c2i, projected T5 caption features for t2i),
followed by ``block_size`` image tokens over the whole vocabulary (vocabulary id = VQ code, no end-of-line or
end-of-image tokens). The shared loop still wants an ``input_ids`` prompt [B, T], so the family passes
``cls_token_num`` placeholder ids and the condition as model keyword arguments (``cond``, ``cond_drop`` and
their ``uncond_`` twins for the guidance rows); :class:`LlamaGenLM` feeds the condition in place of the
placeholders at prefill.

Positions follow LlamaGen's rotary indexing exactly: condition slot ``p`` gets rotary row ``p`` (all-zero in
LlamaGen's table), image token ``i`` gets row ``cls_token_num + i`` in every row of the batch, also when some
caption slots are masked (LlamaGen keeps absolute positions there; mmspec's generic adapter counts valid
tokens only, so :class:`LlamaGenLM` adds back each row's masked condition slots).

Guidance follows LlamaGen's ``generate``: the unconditional rows are the null class (c2i) or the learned
unconditional caption (t2i), selected with ``cond_drop``; for t2i they reuse the conditional rows' caption mask.
"""

from __future__ import annotations

import torch

from .causal_lm import CausalLM
from .compat import cache_keyword, output_cache
from .families import ImageFamily, PrefillInputs, register_family
from .image_tokens import ImageLayout
from .llamagen import LlamaGenGPT

__all__ = ["LlamaGenLM", "LlamaGenFamily", "caption_mask"]


def caption_mask(embeds: torch.Tensor) -> torch.Tensor:
    """Caption-token validity [B, T] (long 0/1) from features [B, T, D]: all-zero tokens are padding.

    LlamaGen's ``sample_t2i.py`` feeds ``caption_embs * emb_masks`` (padded T5 tokens zeroed, left padded by
    default) together with ``emb_masks``; recovering the mask from the zeros reproduces that call.
    """
    return (embeds != 0).any(-1).long()


class LlamaGenLM(CausalLM):
    """``CausalLM`` adapter for :class:`LlamaGenGPT`.

    Prefill takes placeholder ``input_ids`` [B, cls_token_num] and the condition as ``cond`` (c2i: Long [B]
    labels; t2i: [B, T, caption_dim] features) with optional ``cond_drop`` (bool [B], True = null class /
    learned unconditional caption). The cache then holds exactly ``cls_token_num`` slots per row, like the
    attention mask.
    """

    def __init__(self, model):
        if not isinstance(model, LlamaGenGPT):
            raise TypeError(f"LlamaGenLM drives a LlamaGenGPT, got {type(model).__name__}.")
        super().__init__(model)
        self.cls_token_num = model.cls_token_num
        self._masked_prefix = None  # LongTensor [B]: masked condition slots per row
        self._last_position = model.config.max_position - 1

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, **model_kwargs):
        T = input_ids.shape[1]
        if T != self.cls_token_num:
            raise ValueError(
                f"this LlamaGen model has cls_token_num={self.cls_token_num} condition positions but the prompt "
                f"has {T}; a draft model must have the target's cls_token_num."
            )
        if model_kwargs.get("cond") is None:
            raise ValueError("LlamaGen needs its condition at prefill: pass `cond` (class labels or caption features).")
        drop = model_kwargs.get("cond_drop")
        cfg = self.model.config
        dropped = drop is not None and bool(torch.as_tensor(drop).any())
        if dropped and cfg.model_type == "c2i" and cfg.class_dropout_prob <= 0:
            raise ValueError(
                "this c2i LlamaGen model has no null class (class_dropout_prob=0), so classifier-free guidance is "
                "not available: use guidance_scale=1.0."
            )
        mask = attention_mask.to(input_ids.device).long()
        self._masked_prefix = T - mask.sum(-1)
        return super().prefill(input_ids, mask, **model_kwargs)

    def call_model(self, input_ids, attention_mask, position_ids, past_key_values, **kwargs):
        if past_key_values is None:
            # Prefill: the condition embeddings take the placeholders' slots; rotary rows 0..T-1 as LlamaGen.
            B, T = input_ids.shape
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            input_ids = None
        else:
            # Image token i sits at logical position cls_token_num + i whatever the caption mask. A row that
            # is about to finish may be fed drafts past its last image token (the window is sized for the row
            # with the most tokens left); their logits are never committed, so they reuse the last rotary row.
            position_ids = position_ids + self._masked_prefix.to(position_ids.device).unsqueeze(1)
            position_ids = position_ids.clamp(max=self._last_position)
        kwargs[cache_keyword(self.model)] = past_key_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **kwargs)
        return out.logits, output_cache(out)


@register_family
class LlamaGenFamily(ImageFamily):
    """LlamaGen c2i (``class_labels``) and t2i (``prompt_embeds``) models with LlamaGen's VQ tokenizer.

    c2i: ``class_labels`` in ``[0, num_classes)``; the unconditional branch is the null class.
    t2i: ``prompt_embeds`` [B, L, caption_dim] T5 features with ``L >= cls_token_num`` (the first
    ``cls_token_num`` tokens are used, as in LlamaGen); padded tokens must be zero vectors (as LlamaGen's
    ``sample_t2i.py`` makes them) and are masked out like LlamaGen's ``emb_masks``. The unconditional branch is
    ``negative_prompt_embeds`` when given, else LlamaGen's learned unconditional caption (with the prompt's
    mask, as LlamaGen's ``generate``).
    """

    name = "llamagen"
    adapter = LlamaGenLM

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(model, LlamaGenGPT)

    @property
    def conditioning(self) -> str:
        return "class" if self.model.config.model_type == "c2i" else "embeds"

    def layout(self) -> ImageLayout:
        cfg = self.model.config
        return ImageLayout(height=cfg.grid_size, width=cfg.grid_size, image_token_offset=0,
                           codebook_size=cfg.vocab_size)

    # -- prompts ------------------------------------------------------------------------------------------
    def prefill_inputs(self, prompts=None, negative_prompts=None, class_labels=None, prompt_embeds=None,
                       negative_prompt_embeds=None) -> PrefillInputs:
        if self.model.config.model_type == "c2i":
            return self._class_inputs(prompts, negative_prompts, class_labels, prompt_embeds, negative_prompt_embeds)
        return self._caption_inputs(prompts, negative_prompts, class_labels, prompt_embeds, negative_prompt_embeds)

    def _placeholders(self, mask: torch.Tensor, uncond_mask: torch.Tensor, **cond) -> PrefillInputs:
        ids = torch.zeros_like(mask)
        return PrefillInputs(input_ids=ids, attention_mask=mask, uncond_input_ids=torch.zeros_like(uncond_mask),
                             uncond_attention_mask=uncond_mask, **cond)

    def _class_inputs(self, prompts, negative_prompts, class_labels, prompt_embeds, negative_prompt_embeds):
        what = "this LlamaGen model is class-conditional (c2i)"
        if prompts is not None or negative_prompts is not None:
            raise ValueError(f"{what}: pass `class_labels`, not `prompt` / `negative_prompt`.")
        if prompt_embeds is not None or negative_prompt_embeds is not None:
            raise ValueError(f"{what}: pass `class_labels`, not `prompt_embeds` / `negative_prompt_embeds`.")
        if class_labels is None:
            raise ValueError(f"{what}: pass `class_labels`.")
        labels = torch.as_tensor(class_labels).reshape(-1)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"`class_labels` must be integers, got {labels.dtype}.")
        labels = labels.long().cpu()
        n = self.model.config.num_classes
        if labels.numel() == 0:
            raise ValueError("`class_labels` is empty.")
        if int(labels.min()) < 0 or int(labels.max()) >= n:
            raise ValueError(f"`class_labels` must lie in [0, {n - 1}] (num_classes={n}), got "
                             f"[{int(labels.min())}, {int(labels.max())}].")
        B = labels.shape[0]
        ones = torch.ones(B, 1, dtype=torch.long)
        keep, drop = torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)
        return self._placeholders(ones, ones, cond=labels, cond_drop=keep, uncond_cond=labels, uncond_cond_drop=drop)

    def _check_embeds(self, embeds, name):
        cfg = self.model.config
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[-1] != cfg.caption_dim:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"`{name}` must be caption features [B, L, caption_dim={cfg.caption_dim}], got {shape}.")
        if not embeds.is_floating_point():
            raise ValueError(f"`{name}` must be floating point, got {embeds.dtype}.")
        if embeds.shape[1] < cfg.cls_token_num:
            raise ValueError(f"`{name}` has {embeds.shape[1]} tokens; this model reads cls_token_num="
                             f"{cfg.cls_token_num} caption tokens (pad with zero vectors).")
        return embeds[:, : cfg.cls_token_num]

    def _caption_inputs(self, prompts, negative_prompts, class_labels, prompt_embeds, negative_prompt_embeds):
        what = "this LlamaGen model is caption-conditioned (t2i)"
        if class_labels is not None:
            raise ValueError(f"{what}: `class_labels` are not accepted; pass `prompt_embeds`.")
        if prompts is not None or negative_prompts is not None:
            raise ValueError(f"{what} and has no text encoder: pass T5 features as `prompt_embeds` (and "
                             "`negative_prompt_embeds`), not `prompt` / `negative_prompt`.")
        if prompt_embeds is None:
            raise ValueError(f"{what}: pass `prompt_embeds`.")
        cond = self._check_embeds(prompt_embeds, "prompt_embeds")
        B = cond.shape[0]
        mask = caption_mask(cond)
        keep = torch.zeros(B, dtype=torch.bool)
        if negative_prompt_embeds is None:
            # LlamaGen: the learned unconditional caption, under the prompt's caption mask.
            return self._placeholders(mask, mask.clone(), cond=cond, cond_drop=keep, uncond_cond=cond,
                                      uncond_cond_drop=torch.ones(B, dtype=torch.bool))
        uncond = self._check_embeds(negative_prompt_embeds, "negative_prompt_embeds")
        if uncond.shape[0] != B:
            raise ValueError(f"{uncond.shape[0]} negative_prompt_embeds for {B} prompt_embeds.")
        return self._placeholders(mask, caption_mask(uncond), cond=cond, cond_drop=keep, uncond_cond=uncond,
                                  uncond_cond_drop=keep.clone())

    # -- tokenizer ----------------------------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """The VQ codebook ``quantize.embedding.weight`` [codebook_size, D] as LANTERN's reference code uses
        for LlamaGen (raw, not l2-normalised; ``vq.normalized_codebook()`` gives what the decoder sees)."""
        self._check_vq()
        return self.vq.quantize.embedding.weight.detach()

    def _diffusers_vq(self) -> bool:
        from diffusers import VQModel

        return isinstance(self.vq, VQModel)

    def _check_vq(self):
        vq = self.vq
        if vq is None or not (hasattr(vq, "decode_code") or self._diffusers_vq()):
            raise ValueError(f"LlamaGen images need a VQ tokenizer as `vq`: LlamaGen's (LlamaGenVQ) or a diffusers "
                             f"VQModel, got {type(vq).__name__}.")
        n = vq.quantize.embedding.weight.shape[0]
        if n < self.model.config.vocab_size:
            raise ValueError(f"the VQ codebook has {n} codes but the GPT's vocabulary has "
                             f"{self.model.config.vocab_size}.")

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h * w] (raster order) -> images [B, 3, H, W] in [-1, 1] via ``LlamaGenVQ.decode_code``."""
        self._check_vq()
        layout = self.layout()
        vq = self.vq
        if self._diffusers_vq():  # e.g. the zoo's tokenizer
            from ..zoo.hub import decode_tokens

            return decode_tokens(vq, codes, (layout.height, layout.width)).clamp(-1, 1)
        device = vq.quantize.embedding.weight.device
        shape = (codes.shape[0], vq.quantize.embedding.weight.shape[1], layout.height, layout.width)
        return vq.decode_code(codes.to(device), shape).clamp(-1, 1)
