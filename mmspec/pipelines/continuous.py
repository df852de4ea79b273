"""``SpeculativeContinuousPipeline``: class-conditional generation with a MAR-style continuous-token model,
decoded autoregressively or with draft-verify speculative decoding (lossless, ``acceptance="continuous"``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..checks import check_choice, check_decoding, check_generator, check_int, resolve_method
from ..continuous import decode_continuous
from ..decoding import GenerationStats
from ..drafting import available_methods
from ..models.mar import ContinuousARModel, DDPMTrajectory, MARRunner, tokens_to_latents
from ..progress import TerminalProgressMixin, quiet_loading

__all__ = ["SpeculativeContinuousPipeline", "SpeculativeContinuousPipelineOutput", "DECODINGS"]

#: the decoding methods for continuous tokens (``mmspec.drafting.available_methods("continuous")``)
DECODINGS = tuple(available_methods("continuous"))


@dataclass
class SpeculativeContinuousPipelineOutput(BaseOutput):
    """Output of ``SpeculativeContinuousPipeline``.

    Attributes:
        images: list of PIL images, np.ndarray [B, H, W, 3] in [0, 1], torch.Tensor [B, 3, H, W] in [0, 1], or the
            latents [B, C, h, w] for ``output_type="latent"``.
        tokens: [B, h * w, C] the generated continuous tokens (scaled latents, row-major).
        stats: ``GenerationStats`` (target forwards, step compression, accepted lengths, time).
        lossless: whether the acceptance criterion preserves the model's distribution.
        acceptance_rate: accepted drafts / proposed drafts (None without drafts).
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    tokens: torch.Tensor
    stats: GenerationStats
    lossless: bool
    acceptance_rate: Optional[float] = None


class SpeculativeContinuousPipeline(TerminalProgressMixin, DiffusionPipeline):
    """Generate images with a continuous autoregressive model (:class:`~mmspec.models.mar.ContinuousARModel`).

    Components:
        model: the target model (causal transformer + diffusion head).
        vae: a diffusers ``AutoencoderKL`` whose (scaled) latents are the tokens.
        class_names: optional names of the classes, so ``prompt`` can name them (e.g. the zoo's colours).
    """

    model_cpu_offload_seq = "model->vae"

    def __init__(self, model: ContinuousARModel, vae, class_names: Optional[Sequence[str]] = None):
        super().__init__()
        self.register_modules(model=model, vae=vae)
        self.register_to_config(class_names=list(class_names) if class_names is not None else None)

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' ``save_pretrained``; the model is recorded by its mmspec module path."""
        import json
        import os

        super().save_pretrained(save_directory, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as fh:
            index = json.load(fh)
        index["model"] = [type(self.model).__module__, type(self.model).__name__]
        with open(index_path, "w") as fh:
            json.dump(index, fh, indent=2, sort_keys=True)

    @classmethod
    @quiet_loading
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a folder written by ``save_pretrained`` (each component with its own ``from_pretrained``)."""
        import importlib
        import json
        import os

        path = str(pretrained_model_name_or_path)
        with open(os.path.join(path, "model_index.json")) as fh:
            index = json.load(fh)
        dtype = kwargs.pop("torch_dtype", None)
        components = {}
        for name in ("model", "vae"):
            if name in kwargs:
                components[name] = kwargs.pop(name)
                continue
            library, class_name = index[name]
            klass = getattr(importlib.import_module(library), class_name)
            extra = {"torch_dtype": dtype} if dtype is not None else {}
            components[name] = klass.from_pretrained(os.path.join(path, name), **extra)
        class_names = kwargs.pop("class_names", index.get("class_names"))
        if kwargs:
            raise ValueError(f"unexpected arguments: {sorted(kwargs)}")
        return cls(class_names=class_names, **components)

    @classmethod
    @quiet_loading
    def from_zoo(cls, device="cpu", dtype=torch.float32, with_draft: bool = True):
        """The bundled continuous models (``mmspec/zoo/weights/mar_*``, see ``mmspec/zoo/cards/mar.md``):
        returns ``(pipeline, draft_model or None)``; classes are the scene's background colour (``COLOURS``)."""
        from diffusers import AutoencoderKL

        from ..zoo.data import COLOURS
        from ..zoo.hub import WEIGHTS_DIR

        def folder(name):
            path = WEIGHTS_DIR / name
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"bundled model {name!r} is missing at {path}; train it with "
                                        f"`python -m mmspec.zoo.recipes.mar {name[4:]} --out {path}`")
            return str(path)

        model = ContinuousARModel.from_pretrained(folder("mar_target"), torch_dtype=dtype).to(device).eval()
        vae = AutoencoderKL.from_pretrained(folder("mar_vae"), torch_dtype=dtype).to(device).eval()
        draft = None
        if with_draft:
            draft = ContinuousARModel.from_pretrained(folder("mar_draft"), torch_dtype=dtype).to(device).eval()
        return cls(model=model, vae=vae, class_names=COLOURS), draft

    def _labels(self, prompt, class_labels) -> torch.Tensor:
        if (prompt is None) == (class_labels is None):
            raise ValueError("pass exactly one of `prompt` (class names) and `class_labels`.")
        n_classes = self.model.config.num_classes
        if class_labels is not None:
            labels = torch.as_tensor(class_labels).reshape(-1).long()
            if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= n_classes:
                raise ValueError(f"`class_labels` must be class ids in [0, {n_classes}), got {labels.tolist()}.")
            return labels
        names = self.config.class_names
        if not names:
            raise ValueError("this pipeline has no `class_names`; pass `class_labels` instead of `prompt`.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        labels = []
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"`prompt` must be a string or a list of strings, got {type(p).__name__}.")
            hits = [names.index(w) for w in p.lower().split() if w in names]
            if not hits:
                raise ValueError(f"prompt {p!r} names none of the classes {names}.")
            labels.append(hits[0])
        return torch.tensor(labels)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        class_labels: Union[int, List[int], torch.Tensor, None] = None,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        temperature: float = 1.0,
        num_inference_steps: int = 25,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[..., Any]] = None,
        decoding: Optional[str] = None,
        draft_model: Optional[ContinuousARModel] = None,
        acceptance="continuous",
        window: int = 4,
        align: bool = True,
        draft_num_inference_steps: Optional[int] = None,
        method: Optional[str] = None,
    ):
        """Generate images.

        Args:
            prompt: class name(s) (a prompt containing one of ``class_names``; the first named class is used).
            class_labels: class id(s), instead of ``prompt``.
            guidance_scale: classifier-free guidance on the denoiser, ``eps_u + s (eps_c - eps_u)``; 1 disables it.
            num_images_per_prompt: images per prompt / label.
            generator: a ``torch.Generator`` or one per image; every random draw comes from it.
            temperature: MAR's ``tau``, scaling the noise of every denoising step (target and draft alike).
            num_inference_steps: DDPM inference steps of the target's head (``num_inference_steps - 1`` head
                evaluations per token; see ``DDPMTrajectory``).
            output_type: "pil", "np" ([B, H, W, 3] in [0, 1]), "pt" ([B, 3, H, W] in [0, 1]) or "latent".
            return_dict: return a ``SpeculativeContinuousPipelineOutput`` (else a tuple).
            callback_on_step_end: ``fn(pipe, step, num_tokens, {"tokens": [B, N, C]})`` after every target forward,
                ``num_tokens`` being the fewest tokens any image has so far.
            decoding: alias of ``method``.
            draft_model: a smaller ``ContinuousARModel`` with the same token shape.
            acceptance: "continuous" (exact) or a ``ContinuousCriterion``.
            window: tokens per target forward (1 anchor + up to ``window - 1`` drafts).
            align: share trajectory noise between draft and target (raises acceptance; exact either way).
            draft_num_inference_steps: the draft head's steps (default: the target's; a different count changes
                the last-step scale, and the residual then uses bounded rejection sampling).
            method: the decoding method (default "draft"): "draft" (``draft_model`` proposes) or "ar"
                (``mmspec.drafting.available_methods("continuous")``); ``decoding=`` is accepted as its alias.

        Returns:
            ``SpeculativeContinuousPipelineOutput`` with ``images``, ``tokens`` and ``stats``.
        """
        name, arg = resolve_method(method, decoding, default="draft")
        choice = check_decoding(name, window=window, draft_model=draft_model, acceptance=acceptance, kind="continuous",
                                arg=arg)
        check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        check_choice(output_type, "output_type", ("pil", "np", "pt", "latent"))
        if draft_model is not None and not isinstance(draft_model, ContinuousARModel):
            raise TypeError(f"`draft_model` must be a ContinuousARModel, got {type(draft_model).__name__}.")
        criterion = choice.criterion
        labels = self._labels(prompt, class_labels).repeat_interleave(num_images_per_prompt)
        B = labels.shape[0]
        check_generator(generator, B, "images")

        target = MARRunner(self.model, guidance_scale)
        trajectory = DDPMTrajectory(self.model.scheduler(), num_inference_steps, temperature)
        draft = draft_traj = None
        if draft_model is not None:
            draft = MARRunner(draft_model, guidance_scale)
            draft_traj = DDPMTrajectory(draft_model.scheduler(), draft_num_inference_steps or num_inference_steps,
                                        temperature)

        N = self.model.num_tokens
        bar = self.progress_bar(total=N)
        done = [0]

        def on_step(step, state):
            fewest = int(state.num_new.min())
            bar.update(fewest - done[0])
            done[0] = fewest
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, fewest, {"tokens": state.tokens.float()})

        tokens, stats, info = decode_continuous(
            target, labels, trajectory=trajectory, draft=draft, draft_trajectory=draft_traj,
            window=choice.window, criterion=criterion, generator=generator, align=align,
            callback=on_step,
        )
        bar.close()
        latents = tokens_to_latents(tokens, self.model.config.grid_size)
        if output_type == "latent":
            images = latents
        else:
            vae_param = next(self.vae.parameters())
            z = (latents / self.vae.config.scaling_factor).to(vae_param.device, vae_param.dtype)
            images = ((self.vae.decode(z).sample.clamp(-1, 1) + 1) / 2).float().cpu()
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).numpy()
        elif output_type == "pil":
            arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            images = [PIL.Image.fromarray(a) for a in arr]
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, tokens, stats
        return SpeculativeContinuousPipelineOutput(images=images, tokens=tokens, stats=stats,
                                                   lossless=criterion.lossless,
                                                   acceptance_rate=info["acceptance_rate"])
