"""Chameleon-architecture image generators: Lumina-mGPT and Anole, through transformers' Chameleon classes.

Both models are ``transformers.ChameleonForConditionalGeneration`` checkpoints: one decoder over a joint vocabulary
in which the 8192 VQGAN codes are ordinary BPE tokens named ``IMGIMG<digits as letters>Z`` (transformers'
``ChameleonImageVocabularyMapping.bpe2img``; in the released vocabulary they are ids 4..8195). They differ in how
an image span is laid out and guided; the family supports both as *styles*:

``"lumina-mgpt"`` (Alpha-VLLM/Lumina-mGPT, ``inference_solver.py`` / ``data/item_processor.py``)
    prompt   ``<s>`` + tokenize("Generate an image of {W}x{H} according to the following prompt:\\n{caption}")
             + ``<reserved08706>`` (turn separator)
    header   ``<racm3:break>`` (image start), ``<reserved{8800+h/2:05d}>``, ``<reserved{8800+w/2:05d}>`` (size in
             32-pixel patches = 2 latent tokens; Lumina decodes them as ``id - 8804``)
    span     ``h`` rows of ``w`` image tokens, each row ended by ``<reserved08799>`` (id 8803, end of line), then
             ``<eoss>`` (id 8196, end of image). Lumina's ``MultiModalLogitsProcessor`` forces end-of-line /
             end-of-image at exactly these positions and suppresses every non-image token elsewhere.
    guidance Lumina's ``LLMImageStartTriggeredUnbatchedClassifierFreeGuidanceLogitsProcessor``: the unconditional
             branch is the sequence *from the image-start token on* (the text prompt, BOS included, is dropped),
             i.e. ``[<racm3:break>, h, w, generated...]`` at positions 0, 1, ...; scores are combined on raw logits
             as ``u + s (c - u)`` once the size header is complete.

``"anole"`` (GAIR-NLP/anole, facebook Chameleon ``chameleon/inference/chameleon.py``)
    prompt   ``<s>`` + tokenize(text) + ``<reserved08706>`` (``<END-OF-TURN>``)
    header   ``<racm3:break>``
    span     ``h * w`` image tokens (32 x 32 for 512 px, no end-of-line), then ``<eoss>`` (appended without a
             forward there, forced here: same tokens, one extra forward)
    guidance ``InBatchInstructCFGLogitsProcessor``: ``u + s_img (i - u) + s_txt (c - i)`` with the image-conditioned
             row ``i`` = the prompt filtered to image tokens + ``<s>``/``<racm3:break>``/``<eoss>``, and the
             unconditional row ``u`` = ``[<s>, <racm3:break>]``. For a text-only prompt ``i == u``, so it is exactly
             ``u + s_txt (c - u)``: the pipeline's ``guidance_scale`` is Anole's ``guidance_scale_text``
             (default 3.0); ``guidance_scale_image`` has no effect without input images. After guidance only image
             tokens are allowed.

The size header is part of the prompt given to prefill (it is forced, not generated), so every image has the
layout's grid size. A negative prompt (an mmspec extension: neither reference has one) replaces the unconditional
row with ``<s> + template(negative) + <reserved08706> + header``.

Which style and size a model uses: the family constructor arguments, else ``config.chameleon_generation``
(a dict with ``style``, ``height``, ``width``, ``prompt_template``, written by :func:`configure_chameleon`), else
auto-detection: a Lumina-mGPT config carries ``mask_image_logits`` / ``z_loss_weight`` or an ``XLLMX``
architecture name; anything else is treated as Anole (Chameleon's own image procedure). The default grid is
32 x 32 tokens (512 px, both references' default); Lumina-mGPT-7B-768 wants ``height=width=48``.

Model quirk handled by :class:`ChameleonLM`: transformers' ``ChameleonForConditionalGeneration.forward`` sets every
image-token logit to ``finfo.min`` (text-only generation), so ``call_model`` runs ``model.model`` and ``lm_head``
itself and returns unmasked logits (as Lumina-mGPT's own fork does with ``mask_image_logits=False``).

Pixels: transformers' ``ChameleonVQVAE`` (``model.model.vqmodel``, 5.23) has the encoder, codebook and
``post_quant_conv`` but **no decoder** (the HF conversion drops it). :class:`ChameleonVQDecoder` is the VQGAN
decoder (taming-transformers layout, built from ``config.vq_config``) with parameter names equal to the keys of
the released ``vqgan.ckpt`` (``decoder.*``, ``quantize.embedding.weight``, ``post_quant_conv.*``), so
``ChameleonVQDecoder.from_chameleon(model, torch.load("vqgan.ckpt")["state_dict"])`` gives the decoder the
references use. Pass it as the pipeline's ``vq`` (a diffusers ``VQModel`` holding the same weights also works).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .causal_lm import CausalLM
from .compat import cache_keyword, output_cache
from .families import ImageFamily, PrefillInputs, left_pad_batch, register_family
from .image_tokens import ImageLayout

__all__ = [
    "STYLES",
    "LUMINA_PROMPT_TEMPLATE",
    "ChameleonLayout",
    "ChameleonLM",
    "ChameleonFamily",
    "ChameleonVQDecoder",
    "configure_chameleon",
    "detect_style",
    "image_token_codes",
    "size_token_name",
]

STYLES = ("lumina-mgpt", "anole")
LUMINA_PROMPT_TEMPLATE = "Generate an image of {width}x{height} according to the following prompt:\n{prompt}"
DEFAULT_GRID = 32

BOS_TOKEN = "<s>"
BOI_TOKEN = "<racm3:break>"  # image start
EOI_TOKEN = "<eoss>"  # image end
SEP_TOKEN = "<reserved08706>"  # end of turn
EOL_TOKEN = "<reserved08799>"  # Lumina-mGPT end of line (id 8803)
_IMAGE_NAME = re.compile(r"^IMGIMG([A-J]+)Z$")


def size_token_name(n_patches: int) -> str:
    """Lumina-mGPT's size token for ``n_patches`` 32-pixel patches (2 latent tokens each)."""
    return f"<reserved{8800 + n_patches:05d}>"


def image_token_codes(vocabulary_map: dict) -> dict:
    """BPE id -> VQGAN code for every ``IMGIMG...Z`` token (letters A-J are digits 0-9, the trailing Z dropped),
    the rule of transformers' ``ChameleonImageVocabularyMapping.bpe2img``."""
    out = {}
    for name, idx in vocabulary_map.items():
        if name.startswith("IMGIMG"):
            m = _IMAGE_NAME.match(name)
            if m is None:
                raise ValueError(f"image token {name!r} does not follow Chameleon's IMGIMG<A-J...>Z naming.")
            out[int(idx)] = int("".join(str(ord(c) - ord("A")) for c in m.group(1)))
    return out


def detect_style(config) -> str:
    """``"lumina-mgpt"`` or ``"anole"`` for a Chameleon config (see the module docstring)."""
    spec = getattr(config, "chameleon_generation", None) or {}
    if spec.get("style") is not None:
        return _check_style(spec["style"])
    if getattr(config, "mask_image_logits", None) is not None or getattr(config, "z_loss_weight", None) is not None:
        return "lumina-mgpt"
    if any("XLLMX" in str(a) for a in (getattr(config, "architectures", None) or [])):
        return "lumina-mgpt"
    return "anole"


def _check_style(style) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown Chameleon image style {style!r}; choose one of {list(STYLES)}.")
    return style


def configure_chameleon(model, style=None, height=None, width=None, prompt_template=None):
    """Record the image-generation settings on ``model.config.chameleon_generation`` (saved with the config), so
    that ``SpeculativeImagePipeline`` builds the family with them. ``height``/``width`` are in latent tokens
    (pixels / 16). Returns the model."""
    spec = dict(getattr(model.config, "chameleon_generation", None) or {})
    for key, value in dict(style=style, height=height, width=width, prompt_template=prompt_template).items():
        if value is not None:
            spec[key] = value
    if "style" in spec:
        _check_style(spec["style"])
    model.config.chameleon_generation = spec
    return model


# ------------------------------------------------------------------------------------------------------
# Layout and adapter
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChameleonLayout(ImageLayout):
    """``ImageLayout`` whose image tokens are a contiguous id block that maps to codes by the vocabulary names.

    ``token_codes[i]`` is the VQGAN code of token ``image_token_offset + i`` (None when it is simply ``i``, as in
    the released vocabulary). ``to_grid`` returns codes, so ``decode_codes`` gets VQGAN indices either way.
    """

    token_codes: tuple | None = None

    @cached_property
    def _code_table(self) -> torch.Tensor:
        return torch.tensor(self.token_codes, dtype=torch.long)

    def to_grid(self, new_tokens: torch.Tensor) -> torch.Tensor:
        grid = super().to_grid(new_tokens)
        if self.token_codes is None:
            return grid
        table = self._code_table.to(grid.device)
        return table[grid.clamp(0, len(self.token_codes) - 1)]


class ChameleonLM(CausalLM):
    """``CausalLM`` for ``ChameleonForConditionalGeneration``: the logits come from ``model.model`` + ``lm_head``,
    skipping the forward's masking of image tokens to ``finfo.min`` (which would make image generation
    impossible)."""

    def call_model(self, input_ids, attention_mask, position_ids, past_key_values, logits_to_keep=0,
                   cache_position=None, **kwargs):
        kwargs[cache_keyword(self.model.model)] = past_key_values
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=True, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.model.lm_head(hidden), output_cache(out)


# ------------------------------------------------------------------------------------------------------
# Family
# ------------------------------------------------------------------------------------------------------


@register_family
class ChameleonFamily(ImageFamily):
    """Lumina-mGPT / Anole text-to-image through ``transformers.ChameleonForConditionalGeneration``.

    Args:
        model: a ``ChameleonForConditionalGeneration`` (its ``config.vocabulary_map`` names the special tokens).
        tokenizer: the Chameleon tokenizer or ``ChameleonProcessor`` (needed for string prompts).
        vq: a :class:`ChameleonVQDecoder` (or a diffusers ``VQModel``) for pixels; None allows latent output only.
        style: ``"lumina-mgpt"`` or ``"anole"``; height, width: the token grid; prompt_template: ``str.format``
            pattern with ``{prompt}``, ``{width}``, ``{height}`` (pixels). Each defaults to
            ``config.chameleon_generation``, then to auto-detection / 32 x 32 / the style's template.

    ``prefill_inputs`` accepts strings (tokenized as ``tokenizer(template(text) + <reserved08706>)`` with BOS) or,
    without a tokenizer, pre-tokenized prompt bodies (lists of ids; BOS, separator and header are added).
    """

    name = "chameleon"
    conditioning = "text"
    adapter = ChameleonLM

    @classmethod
    def matches(cls, model) -> bool:
        try:
            from transformers import ChameleonForConditionalGeneration
        except ImportError:  # pragma: no cover - transformers without Chameleon
            return False
        return isinstance(model, ChameleonForConditionalGeneration)

    def __init__(self, model, tokenizer=None, vq=None, style=None, height=None, width=None, prompt_template=None):
        super().__init__(model, tokenizer=tokenizer, vq=vq)
        config = model.config
        spec = dict(getattr(config, "chameleon_generation", None) or {})
        self.style = _check_style(style) if style is not None else detect_style(config)
        self.height = int(height if height is not None else spec.get("height", DEFAULT_GRID))
        self.width = int(width if width is not None else spec.get("width", DEFAULT_GRID))
        if self.height < 1 or self.width < 1:
            raise ValueError(f"the token grid must be at least 1x1, got {self.height}x{self.width}.")
        if self.style == "lumina-mgpt" and (self.height % 2 or self.width % 2):
            raise ValueError(
                f"Lumina-mGPT's size header counts 32-pixel patches of 2x2 tokens: height and width must be even, "
                f"got {self.height}x{self.width}."
            )
        default_template = LUMINA_PROMPT_TEMPLATE if self.style == "lumina-mgpt" else "{prompt}"
        self.prompt_template = prompt_template if prompt_template is not None else spec.get(
            "prompt_template", default_template)
        vocab = getattr(config, "vocabulary_map", None)
        if not vocab:
            raise ValueError("this Chameleon config has no `vocabulary_map`; the image tokens cannot be located.")
        self._vocab = dict(vocab)

    # --- vocabulary -------------------------------------------------------------------------------------

    def token_id(self, name: str) -> int:
        if name not in self._vocab:
            raise ValueError(f"the Chameleon vocabulary has no {name!r} token, needed for {self.style} generation.")
        return int(self._vocab[name])

    @property
    def bos_token_id(self) -> int:
        if BOS_TOKEN in self._vocab:
            return int(self._vocab[BOS_TOKEN])
        if self.model.config.bos_token_id is None:
            raise ValueError("the Chameleon vocabulary has no `<s>` token and the config no `bos_token_id`.")
        return int(self.model.config.bos_token_id)

    @cached_property
    def _image_tokens(self):
        codes = image_token_codes(self._vocab)
        if not codes:
            raise ValueError("the Chameleon vocabulary has no image tokens (IMGIMG...Z).")
        ids = sorted(codes)
        lo, n = ids[0], len(ids)
        if ids != list(range(lo, lo + n)):
            raise ValueError(
                "the image tokens of this vocabulary are not one contiguous id block; mmspec's image layouts need "
                f"ids [offset, offset + N) (got {n} ids between {lo} and {ids[-1]})."
            )
        ordered = tuple(codes[i] for i in ids)
        if sorted(ordered) != list(range(n)):
            raise ValueError(f"the {n} image tokens do not name the codes 0..{n - 1} exactly once.")
        return lo, n, (None if ordered == tuple(range(n)) else ordered)

    def layout(self) -> ChameleonLayout:
        lo, n, codes = self._image_tokens
        eol = self.token_id(EOL_TOKEN) if self.style == "lumina-mgpt" else None
        return ChameleonLayout(height=self.height, width=self.width, image_token_offset=lo, codebook_size=n,
                               eol_token_id=eol, eoi_token_id=self.token_id(EOI_TOKEN), token_codes=codes)

    def header(self) -> list:
        """Tokens between the prompt and the image span (part of the prefill)."""
        boi = self.token_id(BOI_TOKEN)
        if self.style == "lumina-mgpt":
            size = [self.token_id(size_token_name(n // 2)) for n in (self.height, self.width)]
            return [boi] + size
        return [boi]

    def unconditional_prefix(self) -> list:
        """The unconditional row without a negative prompt (see the module docstring)."""
        if self.style == "lumina-mgpt":
            return self.header()
        return [self.bos_token_id] + self.header()

    @property
    def downsample(self) -> int:
        vq_config = self.model.config.vq_config
        mult = getattr(vq_config, "channel_multiplier", None) or vq_config["channel_multiplier"]
        return 2 ** (len(mult) - 1)

    def format_prompt(self, text: str) -> str:
        return self.prompt_template.format(prompt=text, width=self.width * self.downsample,
                                           height=self.height * self.downsample)

    # --- prompts ----------------------------------------------------------------------------------------

    def _encode(self, prompts, name):
        prompts = list(prompts)
        if all(isinstance(p, str) for p in prompts):
            rows = self._tokenize([self.format_prompt(p) for p in prompts])
        elif all(isinstance(p, torch.Tensor) or (isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p))
                 for p in prompts):
            sep = self.token_id(SEP_TOKEN)
            rows = [[self.bos_token_id] + [int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)] + [sep]
                    for p in prompts]
        else:
            raise ValueError(f"`{name}` must be strings or lists of token ids (not a mix), got "
                             f"{[type(p).__name__ for p in prompts]}.")
        bos = self.bos_token_id
        rows = [r if r[:1] == [bos] else [bos] + r for r in rows]
        head = self.header()
        return [r + head for r in rows]

    def _tokenize(self, texts):
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this model is text-conditioned: string prompts need a `tokenizer` (the Chameleon "
                             "tokenizer or ChameleonProcessor), or pass lists of token ids.")
        if hasattr(tok, "image_processor") and hasattr(tok, "tokenizer"):  # ChameleonProcessor: appends the separator
            enc = tok(text=texts, padding=True, return_tensors="pt")
            return [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
        sep = getattr(tok, "sep_token", None) or SEP_TOKEN
        enc = tok([t + sep for t in texts], add_special_tokens=True)["input_ids"]
        return [list(e) for e in enc]

    def prefill_inputs(self, prompts=None, negative_prompts=None, class_labels=None, prompt_embeds=None,
                       negative_prompt_embeds=None) -> PrefillInputs:
        if class_labels is not None or prompt_embeds is not None or negative_prompt_embeds is not None:
            raise ValueError(f"this model ({self.style}) is text-conditioned: `class_labels` and `prompt_embeds` "
                             "are not accepted; pass `prompt`.")
        if prompts is None or len(prompts) == 0:
            raise ValueError(f"this model ({self.style}) is text-conditioned: pass `prompt`.")
        cond = self._encode(prompts, "prompt")
        if negative_prompts is not None:
            if len(negative_prompts) != len(cond):
                raise ValueError(f"{len(negative_prompts)} negative prompts for {len(cond)} prompts.")
            uncond = self._encode(negative_prompts, "negative_prompt")
        else:
            uncond = [self.unconditional_prefix() for _ in cond]
        pad = self.model.config.pad_token_id or 0
        ids, mask = left_pad_batch(cond, pad)
        uids, umask = left_pad_batch(uncond, pad)
        return PrefillInputs(input_ids=ids, attention_mask=mask, uncond_input_ids=uids, uncond_attention_mask=umask)

    # --- codes and pixels -------------------------------------------------------------------------------

    def codebook(self) -> torch.Tensor:
        """[N, D] code vectors in *token* order (row i = token ``image_token_offset + i``)."""
        vq = self.vq
        if vq is not None and hasattr(vq, "quantize") and hasattr(vq.quantize, "embedding"):
            weight = vq.quantize.embedding.weight
        else:
            weight = self.model.model.vqmodel.quantize.embedding.weight
        _, n, codes = self._image_tokens
        weight = weight.detach()
        return weight[list(codes)] if codes is not None else weight[:n]

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        vq = self.vq
        if isinstance(vq, ChameleonVQDecoder):
            return vq.decode_codes(codes, self.height, self.width).clamp(-1, 1)
        if vq is not None and hasattr(vq, "decode") and hasattr(getattr(vq, "quantize", None), "get_codebook_entry"):
            return super().decode_codes(codes)
        raise ValueError(
            "decoding Chameleon image codes to pixels needs the VQGAN decoder, which transformers' ChameleonVQVAE "
            "(model.model.vqmodel) does not have: pass `vq=ChameleonVQDecoder.from_chameleon(model, "
            "vqgan_state_dict)` to the pipeline, or use output_type='latent'."
        )


# ------------------------------------------------------------------------------------------------------
# VQGAN decoder
# ------------------------------------------------------------------------------------------------------


class _Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Decoder(nn.Module):
    """taming-transformers' VQGAN decoder (no timestep embedding), mirror image of transformers'
    ``ChameleonVQVAEEncoder`` and built from the same blocks."""

    def __init__(self, cfg):
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonVQVAEEncoderAttnBlock as AttnBlock,
        )
        from transformers.models.chameleon.modeling_chameleon import (
            ChameleonVQVAEEncoderResnetBlock as ResnetBlock,
        )

        super().__init__()
        mult = tuple(cfg.channel_multiplier)
        self.num_resolutions, self.num_res_blocks = len(mult), cfg.num_res_blocks
        vanilla = cfg.attn_type == "vanilla"
        attn_res = cfg.attn_resolutions or ()
        block_in = cfg.base_channels * mult[-1]
        curr_res = cfg.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cfg, in_channels=block_in, out_channels=block_in)
        self.mid.attn_1 = AttnBlock(block_in) if vanilla else nn.Identity()
        self.mid.block_2 = ResnetBlock(cfg, in_channels=block_in, out_channels=block_in)
        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.base_channels * mult[level]
            for _ in range(self.num_res_blocks + 1):
                up.block.append(ResnetBlock(cfg, in_channels=block_in, out_channels=block_out))
                block_in = block_out
                if vanilla and curr_res in attn_res:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = _Upsample(block_in)
                curr_res *= 2
            self.up.insert(0, up)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


_VQ_FIELDS = ("embed_dim", "num_embeddings", "latent_channels", "resolution", "in_channels", "base_channels",
              "channel_multiplier", "num_res_blocks", "attn_resolutions", "dropout", "attn_type")


class ChameleonVQDecoder(ModelMixin, ConfigMixin):
    """The Chameleon VQGAN's decoding half: codebook, ``post_quant_conv`` and decoder.

    Built from the model's ``ChameleonVQVAEConfig`` fields; parameter names equal the released ``vqgan.ckpt`` keys,
    so :meth:`load_vqgan_state_dict` loads its decoder directly. A diffusers model, so pipelines save and load it.
    """

    @register_to_config
    def __init__(self, embed_dim=256, num_embeddings=8192, latent_channels=256, resolution=512, in_channels=3,
                 base_channels=128, channel_multiplier=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=None,
                 dropout=0.0, attn_type="vanilla"):
        super().__init__()
        cfg = SimpleNamespace(**{k: v for k, v in locals().items() if k in _VQ_FIELDS})
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(num_embeddings, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        self.decoder = _Decoder(cfg)

    @classmethod
    def from_vq_config(cls, vq_config) -> ChameleonVQDecoder:
        get = vq_config.get if isinstance(vq_config, dict) else (lambda k, d=None: getattr(vq_config, k, d))
        kwargs = {k: get(k) for k in _VQ_FIELDS if get(k) is not None}
        if "channel_multiplier" in kwargs:
            kwargs["channel_multiplier"] = list(kwargs["channel_multiplier"])
        return cls(**kwargs)

    @classmethod
    def from_chameleon(cls, model, vqgan_state_dict=None) -> ChameleonVQDecoder:
        """Decoder for a ``ChameleonForConditionalGeneration`` / ``ChameleonModel`` / ``ChameleonVQVAE``: codebook
        and ``post_quant_conv`` copied from the model's VQ-VAE, decoder weights from ``vqgan_state_dict`` (the
        taming checkpoint's ``state_dict``; random when None)."""
        vqvae = model
        for attr in ("model", "vqmodel"):
            vqvae = getattr(vqvae, attr, vqvae)
        dec = cls.from_vq_config(vqvae.config)
        with torch.no_grad():
            dec.quantize.embedding.weight.copy_(vqvae.quantize.embedding.weight)
            dec.post_quant_conv.load_state_dict(vqvae.post_quant_conv.state_dict())
        if vqgan_state_dict is not None:
            dec.load_vqgan_state_dict(vqgan_state_dict)
        weight = vqvae.quantize.embedding.weight
        nn.Module.to(dec, device=weight.device, dtype=weight.dtype)  # (ModelMixin.to warns about dtypes)
        return dec.eval()

    def load_vqgan_state_dict(self, state_dict, strict: bool = True):
        """Load the decoding half of a taming VQGAN ``state_dict`` (encoder and loss keys are ignored)."""
        state_dict = state_dict.get("state_dict", state_dict)
        keep = ("decoder.", "quantize.embedding.", "post_quant_conv.")
        return self.load_state_dict({k: v for k, v in state_dict.items() if k.startswith(keep)}, strict=strict)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, embed_dim, h, w] -> images [B, 3, H, W] (about [-1, 1])."""
        return self.decoder(self.post_quant_conv(z))

    def decode_codes(self, codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """VQGAN code indices [B, height * width] (row-major) -> images [B, 3, H, W]."""
        weight = self.quantize.embedding.weight
        z = self.quantize.embedding(codes.to(weight.device)).view(codes.shape[0], height, width, -1)
        return self.decode(z.permute(0, 3, 1, 2).contiguous())
