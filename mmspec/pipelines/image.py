"""``SpeculativeImagePipeline``: autoregressive image generation with speculative Jacobi / draft decoding."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..checks import check_choice, check_decoding, check_generator, check_int, resolve_method
from ..compile import cache_options
from ..decoding import DecodeState, GenerationStats, decode
from ..drafting import TREE_METHODS, available_methods, make_proposer
from ..models.causal_lm import input_device
from ..models.families import family_for
from ..models.image_tokens import GuidedLM
from ..progress import TerminalProgressMixin
from ..sampling import LogitsPipeline
from ..tree import parse_tree

__all__ = ["SpeculativeImagePipeline", "SpeculativeImagePipelineOutput", "DECODINGS"]

#: the decoding methods (the registry's, ``mmspec.drafting.available_methods()``)
DECODINGS = tuple(available_methods())
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class SpeculativeImagePipelineOutput(BaseOutput):
    """Output of ``SpeculativeImagePipeline``.

    Attributes:
        images: list of PIL images, or np.ndarray [B, H, W, 3] in [0, 1], or torch.Tensor [B, 3, H, W] in [0, 1].
        tokens: LongTensor [B, h * w], the image-code grid (row-major) before decoding to pixels.
        stats: ``GenerationStats`` (target forwards, step compression, accepted lengths, time).
        lossless: whether the acceptance criterion preserves the model's distribution.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    tokens: torch.Tensor
    stats: GenerationStats
    lossless: bool


def _as_list(x, name):
    if x is None:
        return None
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(v, str) for v in x):
        return list(x)
    raise ValueError(f"`{name}` must be a string or a list of strings, got {type(x).__name__}.")


class SpeculativeImagePipeline(TerminalProgressMixin, DiffusionPipeline):
    """Generate images with an autoregressive image-token model, decoded speculatively.

    Components:
        model: the token model (a transformers causal LM over a joint text+image vocabulary, or another
            family registered in ``mmspec.models.families``).
        vq: the image tokenizer/decoder (a diffusers ``VQModel`` or the family's own).
        tokenizer: the text tokenizer, for text-conditioned models.

    The family (prompt format, image-token layout, guidance branch) is chosen from the model.
    """

    model_cpu_offload_seq = "model->vq"
    _optional_components = ["tokenizer", "vq"]  # vq: Emu3 decodes with the model's own VQ; others may emit latents

    def __init__(self, model, vq, tokenizer=None):
        super().__init__()
        self.register_modules(model=model, vq=vq, tokenizer=tokenizer)

    @property
    def family(self):
        return family_for(self.model, tokenizer=self.tokenizer, vq=self.vq)

    @staticmethod
    def _check(method, decoding, *, window, init, guidance_scale, count, count_name, output_type, draft_model,
               acceptance, do_sample):
        """The shared input checks of the image and video pipelines; returns ``(method name, Decoding)``."""
        name, arg = resolve_method(method, decoding, default="jacobi")
        choice = check_decoding(name, window=window, draft_model=draft_model, acceptance=acceptance,
                                do_sample=do_sample, init=init, arg=arg)
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0, got {guidance_scale!r}.")
        check_int(count, count_name, 1)
        check_choice(output_type, "output_type", OUTPUT_TYPES)
        return name, choice

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        class_labels: Union[int, List[int], torch.Tensor, None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt: Union[str, List[str], None] = None,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., Any]] = None,
        decoding: Optional[str] = None,
        draft_model=None,
        acceptance="exact",
        window: int = 16,
        tree=None,
        init: str = "random",
        coupled: bool = False,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        kernels: str = "auto",
        method: Optional[str] = None,
        skip: Optional[List[int]] = None,
        cache: Optional[str] = None,
        compile: bool = False,
    ):
        """Generate images.

        Args:
            prompt: text prompt(s) for text-conditioned models.
            class_labels: class id(s) for class-conditioned models.
            prompt_embeds: text-encoder features [B, L, D] for models conditioned on them (LlamaGen t2i).
            negative_prompt: replaces the empty prompt of the unconditional branch.
            guidance_scale: classifier-free guidance ``u + s (c - u)`` on the logits; 1.0 disables it.
            num_images_per_prompt: images per prompt.
            generator: a ``torch.Generator`` or one per image; all randomness (sampling, drafts, acceptance)
                comes from it.
            do_sample, temperature, top_k, top_p: the sampling pipeline (``do_sample=False`` is greedy).
            output_type: "pil", "np" ([B, H, W, 3] in [0, 1]), "pt" ([B, 3, H, W] in [0, 1]) or "latent" (no
                pixel decoding: ``images`` is the code grid [B, h, w]).
            return_dict: return a ``SpeculativeImagePipelineOutput`` (else a tuple).
            callback_on_step_end: called as ``fn(pipe, step, num_tokens, {"tokens": LongTensor [B, n]})`` after
                every target forward, ``num_tokens`` being the fewest tokens any image has so far.
            decoding: alias of ``method``.
            draft_model: a smaller token model with the same vocabulary and layout.
            acceptance: "exact" (lossless), "lantern", "gsd", ... or a criterion object.
            window: tokens verified per forward, anchor included (SJD's published setting is 16).
            tree: ``(width, depth)`` to verify a token tree per forward (SJD-PAC alternatives for Jacobi, the draft's
                next-best candidates for ``"draft"``), None for a chain; ``window`` counts every node.
            init: Jacobi init for new window slots: "random" (SJD), "horizontal", "vertical", "sample_horizon".
            coupled: coupled redraw of continuing Jacobi slots (lossless, fewer draft changes).
            negative_prompt_embeds: unconditional features for ``prompt_embeds`` models.
            kernels: verification backend, ``"auto"`` (fused Triton kernels on CUDA), ``"triton"`` or ``"torch"``
                (see ``mmspec.kernels``).
            method: the decoding method (default "jacobi"), as in ``mmspec.generate``: "jacobi" (the model drafts
                for itself), "draft" (``draft_model`` proposes), "lookup" (n-gram match) or "ar"
                (``mmspec.drafting.available_methods()``); ``decoding=`` is accepted as its alias.
            skip: for ``method="self"``: decoder layers the model skips to draft for itself (guided like the
                target); None calibrates them on these prompts (``mmspec.drafting.layer_skip``).
            cache: the KV cache, as in ``mmspec.generate``: "dynamic" (default) or "static" (preallocated, per-row
                lengths; the default with ``compile``).
            compile: the target's and draft model's window forwards through ``torch.compile`` (CUDA graphs on
                CUDA); see ``mmspec.compile``.

        Returns:
            ``SpeculativeImagePipelineOutput`` with ``images``, ``tokens`` [B, h * w] and ``stats``.
        """
        method, choice = self._check(method, decoding, window=window, init=init, guidance_scale=guidance_scale,
                                     count=num_images_per_prompt, count_name="num_images_per_prompt",
                                     output_type=output_type, draft_model=draft_model, acceptance=acceptance,
                                     do_sample=do_sample)
        if skip is not None and method != "self":
            raise ValueError(f"`skip` is only used with method='self', not {method!r}.")
        if parse_tree(tree) is not None and method not in TREE_METHODS:
            raise ValueError(f"`tree` needs drafts to branch: use it with a method in {TREE_METHODS}, "
                             f"not {method!r}.")
        family = self.family
        prompts = _as_list(prompt, "prompt")
        negatives = _as_list(negative_prompt, "negative_prompt")
        if negatives is not None and prompts is not None and len(negatives) not in (1, len(prompts)):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts.")
        n = num_images_per_prompt
        if prompts is not None:
            prompts = [p for p in prompts for _ in range(n)]
            if negatives is not None:
                negatives = [m for m in (negatives * len(prompts) if len(negatives) == 1 else negatives) for _ in range(n)]
        if class_labels is not None:
            labels = torch.as_tensor(class_labels).reshape(-1).long()
            class_labels = labels.repeat_interleave(n)
        if prompt_embeds is not None:
            prompt_embeds = prompt_embeds.repeat_interleave(n, dim=0)
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(n, dim=0)
        inputs = family.prefill_inputs(prompts, negatives, class_labels, prompt_embeds, negative_prompt_embeds)
        state, stats, layout, criterion = self._decode(
            family, inputs, family_for, guidance_scale=guidance_scale, choice=choice, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, method=method,
            draft_model=draft_model, init=init, coupled=coupled,
            callback_on_step_end=callback_on_step_end, kernels=kernels, unit="images", skip=skip, tree=tree,
            cache=cache, compile=compile)
        T = state.prompt_length
        codes = layout.to_grid(state.tokens[:, T:T + layout.num_tokens])
        if output_type == "latent":
            images = codes.view(-1, layout.height, layout.width)
        else:
            images = ((family.decode_codes(codes) + 1) / 2).float().cpu()  # [B, 3, H, W] in [0, 1]
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).numpy()
        elif output_type == "pil":
            arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            images = [PIL.Image.fromarray(a) for a in arr]
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, codes, stats
        return SpeculativeImagePipelineOutput(images=images, tokens=codes, stats=stats, lossless=criterion.lossless)

    def _decode(self, family, inputs, draft_family_for, *, guidance_scale, choice, do_sample, temperature, top_k,
                top_p, generator, method, draft_model, init, coupled, callback_on_step_end, kernels="auto",
                unit="images", skip=None, tree=None, cache=None, compile=False):
        """The shared body of the image and video pipelines: guided target, criterion, proposer, the decode loop
        with a progress bar. ``inputs`` come from ``family.prefill_inputs``; ``choice`` from ``_check``;
        ``draft_family_for`` recognises the draft model's family. Returns ``(state, stats, layout, criterion)``."""
        device = input_device(self.model)  # honours accelerate offload / device maps
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        check_generator(generator, input_ids.shape[0], unit)

        layout = family.layout()
        options = cache_options(cache, compile, reserve=layout.num_tokens + 2 * choice.window + 2)
        target = GuidedLM(self.model, layout, guidance_scale, adapter=_with_options(family.adapter, options))
        criterion = choice.criterion
        criterion.prepare(codebook=family.codebook().to(device), image_token_offset=layout.image_token_offset,
                          vocab_size=target.vocab_size)
        drafter = None
        if draft_model is not None:
            draft_family = draft_family_for(draft_model, tokenizer=self.tokenizer, vq=self.vq)
            if draft_family.layout() != layout:
                raise ValueError(f"`draft_model` must share the target's {unit[:-1]} layout and vocabulary.")
            drafter = GuidedLM(draft_model, layout, guidance_scale,
                               adapter=_with_options(draft_family.adapter, options))
            if drafter.vocab_size != target.vocab_size:
                raise ValueError("`draft_model` must have the target's vocabulary size.")
        proposer, window = make_proposer(
            method, choice.window, draft=drafter, init=init, coupled=coupled, layout=layout,
            prefill_kwargs=dict(inputs), model=self.model, prompt=(input_ids, attention_mask), skip=skip,
            greedy=not do_sample, make_adapter=lambda m: GuidedLM(m, layout, guidance_scale, adapter=family.adapter),
            tree=tree)

        bar = self.progress_bar(total=layout.num_tokens)
        done = [0]

        def on_step(step, state):
            fewest = int(state.num_new.min())
            bar.update(fewest - done[0])
            done[0] = fewest
            if callback_on_step_end is not None:
                T = state.prompt_length
                callback_on_step_end(self, step, fewest, {"tokens": state.tokens[:, T:T + fewest]})

        pipeline = LogitsPipeline(do_sample, temperature, top_k, top_p)
        state = DecodeState(input_ids, attention_mask, layout.num_tokens, target.vocab_size, pipeline, generator,
                            device)
        state, stats = decode(target, proposer, state, window=window, criterion=criterion, model_kwargs=inputs,
                              callback=on_step, kernels=kernels)
        bar.close()
        return state, stats, layout, criterion


def _with_options(adapter, options: dict):
    """A family's adapter class with the cache options (``cache_options``) bound, or unchanged without them."""
    if not options:
        return adapter
    params = inspect.signature(adapter.__init__).parameters
    if "cache" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"cache='static' / compile=True are not supported by {adapter.__name__} models yet (their "
                         "forward builds its own attention mask); use cache='dynamic', compile=False.")
    return functools.partial(adapter, **options)
