"""``SpeculativeImagePipeline``: autoregressive image generation with speculative Jacobi / draft decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .. import acceptance as _acceptance
from ..decoding import GenerationStats, decode
from ..drafting import DraftModelProposer, JacobiProposer, NoDraft
from ..drafting.jacobi import INIT_STRATEGIES
from ..models.causal_lm import input_device
from ..models.families import family_for
from ..models.image_tokens import GuidedLM
from ..sampling import LogitsPipeline

__all__ = ["SpeculativeImagePipeline", "SpeculativeImagePipelineOutput", "DECODINGS"]

DECODINGS = ("jacobi", "draft", "ar")


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


class SpeculativeImagePipeline(DiffusionPipeline):
    """Generate images with an autoregressive image-token model, decoded speculatively.

    Components:
        model: the token model (a transformers causal LM over a joint text+image vocabulary, or another
            family registered in ``mmspec.models.families``).
        vq: the image tokenizer/decoder (a diffusers ``VQModel`` or the family's own).
        tokenizer: the text tokenizer, for text-conditioned models.

    The family (prompt format, image-token layout, guidance branch) is chosen from the model.
    """

    model_cpu_offload_seq = "model->vq"
    _optional_components = ["tokenizer"]

    def __init__(self, model, vq, tokenizer=None):
        super().__init__()
        self.register_modules(model=model, vq=vq, tokenizer=tokenizer)

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' ``save_pretrained``, plus components diffusers does not know (e.g. the LlamaGen GPT and
        VQ) saved with their own ``save_pretrained`` and recorded in ``model_index.json`` by module path."""
        import json
        import os

        super().save_pretrained(save_directory, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as fh:
            index = json.load(fh)
        for name, component in self.components.items():
            if component is None or index.get(name, [None])[0] is not None:
                continue
            if not hasattr(component, "save_pretrained"):
                raise ValueError(f"component `{name}` ({type(component).__name__}) has no `save_pretrained`.")
            component.save_pretrained(os.path.join(save_directory, name))
            index[name] = [type(component).__module__, type(component).__name__]
        with open(index_path, "w") as fh:
            json.dump(index, fh, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained``. A folder holding components saved by module path (see
        ``save_pretrained``) is loaded component by component with each class's own ``from_pretrained``."""
        import importlib
        import json
        import os

        path = str(pretrained_model_name_or_path)
        index_file = os.path.join(path, "model_index.json")
        if not os.path.isfile(index_file):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        with open(index_file) as fh:
            index = json.load(fh)
        specs = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
        if not any(v[0] and v[0].startswith("mmspec.") for v in specs.values()):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        dtype = kwargs.pop("torch_dtype", None)
        components = {}
        for name, (library, class_name) in specs.items():
            if name in kwargs:
                components[name] = kwargs.pop(name)
            elif library is None:
                components[name] = None
            else:
                klass = getattr(importlib.import_module(library), class_name)
                extra = {"torch_dtype": dtype} if dtype is not None and library != "transformers" else {}
                if dtype is not None and library == "transformers" and hasattr(klass, "config_class"):
                    extra = {"dtype": dtype}
                components[name] = klass.from_pretrained(os.path.join(path, name), **extra)
        if kwargs:
            raise ValueError(f"unexpected arguments for a pipeline with custom components: {sorted(kwargs)}")
        return cls(**components)

    @property
    def family(self):
        return family_for(self.model, tokenizer=self.tokenizer, vq=self.vq)

    def _check(self, decoding, window, init, guidance_scale, num_images_per_prompt, output_type, draft_model):
        if decoding not in DECODINGS:
            raise ValueError(f"unknown `decoding` {decoding!r}; choose one of {list(DECODINGS)}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"`window` must be an int >= 1, got {window!r}.")
        if init not in INIT_STRATEGIES:
            raise ValueError(f"unknown Jacobi `init` {init!r}; available: {sorted(INIT_STRATEGIES)}.")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0, got {guidance_scale!r}.")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an int >= 1, got {num_images_per_prompt!r}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        if decoding == "draft" and draft_model is None:
            raise ValueError("`decoding='draft'` needs a `draft_model` with the same token space.")
        if decoding != "draft" and draft_model is not None:
            raise ValueError(f"`draft_model` is only used with decoding='draft', not {decoding!r}.")

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
        decoding: str = "jacobi",
        draft_model=None,
        acceptance="exact",
        window: int = 16,
        tree=None,
        init: str = "random",
        coupled: bool = False,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        kernels: str = "auto",
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
            decoding: "jacobi" (the model drafts for itself), "draft" (``draft_model`` proposes) or "ar".
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

        Returns:
            ``SpeculativeImagePipelineOutput`` with ``images``, ``tokens`` [B, h * w] and ``stats``.
        """
        self._check(decoding, window, init, guidance_scale, num_images_per_prompt, output_type, draft_model)
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
            family, inputs, family_for, guidance_scale=guidance_scale, acceptance=acceptance, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, decoding=decoding,
            draft_model=draft_model, window=window, init=init, coupled=coupled,
            callback_on_step_end=callback_on_step_end, kernels=kernels, unit="images", tree=tree)
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

    def _decode(self, family, inputs, draft_family_for, *, guidance_scale, acceptance, do_sample, temperature, top_k,
                top_p, generator, decoding, draft_model, window, init, coupled, callback_on_step_end, kernels="auto",
                unit="images", tree=None):
        """The shared body of the image and video pipelines: guided target, criterion, proposer, the decode loop
        with a progress bar. ``inputs`` come from ``family.prefill_inputs``; ``draft_family_for`` recognises the
        draft model's family. Returns ``(state, stats, layout, criterion)``."""
        device = input_device(self.model)  # honours accelerate offload / device maps
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        input_ids, attention_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        B = input_ids.shape[0]
        if isinstance(generator, list) and len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for {B} {unit}; pass one, or one per {unit[:-1]}.")

        layout = family.layout()
        target = GuidedLM(self.model, layout, guidance_scale, adapter=family.adapter)
        criterion = _acceptance.get(acceptance)
        if not do_sample and criterion.requires_sampling:
            raise ValueError(f"acceptance={criterion.name!r} needs sampling; pass do_sample=True.")
        criterion.prepare(codebook=family.codebook().to(device), image_token_offset=layout.image_token_offset,
                          vocab_size=target.vocab_size)
        if decoding == "jacobi":
            proposer = JacobiProposer(window, init=init, coupled=coupled, layout=layout, tree=tree)
        elif decoding == "draft":
            draft_family = draft_family_for(draft_model, tokenizer=self.tokenizer, vq=self.vq)
            if draft_family.layout() != layout:
                raise ValueError(f"`draft_model` must share the target's {unit[:-1]} layout and vocabulary.")
            drafter = GuidedLM(draft_model, layout, guidance_scale, adapter=draft_family.adapter)
            if drafter.vocab_size != target.vocab_size:
                raise ValueError("`draft_model` must have the target's vocabulary size.")
            proposer = DraftModelProposer(drafter, window - 1, prefill_kwargs=dict(inputs), tree=tree)
        else:
            proposer, window = NoDraft(), 1

        bar = self.progress_bar(total=layout.num_tokens)
        done = [0]

        def on_step(step, state):
            fewest = int(state.num_new.min())
            bar.update(fewest - done[0])
            done[0] = fewest
            if callback_on_step_end is not None:
                T = state.prompt_length
                callback_on_step_end(self, step, fewest, {"tokens": state.tokens[:, T:T + fewest]})

        state, stats = decode(
            target, proposer, input_ids, attention_mask,
            max_new_tokens=layout.num_tokens, window=window,
            pipeline=LogitsPipeline(do_sample, temperature, top_k, top_p), criterion=criterion,
            generator=generator, eos_token_ids=None, model_kwargs=inputs, callback=on_step, kernels=kernels,
        )
        bar.close()
        return state, stats, layout, criterion
