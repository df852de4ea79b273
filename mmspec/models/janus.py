"""Janus / Janus-Pro (transformers ``JanusForConditionalGeneration``) in image-generation mode.

How transformers' ``JanusForConditionalGeneration.generate(generation_mode="image")`` generates an image, and
how this family reproduces it on mmspec's shared loop:

* **Prompt.** The conditional prompt is the text prompt followed by the image-start token: ``JanusProcessor(text,
  generation_mode="image")`` tokenizes ``prompt + "<begin_of_image>"`` (the tokenizer adds BOS). The prompt is
  embedded with the ordinary text embeddings (``model.get_input_embeddings()``).
* **Unconditional branch.** The same prompt with every token that is neither BOS nor the image-start token
  replaced by ``pad_token_id`` (ids from ``model.generation_config``: ``bos_token_id``, ``pad_token_id``,
  ``generation_kwargs["boi_token_id"]``); it keeps the conditional attention mask, so the pad tokens are attended.
* **Guidance.** ``ClassifierFreeGuidanceLogitsProcessor``: ``u + s (c - u)`` with cond rows first, exactly what
  ``GuidedLM`` computes. (Janus' own generate only adds it for ``s > 1`` and fails without it; here
  ``guidance_scale=1`` simply runs the conditional rows alone.)
* **Image tokens.** A separate vocabulary: the VQ codebook. A generated code is embedded with
  ``prepare_embeddings_for_image_generation`` (``generation_embeddings`` then ``generation_aligner``) and every
  next-code distribution comes from ``model.model.generation_head`` on the language model's last hidden state
  (not ``lm_head``). The loop therefore sees a vocabulary of ``codebook_size`` tokens, image-token offset 0.
* **Grid.** ``num_patches x num_patches`` codes (24 x 24 = 576 for the released models), no end-of-line or
  end-of-image tokens; codes decode through the Janus VQ-VAE (``model.model.vqmodel.decode``), output in
  ``[-1, 1]`` (Janus' own post-processing is ``(x + 1) / 2``, which the pipeline applies).

Build the pipeline from a loaded model and its processor::

    from transformers import JanusForConditionalGeneration, JanusProcessor
    from mmspec.pipelines import SpeculativeImagePipeline
    import mmspec.models.janus  # registers the family (until families.py imports it)

    model = JanusForConditionalGeneration.from_pretrained("deepseek-community/Janus-Pro-1B")
    processor = JanusProcessor.from_pretrained("deepseek-community/Janus-Pro-1B")
    pipe = SpeculativeImagePipeline(model=model, vq=model.model.vqmodel, tokenizer=processor.tokenizer)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "A dog running in the rain."}]}],
        add_generation_prompt=True)
    image = pipe(prompt, guidance_scale=5.0).images[0]

Prompts are used as given (like Janus' generate, which takes whatever ``input_ids`` the processor made), so
apply the chat template first as above; the image-start token is appended here. The ``tokenizer`` component
may also be the ``JanusProcessor`` itself. A ``negative_prompt`` (not supported by Janus' generate) replaces the
unconditional branch by ``tokenize(negative_prompt) + [image-start]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .causal_lm import CausalLM
from .compat import cache_keyword, output_cache
from .families import ImageFamily, PrefillInputs, left_pad_batch, register_family
from .image_tokens import ImageLayout

__all__ = ["JanusFamily", "JanusLM", "janus_special_ids"]


def _is_janus(model) -> bool:
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) == "janus"
            and hasattr(model, "prepare_embeddings_for_image_generation")
            and hasattr(getattr(model, "model", None), "generation_head"))


class JanusLM(CausalLM):
    """``CausalLM`` for Janus image generation: text embeddings for the prompt (prefill), generation
    embeddings + aligner for image codes (every later block), ``generation_head`` logits everywhere.

    ``vocab_size`` is the VQ codebook size: token ``k`` of a block is image code ``k``.
    """

    def __init__(self, model, **options):
        if not _is_janus(model):
            raise TypeError(f"JanusLM drives a transformers JanusForConditionalGeneration, got {type(model).__name__}.")
        super().__init__(model, **options)  # options: the cache (``CausalLM``)
        self.vocab_size = int(model.model.generation_head.vision_head.out_features)
        # ``call_model`` below slices hidden states itself; the Llama backbone (transformers 5) takes no
        # ``cache_position`` (positions come from ``position_ids``).
        self._has_logits_to_keep = True
        self._has_cache_position = False
        self._in_prompt = False

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, **model_kwargs):
        self._in_prompt = True
        try:
            return super().prefill(input_ids, attention_mask, **model_kwargs)
        finally:
            self._in_prompt = False

    def call_model(self, input_ids, attention_mask, position_ids, past_key_values, logits_to_keep=0, **kwargs):
        model = self.model
        if self._in_prompt:
            embeds = model.get_input_embeddings()(input_ids)
        else:
            # Block slots that are not valid (holes) may hold any value; keep the lookup in range.
            codes = input_ids.clamp(0, self.vocab_size - 1)
            embeds = model.prepare_embeddings_for_image_generation(codes)
        lm = model.model.language_model
        kwargs[cache_keyword(lm)] = past_key_values
        out = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 return_dict=True, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return model.model.generation_head(hidden), output_cache(out)


def janus_special_ids(model, tokenizer=None) -> dict:
    """``bos``, ``pad`` and ``boi`` (image-start) ids, as Janus' generate reads them from
    ``model.generation_config`` (falling back to the tokenizer / processor)."""
    gen = getattr(model, "generation_config", None)
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a JanusProcessor carries its tokenizer
    boi = (getattr(gen, "generation_kwargs", None) or {}).get("boi_token_id")
    if boi is None and tok is not None:
        boi_str = _boi_string(tokenizer)
        if boi_str is not None:
            boi = tok.convert_tokens_to_ids(boi_str)
    pad = getattr(gen, "pad_token_id", None)
    if pad is None and tok is not None:
        pad = tok.pad_token_id
    bos = getattr(gen, "bos_token_id", None)
    if bos is None and tok is not None:
        bos = tok.bos_token_id
    if boi is None:
        raise ValueError("cannot find Janus' image-start token id: set model.generation_config.generation_kwargs"
                         "['boi_token_id'] (the released checkpoints have it) or pass a tokenizer with `boi_token`.")
    if pad is None:
        raise ValueError("Janus' unconditional branch needs `pad_token_id` (model.generation_config or tokenizer).")
    return {"bos": None if bos is None else int(bos), "pad": int(pad), "boi": int(boi)}


def _boi_string(tokenizer):
    for holder in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        for name in ("image_start_token", "boi_token"):
            value = getattr(holder, name, None) if holder is not None else None
            if isinstance(value, str):
                return value
    return None


@register_family
class JanusFamily(ImageFamily):
    """transformers ``JanusForConditionalGeneration`` (Janus, Janus-Pro) generating images.

    ``tokenizer`` is the Janus tokenizer (``processor.tokenizer``) or the ``JanusProcessor``; ``vq`` the Janus
    VQ-VAE (``model.model.vqmodel``; used when ``vq`` is None).
    """

    name = "janus"
    conditioning = "text"
    adapter = JanusLM

    @classmethod
    def matches(cls, model) -> bool:
        return _is_janus(model)

    def __init__(self, model, tokenizer=None, vq=None):
        vq = vq if vq is not None else model.model.vqmodel
        if not hasattr(getattr(vq, "quantize", None), "quant_state_dims"):
            raise ValueError(f"Janus decodes codes with its own VQ-VAE: pass `vq=model.model.vqmodel`, not "
                             f"{type(vq).__name__}.")
        super().__init__(model, tokenizer=tokenizer, vq=vq)

    def layout(self) -> ImageLayout:
        config = self.model.config
        side = int(config.vq_config.num_patches)
        codes = int(self.model.model.generation_head.vision_head.out_features)
        expected = int(config.vision_config.num_image_tokens)
        if side * side != expected:
            raise ValueError(f"inconsistent Janus config: vq_config.num_patches={side} gives {side * side} image "
                             f"tokens but vision_config.num_image_tokens={expected}.")
        return ImageLayout(height=side, width=side, image_token_offset=0, codebook_size=codes)

    # ---- prompts ----------------------------------------------------------------------------------------
    def inputs_from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PrefillInputs:
        """Tokenizer-free path: conditional prompts already tokenized (image-start token last, left padded)
        -> cond and uncond prefill inputs, the uncond rows built exactly as Janus' generate builds them."""
        ids = torch.as_tensor(input_ids).long()
        if ids.dim() != 2:
            raise ValueError(f"`input_ids` must be [batch, length], got shape {tuple(ids.shape)}.")
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
        special = janus_special_ids(self.model, self.tokenizer)
        last = ids[:, -1]
        if not bool((last == special["boi"]).all()):
            raise ValueError(f"Janus image prompts must end with the image-start token (id {special['boi']}); "
                             "left-pad them and append it.")
        keep = ids == special["boi"]
        if special["bos"] is not None:
            keep |= ids == special["bos"]
        uncond = ids.masked_fill(~keep, special["pad"])
        return PrefillInputs(input_ids=ids, attention_mask=mask, uncond_input_ids=uncond,
                             uncond_attention_mask=mask.clone())

    def _encode(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("Janus is text-conditioned: build the pipeline with `tokenizer=processor.tokenizer` "
                             "(or the JanusProcessor).")
        tok = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        special = janus_special_ids(self.model, self.tokenizer)
        boi_str = _boi_string(self.tokenizer)
        seqs = []
        for text in texts:
            if boi_str is not None:  # what JanusProcessor does: append the token string, then tokenize
                seq = list(tok(text + boi_str)["input_ids"])
            else:
                seq = list(tok(text)["input_ids"]) + [special["boi"]]
            if not seq or seq[-1] != special["boi"]:
                seq.append(special["boi"])
            seqs.append(seq)
        return left_pad_batch(seqs, pad_id=special["pad"])

    def prefill_inputs(self, prompts=None, negative_prompts=None, class_labels=None, prompt_embeds=None,
                       negative_prompt_embeds=None) -> PrefillInputs:
        if class_labels is not None:
            raise ValueError("Janus is text-conditioned: `class_labels` are not accepted; pass `prompt`.")
        if prompt_embeds is not None or negative_prompt_embeds is not None:
            raise ValueError("Janus is text-conditioned: `prompt_embeds` / `negative_prompt_embeds` are not "
                             "accepted; pass `prompt`.")
        if prompts is None:
            raise ValueError("Janus is text-conditioned: pass `prompt`.")
        ids, mask = self._encode(prompts)
        inputs = self.inputs_from_ids(ids, mask)
        if negative_prompts is not None:
            uids, umask = self._encode(negative_prompts)
            inputs["uncond_input_ids"], inputs["uncond_attention_mask"] = uids, umask
        return inputs

    # ---- codes -> pixels ----------------------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """[N, D] code vectors as the Janus decoder sees them (``get_codebook_entry`` L2-normalises them)."""
        return F.normalize(self.vq.quantize.embedding.weight.detach(), p=2, dim=-1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h * w] -> images [B, 3, H, W] in [-1, 1] through the Janus VQ-VAE."""
        vq = self.vq
        device = next(vq.parameters()).device
        return vq.decode(codes.to(device).long()).clamp(-1, 1)
