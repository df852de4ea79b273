"""Emu3 (transformers ``Emu3ForConditionalGeneration``) text-to-image generation as an mmspec family.

How Emu3 generates an image (transformers' Emu3 docs and ``modeling_emu3.py`` / ``processing_emu3.py``), and how
this family reproduces it on mmspec's shared loop:

* **Joint vocabulary.** Image codes are ordinary tokens of the text vocabulary, ``<|visual token000000|>`` ...
  (``Emu3ImageVocabularyMapping``: ``img2bpe`` maps VQ code -> token id, ``bpe2img`` back, ``image_tokens`` is the
  sorted id list). The ids are looked up through the mapping, never assumed; when they are ``offset + code`` (as in
  the released checkpoints) the layout is the plain contiguous one, otherwise ``Emu3Layout`` carries the per-code
  ids (``image_token_ids``) and translates both ways.
* **Prompt.** ``Emu3Processor(text, return_for_image_generation=True)`` builds
  ``BOS + text + <|image start|> + "H*W" + <|image token|>``; ``H x W`` is the token grid from the processor's
  ``ratio`` and ``image_area`` (``calculate_generate_size``; 90 x 90 for the defaults). Set
  ``processor.ratio`` / ``processor.image_area`` to change the size.
* **Generated span** (the docs' ``prefix_allowed_tokens_fn``): ``H`` rows of ``W`` visual tokens, each row followed
  by the end-of-line token ``<|extra_200|>``, then end-of-frame ``<|extra_201|>``, end-of-image ``<|image end|>`` and
  EOS (the tokenizer's ``eos_token``). ``model.decode_image_tokens`` expects exactly this span (it drops the last
  three tokens and the end-of-line column). ``Emu3Layout`` forces every structural token and lets image positions
  emit visual tokens only.
* **Guidance.** A negative prompt as the unconditional branch (``negative_prompt_ids`` ->
  ``UnbatchedClassifierFreeGuidanceLogitsProcessor``). Like BAAI's reference code (``mode="G"`` for both prompts)
  the negative prompt also gets the size header, ``BOS + negative + <|image start|>H*W<|image token|>``; without a
  negative prompt it is the empty prompt plus header. transformers combines log-softmaxed scores,
  ``u' + s (c' - u')``; ``GuidedLM`` combines raw logits, ``u + s (c - u)``. The two differ by a per-row constant,
  so the argmax and the softmax (hence greedy and sampled outputs) are the same.
  (transformers' docs example passes its negative prompt without the header; pass that form as pre-built ids
  if you want it: pre-built negative prompts are used as given.)
* **Pixels.** ``model.model.vqmodel.decode`` on the ``[B, H, W]`` code grid (what ``decode_image_tokens`` does), then
  the processor's un-normalisation (``x * image_std + image_mean`` gives ``[0, 1]``), returned in ``[-1, 1]``.

Build the pipeline from a loaded model and its processor::

    from transformers import Emu3ForConditionalGeneration, Emu3Processor
    from mmspec.pipelines import SpeculativeImagePipeline
    import mmspec.models.emu3  # registers the family (until families.py imports it)

    model = Emu3ForConditionalGeneration.from_pretrained("BAAI/Emu3-Gen-hf", dtype="bfloat16")
    processor = Emu3Processor.from_pretrained("BAAI/Emu3-Gen-hf")
    pipe = SpeculativeImagePipeline(model=model, vq=model.model.vqmodel, tokenizer=processor)
    image = pipe("a portrait of young girl. masterpiece, film grained, best quality.",
                 negative_prompt="lowres, bad anatomy, ...", guidance_scale=3.0).images[0]

The ``vq`` component may be ``None`` (the model's own VQ is used). ``Emu3Family.prefill_inputs`` also takes
pre-built prompt ids (lists of ints that already end with the size header, e.g. the processor's output) when no
processor is at hand; the grid is then read from the header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .causal_lm import CausalLM
from .families import ImageFamily, PrefillInputs, left_pad_batch, register_family
from .image_tokens import AFTER, EOL, IMAGE, ImageLayout

__all__ = ["Emu3Family", "Emu3Layout", "END", "emu3_special_ids"]

#: Kinds ``END + j`` are the j-th end token after the grid (end-of-frame, end-of-image, EOS for Emu3).
END = 4

#: Emu3's token names (the processor's tokenizer attributes override them when present).
EMU3_TOKEN_NAMES = {
    "boi_token": "<|image start|>",
    "eoi_token": "<|image end|>",
    "image_wrapper_token": "<|image token|>",
    "eof_token": "<|extra_201|>",
    "eol_token": "<|extra_200|>",
}


@dataclass(frozen=True)
class Emu3Layout(ImageLayout):
    """``ImageLayout`` with several end tokens after the grid and, optionally, non-contiguous image-token ids.

    Attributes (beyond ``ImageLayout``'s):
        end_token_ids: tokens forced after the last row, in order (Emu3: end-of-frame, end-of-image, EOS). Their
            kinds are ``END + j``. ``eoi_token_id`` stays None (the end-of-image token is one of these).
        image_token_ids: the token id of each code (``image_token_ids[c]`` for code ``c``) when they are not
            ``image_token_offset + c``; then ``image_token_offset`` / ``codebook_size`` describe the id span
            ``[min, max]`` that holds them (``token_range``), which may contain other tokens.
    """

    end_token_ids: tuple = ()
    image_token_ids: tuple | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.eoi_token_id is not None:
            raise ValueError("Emu3Layout lists its end tokens in `end_token_ids`; leave `eoi_token_id` None.")
        if self.image_token_ids is not None:
            ids = self.image_token_ids
            if len(set(ids)) != len(ids):
                raise ValueError("`image_token_ids` must be distinct.")
            if min(ids) != self.image_token_offset or max(ids) + 1 != self.image_token_offset + self.codebook_size:
                raise ValueError("`image_token_offset` / `codebook_size` must span `image_token_ids` exactly.")

    @property
    def num_codes(self) -> int:
        """Number of VQ codes (``codebook_size`` unless the ids are scattered)."""
        return self.codebook_size if self.image_token_ids is None else len(self.image_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.height * self.row_stride + len(self.end_token_ids)

    def kind(self, index: torch.Tensor) -> torch.Tensor:
        grid_end = self.height * self.row_stride
        kind = super().kind(index)  # IMAGE / EOL inside the grid, AFTER beyond (eoi_token_id is None)
        end = index - grid_end
        kind = torch.where((end >= 0) & (end < len(self.end_token_ids)), END + end, kind)
        return torch.where(index >= self.num_tokens, AFTER, kind)

    def image_ids(self, device=None) -> torch.Tensor:
        """LongTensor [num_codes]: the token id of every code."""
        if self.image_token_ids is None:
            return torch.arange(self.image_token_offset, self.image_token_offset + self.codebook_size, device=device)
        return torch.tensor(self.image_token_ids, dtype=torch.long, device=device)

    def allowed(self, vocab_size: int, device=None) -> torch.Tensor:
        """BoolTensor [END + len(end_token_ids), V], indexed by kind."""
        allowed = torch.zeros(END + len(self.end_token_ids), vocab_size, dtype=torch.bool, device=device)
        allowed[IMAGE, self.image_ids(device)] = True
        if self.eol_token_id is not None:
            allowed[EOL, self.eol_token_id] = True
        allowed[AFTER] = True
        for j, tok in enumerate(self.end_token_ids):
            allowed[END + j, tok] = True
        return allowed

    def forced_token(self, kind: torch.Tensor) -> torch.Tensor:
        out = super().forced_token(kind)
        for j, tok in enumerate(self.end_token_ids):
            out = torch.where(kind == END + j, tok, out)
        return out

    def to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Image-token ids (any shape) -> code indices; a non-image id raises ``ValueError``."""
        if self.image_token_ids is None:
            codes = ids - self.image_token_offset
            bad = (codes < 0) | (codes >= self.codebook_size)
        else:
            lookup = torch.full((self.image_token_offset + self.codebook_size,), -1, dtype=torch.long)
            lookup[self.image_ids()] = torch.arange(self.num_codes)
            codes = lookup.to(ids.device)[ids.clamp(0, lookup.numel() - 1)]
            bad = (codes < 0) | (ids < 0) | (ids >= lookup.numel())
        if bool(bad.any()):
            raise ValueError("the generated grid holds tokens that are not image tokens.")
        return codes

    def to_grid(self, new_tokens: torch.Tensor) -> torch.Tensor:
        span = new_tokens[:, : self.height * self.row_stride].reshape(-1, self.height, self.row_stride)
        return self.to_codes(span[..., : self.width]).reshape(-1, self.height * self.width)


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_processor(obj) -> bool:
    return obj is not None and hasattr(obj, "calculate_generate_size") and hasattr(obj, "tokenizer")


def emu3_special_ids(model, processor=None) -> dict:
    """Token ids of Emu3's structural tokens: ``boi, eoi, wrapper, eof, eol, eos, bos, pad``.

    Names come from the processor's tokenizer (``boi_token``, ...) when given, else Emu3's defaults; ids from the
    model's ``config.vocabulary_map`` (the tokenizer's vocabulary). EOS / BOS / PAD come from the tokenizer, else
    from the text config.
    """
    vocab = model.config.vocabulary_map or {}
    tok = processor.tokenizer if processor is not None else None
    ids = {}
    for key, default in EMU3_TOKEN_NAMES.items():
        name = getattr(tok, key, None) or default
        if name not in vocab:
            raise ValueError(f"Emu3's {key} {name!r} is not in `config.vocabulary_map`.")
        ids[key[: -len("_token")]] = int(vocab[name])
    eol = model.vocabulary_mapping.eol_token_id
    if eol is not None:
        ids["eol"] = int(eol)
    text = _text_config(model)
    for key in ("eos", "bos", "pad"):
        value = getattr(tok, f"{key}_token_id", None) if tok is not None else None
        if value is None:
            value = getattr(text, f"{key}_token_id", None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        ids[key] = None if value is None else int(value)
    if ids["eos"] is None:
        raise ValueError("Emu3 ends an image with EOS, but neither the tokenizer nor the config has `eos_token_id`.")
    ids["wrapper"] = ids.pop("image_wrapper")
    return ids


@register_family
class Emu3Family(ImageFamily):
    """transformers ``Emu3ForConditionalGeneration`` in image-generation mode (see the module docstring).

    ``tokenizer`` is the ``Emu3Processor`` (it builds the size header and knows the grid size); ``vq`` defaults to
    the model's own ``model.model.vqmodel``.
    """

    name = "emu3"
    conditioning = "text"
    adapter = CausalLM

    @classmethod
    def matches(cls, model) -> bool:
        config = getattr(model, "config", None)
        return (getattr(config, "model_type", None) == "emu3" and hasattr(model, "vocabulary_mapping")
                and hasattr(model, "lm_head") and getattr(config, "vocabulary_map", None) is not None)

    def __init__(self, model, tokenizer=None, vq=None):
        super().__init__(model, tokenizer=tokenizer, vq=vq)
        self.processor = tokenizer if _is_processor(tokenizer) else None
        self._grid = None  # (H, W) read from pre-built prompt ids
        self._names = None  # token id -> name, for reading headers

    # --- layout -------------------------------------------------------------------------------------------------
    def grid_size(self) -> tuple[int, int]:
        """(H, W) token grid: from pre-built prompt ids once seen, else from the processor's ratio / image_area."""
        if self._grid is not None:
            return self._grid
        return self._processor_grid()

    def _processor_grid(self) -> tuple[int, int]:
        proc = self.processor
        if proc is None:
            raise ValueError(
                "Emu3 needs its `Emu3Processor` (pass it as the pipeline's `tokenizer`) to know the image size, "
                "or pre-built prompt ids that end with the size header."
            )
        h, w = proc.calculate_generate_size(proc.ratio, proc.image_area, proc.downsample_ratio)
        return int(h), int(w)

    def layout(self) -> Emu3Layout:
        h, w = self.grid_size()
        ids = emu3_special_ids(self.model, self.processor)
        mapping = self.model.vocabulary_mapping
        img2bpe = mapping.img2bpe
        n = len(img2bpe)
        if n == 0 or sorted(img2bpe) != list(range(n)):
            raise ValueError("Emu3's `vocabulary_map` must name visual tokens <|visual token000000|> .. for codes 0..N-1.")
        bpe = [int(img2bpe[c]) for c in range(n)]
        lo, hi = min(bpe), max(bpe) + 1
        contiguous = all(b == bpe[0] + c for c, b in enumerate(bpe))
        return Emu3Layout(height=h, width=w, image_token_offset=lo, codebook_size=hi - lo, eol_token_id=ids["eol"],
                          end_token_ids=(ids["eof"], ids["eoi"], ids["eos"]),
                          image_token_ids=None if contiguous else tuple(bpe))

    # --- prompts ------------------------------------------------------------------------------------------------
    def header_ids(self, h: int, w: int) -> list:
        """Token ids of ``<|image start|>H*W<|image token|>`` (through the processor's tokenizer)."""
        proc = self._need_processor()
        tok = proc.tokenizer
        text = f"{proc.image_start_token}{h}*{w}{proc.fake_token_around_image}"
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def parse_header(self, ids) -> tuple[int, int]:
        """(H, W) from prompt ids ending with ``<|image start|>H*W<|image token|>``."""
        special = emu3_special_ids(self.model, self.processor)
        ids = [int(i) for i in ids]
        if not ids or ids[-1] != special["wrapper"] or special["boi"] not in ids:
            raise ValueError("pre-built Emu3 prompt ids must end with the size header <|image start|>H*W<|image token|>.")
        start = len(ids) - 1 - ids[::-1].index(special["boi"])
        if self._names is None:
            self._names = {v: k for k, v in self.model.config.vocabulary_map.items()}
        text = "".join(self._names.get(i, "?") for i in ids[start + 1: -1])
        match = re.fullmatch(r"\s*(\d+)\s*\*\s*(\d+)\s*", text)
        if match is None:
            raise ValueError(f"cannot read the image size from the Emu3 header {text!r} (expected 'H*W').")
        return int(match.group(1)), int(match.group(2))

    def _need_processor(self):
        if self.processor is None:
            raise ValueError(
                "Emu3 text prompts need the `Emu3Processor` (pass it as the pipeline's `tokenizer`; a bare tokenizer "
                "does not build the image-size header), or pass pre-built prompt ids to `prefill_inputs`."
            )
        return self.processor

    def _encode(self, texts) -> list:
        proc = self._need_processor()
        enc = proc(text=list(texts), return_for_image_generation=True, ratio=proc.ratio, image_area=proc.image_area)
        grid = self.grid_size()
        if any(tuple(s) != grid for s in enc["image_sizes"]):
            raise ValueError(f"the processor built headers for {enc['image_sizes']}, expected {grid}.")
        return [list(map(int, ids)) for ids in enc["input_ids"]]

    def _pad_id(self) -> int:
        pad = emu3_special_ids(self.model, self.processor)["pad"]
        return 0 if pad is None else pad

    def prefill_inputs(self, prompts=None, negative_prompts=None, class_labels=None, prompt_embeds=None,
                       negative_prompt_embeds=None) -> PrefillInputs:
        """Cond rows ``BOS + prompt + header``, uncond rows ``BOS + negative prompt (default empty) + header``.

        ``prompts`` / ``negative_prompts``: lists of strings (needs the processor), or lists of pre-built id lists
        (prompts already ending with the size header, as the processor makes them; the default negative prompt is
        then the BOS (if the prompt starts with it) plus the prompt's header; a pre-built negative prompt without
        the header is used as given).
        """
        if class_labels is not None or prompt_embeds is not None or negative_prompt_embeds is not None:
            raise ValueError("Emu3 is text-conditioned: `class_labels`, `prompt_embeds` and "
                             "`negative_prompt_embeds` are not accepted; pass `prompt`.")
        if prompts is None:
            raise ValueError("Emu3 is text-conditioned: pass `prompt`.")
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("`prompt` is empty.")
        if negative_prompts is not None:
            negative_prompts = list(negative_prompts)
            if len(negative_prompts) == 1 and len(prompts) > 1:
                negative_prompts = negative_prompts * len(prompts)
            if len(negative_prompts) != len(prompts):
                raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts.")
        if all(isinstance(p, str) for p in prompts):
            if negative_prompts is not None and not all(isinstance(p, str) for p in negative_prompts):
                raise ValueError("pass `negative_prompt` as strings, like `prompt`.")
            self._grid = None  # the processor decides the size
            cond = self._encode(prompts)
            uncond = self._encode(negative_prompts if negative_prompts is not None else [""] * len(prompts))
        else:
            cond = [_as_ids(p, "prompt") for p in prompts]
            grids = {self.parse_header(ids) for ids in cond}
            if negative_prompts is None:
                bos = emu3_special_ids(self.model, self.processor)["bos"]
                uncond = [self._default_uncond(ids, bos) for ids in cond]
            else:  # a negative prompt without the header (transformers' docs form) is taken as it is
                uncond = [_as_ids(p, "negative_prompt") for p in negative_prompts]
                wrapper = emu3_special_ids(self.model, self.processor)["wrapper"]
                grids |= {self.parse_header(ids) for ids in uncond if ids[-1] == wrapper}
            if len(grids) != 1:
                raise ValueError(f"the prompts ask for different image sizes {sorted(grids)}; use one size per batch.")
            grid = grids.pop()
            if self.processor is not None and grid != self._processor_grid():
                raise ValueError(f"the prompt headers ask for {grid[0]}*{grid[1]} but the processor is set to "
                                 f"{self._processor_grid()}; set `processor.image_area` / `processor.ratio` to match.")
            self._grid = grid
        pad = self._pad_id()
        ids, mask = left_pad_batch(cond, pad)
        uids, umask = left_pad_batch(uncond, pad)
        return PrefillInputs(input_ids=ids, attention_mask=mask, uncond_input_ids=uids, uncond_attention_mask=umask)

    def _default_uncond(self, ids, bos):
        boi = emu3_special_ids(self.model, self.processor)["boi"]
        start = len(ids) - 1 - ids[::-1].index(boi)
        return ([bos] if bos is not None and ids and ids[0] == bos else []) + ids[start:]

    # --- pixels -------------------------------------------------------------------------------------------------
    def vq_model(self):
        """The Emu3 VQ-VAE: the ``vq`` component if given, else ``model.model.vqmodel``."""
        vq = self.vq if self.vq is not None else getattr(getattr(self.model, "model", None), "vqmodel", None)
        if vq is None:
            raise ValueError("no Emu3 VQ model: pass `vq=model.model.vqmodel` (or None with a full Emu3 model).")
        return vq

    def codebook(self) -> torch.Tensor:
        """[codebook_size, D] code vectors ordered by token id over ``token_range`` (row i = token offset + i).

        With scattered image-token ids, rows of the span that are not image tokens are placed far away from every
        code (the relaxed criteria assume a contiguous range; exact acceptance never needs this table)."""
        weight = self.vq_model().quantize.embedding.weight.detach()
        layout = self.layout()
        if layout.image_token_ids is None:
            return weight
        far = weight.abs().max() * 1e3 + 1.0
        table = weight.new_full((layout.codebook_size, weight.shape[1]), float(far))
        table[layout.image_ids(weight.device) - layout.image_token_offset] = weight
        return table

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [B, H * W] -> images [B, 3, 8H, 8W] in [-1, 1] (Emu3 VQ decode + processor un-normalise)."""
        h, w = self.grid_size()
        vq = self.vq_model()
        device = next(vq.parameters()).device
        images = vq.decode(codes.reshape(-1, h, w).to(device)).float()  # normalised by the image processor
        mean, std = 0.5, 0.5  # without a processor: the VQ output is taken to be in [-1, 1]
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is not None:
            if getattr(image_processor, "do_normalize", True):
                mean, std = image_processor.image_mean, image_processor.image_std
            else:
                mean, std = 0.0, 1.0
        mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
        std = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
        return ((images * std + mean) * 2 - 1).clamp(-1, 1)


def _as_ids(p, name) -> list:
    if isinstance(p, torch.Tensor):
        if p.dim() != 1:
            raise ValueError(f"a pre-built `{name}` must be a 1-D list of token ids.")
        return [int(i) for i in p.tolist()]
    if isinstance(p, (list, tuple)) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
        return list(p)
    raise ValueError(f"`{name}` must be strings or lists of token ids, got {type(p).__name__}.")
