"""``CaptionPipeline``: image captioning with a transformers vision-language model, decoded speculatively.

Images go through the model's own processor; the pixel values reach the target's prefill only, then the
caption is decoded with prompt lookup, Jacobi, a draft model, or plain AR (all through ``mmspec.generate``).
Greedy captions equal ``model.generate(do_sample=False)`` token for token, and an image's caption does not
depend on which other images share its batch.
"""

from __future__ import annotations

import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from ..checks import resolve_method
from ..decoding import GenerationStats
from ..drafting import method_spec
from ..generation import generate
from ..models.vocab import warn_unknown_words
from ..progress import quiet_loading

_LOAD_LOCK = threading.RLock()
__all__ = ["CaptionPipeline", "CaptionOutput", "load_image", "merge_stats", "DEFAULT_PROMPT"]

DEFAULT_PROMPT = "describe the image"
_CONFIG_NAME = "caption_pipeline.json"


@dataclass
class CaptionOutput:
    """Result of ``CaptionPipeline.__call__``.

    Attributes:
        captions: one string per input image, in input order.
        sequences: one LongTensor [n_i] per image: the new token ids (EOS kept, padding removed).
        stats: ``GenerationStats`` summed over all batches (per-row lists concatenated in input order).
    """

    captions: list
    sequences: list
    stats: GenerationStats = field(default_factory=GenerationStats)


def load_image(image) -> PIL.Image.Image:
    """One image as an RGB ``PIL.Image``.

    Accepts a ``PIL.Image``; a numpy array HWC (or HW) of uint8, or of floats in [0, 1]; a torch tensor CHW
    (or HW) of floats in [0, 1] or of uint8; a file path (``str`` / ``Path``); or the encoded file's ``bytes``.
    """
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        if not os.path.isfile(image):
            raise ValueError(f"image path {str(image)!r} does not exist or is not a file.")
        try:
            with PIL.Image.open(image) as im:
                return im.convert("RGB")
        except PIL.UnidentifiedImageError:
            raise ValueError(f"could not decode the image file {str(image)!r}.") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with PIL.Image.open(io.BytesIO(bytes(image))) as im:
                return im.convert("RGB")
        except PIL.UnidentifiedImageError:
            raise ValueError("could not decode the image bytes (not a PNG/JPEG/... file).") from None
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 3:
            if t.shape[0] not in (1, 3, 4):
                raise ValueError(f"a tensor image must be CHW with 1, 3 or 4 channels, got shape {tuple(t.shape)}.")
            t = t.permute(1, 2, 0)
        elif t.dim() != 2:
            raise ValueError(f"a tensor image must be CHW or HW, got shape {tuple(t.shape)}.")
        return load_image(t.numpy())
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
            raise ValueError(f"a numpy image must be HWC with 1, 3 or 4 channels or HW, got shape {a.shape}.")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"the image is empty (shape {a.shape}).")
        if a.dtype == np.uint8:
            pass
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
                raise ValueError("a float image must have values in [0, 1] (got values outside, or NaN).")
            a = np.round(a * 255.0).astype(np.uint8)
        else:
            raise ValueError(f"an array image must be uint8 or float in [0, 1], got dtype {a.dtype}.")
        return PIL.Image.fromarray(a).convert("RGB")
    raise TypeError(
        f"unsupported image type {type(image).__name__}; pass a PIL.Image, a numpy HWC uint8 array, a torch CHW "
        "float tensor in [0, 1], a file path or the file's bytes."
    )


def _image_list(images) -> list:
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("`images` is an empty list.")
        return list(images)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def merge_stats(parts: list) -> GenerationStats:
    """Sum ``GenerationStats`` of consecutive batches into one (per-row lists concatenated)."""
    out = GenerationStats()
    width = max((len(p.accepted_histogram) for p in parts), default=0)
    out.accepted_histogram = [0] * width
    for p in parts:
        out.target_forwards += p.target_forwards
        out.draft_forwards += p.draft_forwards
        out.tree_nodes += p.tree_nodes
        out.new_tokens += p.new_tokens
        out.new_tokens_per_row += list(p.new_tokens_per_row)
        out.row_forwards += list(p.row_forwards)
        out.wall_time += p.wall_time
        for k, c in enumerate(p.accepted_histogram):
            out.accepted_histogram[k] += c
    return out


class CaptionPipeline:
    """Caption images with a vision-language model and speculative decoding.

    Args:
        model: a transformers VLM (``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
            ``Idefics3ForConditionalGeneration`` / SmolVLM, ``PaliGemmaForConditionalGeneration``, ...).
        processor: its processor (image processor + tokenizer).
        draft_model: drafter for ``decoding="draft"``: a small VLM sharing the processor (it then sees the
            images too) or a text-only causal LM sharing the tokenizer (it sees the prompt ids only).
        decoding: default method, one of ``"lookup"``, ``"jacobi"``, ``"draft"``, ``"ar"``.
        window: tokens verified per target forward (anchor + drafts); None for the method's default.
        prompt: default text prompt (``DEFAULT_PROMPT`` when None).

    The prompt is wrapped with the processor's chat template when it has one (one image, then the text, as
    a user turn with the generation prompt); otherwise the processor's image token is put before the text
    unless the prompt already contains it.
    """

    def __init__(self, model, processor, draft_model=None, decoding: str = "lookup", window: int | None = None,
                 prompt: str | None = None):
        if getattr(model, "config", None) is None:
            raise TypeError(f"`model` must be a transformers vision-language model, got {type(model).__name__}.")
        if processor is None or not callable(processor):
            raise TypeError("`processor` must be the model's transformers processor (e.g. AutoProcessor).")
        self._check_decoding(decoding, draft_model)
        self.model, self.processor, self.draft_model = model, processor, draft_model
        self.decoding, self.window = decoding, window
        self.prompt = DEFAULT_PROMPT if prompt is None else prompt
        self._progress_config = {}

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path, draft=None, device="cpu", dtype=torch.float32, **kwargs):
        """Load the model and processor saved in ``path`` (``save_pretrained`` of this class, or any folder
        holding a transformers VLM and its processor).

        Args:
            path: folder with the model and processor.
            draft: a draft model, a folder to load one from, or None (then ``path/draft`` is used when present).
            device, dtype: where and in which dtype to load the weights.
            **kwargs: ``decoding``, ``window``, ``prompt`` (override the values saved with the pipeline).

        Thread-safe: transformers' ``from_pretrained`` patches module constructors process-wide while it loads,
        so loads through this method are serialised (a server loading in a worker thread while other code loads
        too would otherwise end with parameters left on ``meta``).
        """
        with _LOAD_LOCK:
            return cls._from_pretrained(path, draft, device, dtype, **kwargs)

    @classmethod
    @quiet_loading
    def _from_pretrained(cls, path, draft, device, dtype, **kwargs):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"`path` {str(path)!r} is not a folder saved with save_pretrained.")
        settings = {}
        if (path / _CONFIG_NAME).is_file():
            settings = json.loads((path / _CONFIG_NAME).read_text())
        settings.update(kwargs)
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
        if draft is None and (path / "draft" / "config.json").is_file():
            draft = path / "draft"
        if isinstance(draft, (str, Path)):
            config = json.loads((Path(draft) / "config.json").read_text())
            auto = AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM
            draft = auto.from_pretrained(draft, dtype=dtype).to(device).eval()
        if settings.get("decoding") == "draft" and draft is None:
            settings["decoding"] = "lookup"
        return cls(model, processor, draft_model=draft, **settings)

    def save_pretrained(self, path) -> None:
        """Save the model, the processor, the draft (in ``path/draft``) and the pipeline defaults."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        if self.draft_model is not None:
            self.draft_model.save_pretrained(path / "draft")
        settings = {"decoding": self.decoding, "window": self.window, "prompt": self.prompt}
        (path / _CONFIG_NAME).write_text(json.dumps(settings, indent=2))

    def to(self, device):
        self.model.to(device)
        if self.draft_model is not None:
            self.draft_model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm bar over batches (e.g. ``disable=True``), as in diffusers."""
        self._progress_config = dict(kwargs)

    # ------------------------------------------------------------------ prompt and inputs
    def format_prompt(self, prompt: str) -> str:
        """The processor text for one image and ``prompt`` (see the class docstring)."""
        processor = self.processor
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image_token = getattr(processor, "image_token", None)
        if image_token is None or image_token in prompt:
            return prompt
        return f"{image_token} {prompt}".rstrip()

    def prepare_inputs(self, images: list, prompt: str) -> dict:
        """Processor outputs for a batch (left padded), floats in the model's dtype, on its device."""
        texts = [self.format_prompt(prompt)] * len(images)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            warn_unknown_words(tokenizer, [prompt])
        if tokenizer is not None and getattr(tokenizer, "padding_side", "left") != "left":
            tokenizer.padding_side = "left"  # mmspec.generate (like generate for decoder-only models) needs left padding
        inputs = self.processor(images=[[im] for im in images], text=texts, padding=True, return_tensors="pt")
        dtype, device = self.model.dtype, self.device
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            out[k] = v
        return out

    # ------------------------------------------------------------------ captioning
    @staticmethod
    def _check_decoding(decoding, draft_model, arg="decoding"):
        if method_spec(decoding, arg=arg).needs_draft and draft_model is None:
            raise ValueError(f"`{arg}={decoding!r}` needs a `draft_model` (pass it to the pipeline).")

    @torch.no_grad()
    def __call__(self, images, prompt: str | None = None, max_new_tokens: int = 32, decoding: str | None = None,
                 batch_size: int = 8, generator=None, progress: bool | None = None, window: int | None = None,
                 method: str | None = None, **generate_kwargs) -> CaptionOutput:
        """Caption one image or a list of images.

        Args:
            images: one image or a list; each a ``PIL.Image``, numpy HWC uint8 (or float in [0, 1]), torch CHW
                float in [0, 1], a file path, or the file's bytes (see ``load_image``). A 4-D array or tensor is
                a batch.
            prompt: the text asked with every image (default: the pipeline's ``prompt``).
            max_new_tokens: most caption tokens per image.
            decoding: ``"lookup"``, ``"jacobi"``, ``"draft"`` or ``"ar"`` (default: the pipeline's); ``method=`` is
                the same argument under ``mmspec.generate``'s name.
            batch_size: images per ``mmspec.generate`` call.
            generator: ``torch.Generator`` for sampling (``do_sample=True`` in ``generate_kwargs``).
            progress: tqdm bar over batches; None shows it when there is more than one batch and the output
                is a terminal.
            window: tokens verified per target forward (default: the pipeline's, else the method's).
            **generate_kwargs: passed to ``mmspec.generate`` (``do_sample``, ``temperature``, ``acceptance``,
                ``eos_token_id``, ``tree=(width, depth)`` for token trees, ...).

        Returns:
            ``CaptionOutput`` (captions, new token ids per image, summed stats).
        """
        decoding, arg = resolve_method(method, decoding, default=self.decoding)
        self._check_decoding(decoding, self.draft_model, arg)
        prompt = self.prompt if prompt is None else prompt
        if not isinstance(prompt, str):
            raise TypeError(f"`prompt` must be a string, got {type(prompt).__name__}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
        pil = [load_image(im) for im in _image_list(images)]
        window = self.window if window is None else window
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        gen_config = getattr(self.model, "generation_config", None)
        pad_id = getattr(gen_config, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
        kwargs = dict(generate_kwargs)
        if kwargs.get("pad_token_id") is None and pad_id is not None:
            kwargs["pad_token_id"] = pad_id
        if method_spec(decoding).needs_draft:
            kwargs["draft_model"] = self.draft_model

        chunks = [pil[i : i + batch_size] for i in range(0, len(pil), batch_size)]
        # None: a bar for several batches, on a terminal only (tqdm's disable=None); True/False: as asked
        disable = (None if len(chunks) > 1 else True) if progress is None else not progress
        config = {"desc": "captions", "disable": disable, **self._progress_config}
        sequences, parts = [], []
        for chunk in tqdm(chunks, **config):
            inputs = self.prepare_inputs(chunk, prompt)
            input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
            out = generate(self.model, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                           method=decoding, window=window, generator=generator, **kwargs, **inputs)
            T = input_ids.shape[1]
            for row, n in zip(out.sequences[:, T:].cpu(), out.stats.new_tokens_per_row):
                sequences.append(row[:n].clone())
            parts.append(out.stats)
        captions = [tokenizer.decode(s, skip_special_tokens=True).strip() for s in sequences]
        return CaptionOutput(captions=captions, sequences=sequences, stats=merge_stats(parts))
