"""``SpeculativeVideoPipeline``: autoregressive video-token generation with speculative Jacobi / draft decoding.

A video token model generates ``frames`` code grids one after the other (``VideoLayout``). Decoding is the
same lossless loop as for images; the Jacobi init ``"temporal"`` drafts each new slot with the token at the
same place in the previous frame (static backgrounds repeat, so those drafts are often accepted), and a
window may span frame borders. Frames are decoded one by one with the image tokenizer; ``export_video``
writes GIF (Pillow) or MP4 (imageio + imageio-ffmpeg).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from ..decoding import GenerationStats
from ..models.families import JointVocabFamily
from ..models.image_tokens import VideoLayout
from .image import SpeculativeImagePipeline, _as_list

__all__ = ["SpeculativeVideoPipeline", "SpeculativeVideoPipelineOutput", "JointVocabVideoFamily",
           "register_video_family", "video_family_for", "export_video", "VIDEO_FAMILIES"]

VIDEO_FAMILIES: List[type] = []


def register_video_family(cls):
    """Class decorator adding a video family to the lookup of ``SpeculativeVideoPipeline`` (tried first)."""
    VIDEO_FAMILIES.insert(0, cls)
    return cls


@register_video_family
class JointVocabVideoFamily(JointVocabFamily):
    """A transformers causal LM over a joint text + code vocabulary, described by ``config.video_layout``.

    ``config.video_layout`` holds ``frames, height, width, image_token_offset, codebook_size`` and optionally
    ``eol_token_id, eof_token_id, eoi_token_id``; ``config.boi_token_id`` starts the span. Prompts as in
    ``JointVocabFamily`` (the empty prompt is the unconditional branch). The bundled zoo video model uses it.
    """

    name = "joint-vocab-video"

    @classmethod
    def matches(cls, model) -> bool:
        return isinstance(getattr(getattr(model, "config", None), "video_layout", None), dict)

    def layout(self) -> VideoLayout:
        spec = dict(self.model.config.video_layout)
        keys = ("frames", "height", "width", "image_token_offset", "codebook_size")
        missing = [k for k in keys if k not in spec]
        if missing:
            raise ValueError(f"config.video_layout lacks {missing}.")
        return VideoLayout(**{k: spec[k] for k in keys}, eol_token_id=spec.get("eol_token_id"),
                           eof_token_id=spec.get("eof_token_id"), eoi_token_id=spec.get("eoi_token_id"))

    @torch.no_grad()
    def decode_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, F, h * w] -> frames [B, F, 3, H, W] in [-1, 1], decoded frame by frame."""
        B, F, _ = codes.shape
        pixels = self.decode_codes(codes.reshape(B * F, -1))
        return pixels.view(B, F, *pixels.shape[1:])


def video_family_for(model, tokenizer=None, vq=None):
    """The first registered video family that recognises ``model``."""
    for cls in VIDEO_FAMILIES:
        if cls.matches(model):
            return cls(model, tokenizer=tokenizer, vq=vq)
    raise TypeError(f"no video family recognises {type(model).__name__}; known: {[c.name for c in VIDEO_FAMILIES]}. "
                    "A causal LM over a joint vocabulary needs `config.video_layout`.")


@dataclass
class SpeculativeVideoPipelineOutput(BaseOutput):
    """Output of ``SpeculativeVideoPipeline``.

    Attributes:
        frames: one list of PIL images per video, or np.ndarray [B, F, H, W, 3] in [0, 1], or torch.Tensor
            [B, F, 3, H, W] in [0, 1], or (``output_type="latent"``) the code grids LongTensor [B, F, h, w].
        tokens: LongTensor [B, F, h * w], each frame's code grid (row-major).
        stats: ``GenerationStats`` (target forwards, step compression, accepted lengths, time).
        lossless: whether the acceptance criterion preserves the model's distribution.
    """

    frames: Union[List[List[PIL.Image.Image]], np.ndarray, torch.Tensor]
    tokens: torch.Tensor
    stats: GenerationStats
    lossless: bool


class SpeculativeVideoPipeline(SpeculativeImagePipeline):
    """Generate short videos with an autoregressive video-token model, decoded speculatively.

    Components (as ``SpeculativeImagePipeline``): ``model`` (token model with a video layout), ``vq`` (the
    per-frame image tokenizer/decoder), ``tokenizer`` (text tokenizer for caption-conditioned models).
    """

    @property
    def family(self):
        return video_family_for(self.model, tokenizer=self.tokenizer, vq=self.vq)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        guidance_scale: float = 3.0,
        num_videos_per_prompt: int = 1,
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
        init: str = "temporal",
        coupled: bool = False,
        kernels: str = "auto",
        method: Optional[str] = None,
        cache: Optional[str] = None,
        compile: bool = False,
    ):
        """Generate videos.

        Args:
            prompt: caption(s).
            negative_prompt: replaces the empty prompt of the unconditional branch.
            guidance_scale: classifier-free guidance ``u + s (c - u)`` on the logits; 1.0 disables it.
            num_videos_per_prompt: videos per prompt.
            generator: a ``torch.Generator`` or one per video; all randomness comes from it.
            do_sample, temperature, top_k, top_p: the sampling pipeline (``do_sample=False`` is greedy).
            output_type: "pil" (a list of PIL frames per video), "np" ([B, F, H, W, 3] in [0, 1]), "pt"
                ([B, F, 3, H, W] in [0, 1]) or "latent" (no pixel decoding: the code grids [B, F, h, w]).
            return_dict: return a ``SpeculativeVideoPipelineOutput`` (else a tuple ``(frames, tokens, stats)``).
            callback_on_step_end: ``fn(pipe, step, num_tokens, {"tokens": LongTensor [B, n]})`` after every
                target forward, ``num_tokens`` being the fewest new tokens any video has so far.
            decoding: alias of ``method``.
            draft_model: a smaller video token model with the same vocabulary and layout.
            acceptance: "exact" (lossless), "lantern", "gsd", ... or a criterion object.
            window: tokens verified per forward, anchor included; it may span frame borders.
            init: Jacobi init for new window slots: "temporal" (same place, previous frame), "vertical",
                "horizontal", "random" (SJD), "sample_horizon".
            coupled: coupled redraw of continuing Jacobi slots (lossless, fewer draft changes).
            kernels: verification backend, ``"auto"`` (fused Triton kernels on CUDA), ``"triton"`` or ``"torch"``.
            method: the decoding method (default "jacobi"), as in ``mmspec.generate``: "jacobi" (the model drafts
                for itself), "draft" (``draft_model`` proposes), "lookup" or "ar"; ``decoding=`` is its alias.
            cache, compile: the KV cache ("dynamic" or "static") and ``torch.compile`` of the window forwards, as in
                ``mmspec.generate``.

        Returns:
            ``SpeculativeVideoPipelineOutput`` with ``frames``, ``tokens`` [B, F, h * w] and ``stats``.
        """
        method, choice = self._check(method, decoding, window=window, init=init, guidance_scale=guidance_scale,
                                     count=num_videos_per_prompt, count_name="num_videos_per_prompt",
                                     output_type=output_type, draft_model=draft_model, acceptance=acceptance,
                                     do_sample=do_sample)
        family = self.family
        prompts = _as_list(prompt, "prompt")
        negatives = _as_list(negative_prompt, "negative_prompt")
        if prompts is None:
            raise ValueError("pass `prompt` (a caption or a list of captions).")
        if negatives is not None and len(negatives) not in (1, len(prompts)):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts.")
        n = num_videos_per_prompt
        prompts = [p for p in prompts for _ in range(n)]
        if negatives is not None:
            negatives = [m for m in (negatives * len(prompts) if len(negatives) == 1 else negatives) for _ in range(n)]
        state, stats, layout, criterion = self._decode(
            family, family.prefill_inputs(prompts, negatives), video_family_for, guidance_scale=guidance_scale,
            choice=choice, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator, method=method, draft_model=draft_model, init=init, coupled=coupled,
            callback_on_step_end=callback_on_step_end, kernels=kernels, unit="videos", tree=tree, cache=cache,
            compile=compile)
        B = state.batch_size
        T = state.prompt_length
        codes = layout.to_frames(state.tokens[:, T:T + layout.num_tokens])  # [B, F, h * w]
        if output_type == "latent":
            frames = codes.view(B, layout.frames, layout.height, layout.width)
        else:
            frames = ((family.decode_frames(codes) + 1) / 2).float().cpu()  # [B, F, 3, H, W] in [0, 1]
        if output_type == "np":
            frames = frames.permute(0, 1, 3, 4, 2).numpy()
        elif output_type == "pil":
            arr = (frames.permute(0, 1, 3, 4, 2).numpy() * 255).round().astype(np.uint8)
            frames = [[PIL.Image.fromarray(f) for f in video] for video in arr]
        self.maybe_free_model_hooks()
        if not return_dict:
            return frames, codes, stats
        return SpeculativeVideoPipelineOutput(frames=frames, tokens=codes, stats=stats, lossless=criterion.lossless)


def _frames_uint8(frames) -> np.ndarray:
    """One video as uint8 [F, H, W, 3] from PIL frames, np [F, H, W, 3] (uint8, or float in [0, 1]) or torch
    [F, 3, H, W] in [0, 1]."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"a torch video must be [F, 3, H, W] in [0, 1], got {tuple(frames.shape)}.")
        frames = frames.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    elif isinstance(frames, (list, tuple)) and frames and all(isinstance(f, PIL.Image.Image) for f in frames):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError("`frames` must be a non-empty list of PIL images, np.ndarray [F, H, W, 3] or torch.Tensor "
                         f"[F, 3, H, W]; got {getattr(frames, 'shape', type(frames).__name__)}.")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames.astype(np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)
    return frames


def export_video(frames: Union[Sequence[PIL.Image.Image], np.ndarray, torch.Tensor], path: Union[str, os.PathLike],
                 fps: float = 4.0, scale: int = 1) -> str:
    """Write one video to ``path``: ``.gif`` (Pillow, looping) or ``.mp4`` (H.264 via imageio-ffmpeg).

    Args:
        frames: PIL frames, np.ndarray [F, H, W, 3] (uint8 or in [0, 1]) or torch.Tensor [F, 3, H, W] in [0, 1].
        path: output file; its extension picks the format.
        fps: frames per second.
        scale: integer nearest-neighbour upscaling (token-model frames are small, e.g. 64x64 pixels).

    Returns the path. Note: Pillow merges identical consecutive GIF frames into one longer frame (the total
    duration is kept); MP4 keeps every frame.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".gif", ".mp4"):
        raise ValueError(f"`path` must end in .gif or .mp4, got {path!r}.")
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or fps <= 0:
        raise ValueError(f"`fps` must be a number > 0, got {fps!r}.")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"`scale` must be an int >= 1, got {scale!r}.")
    arr = _frames_uint8(frames)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    if ext == ".gif":
        images = [PIL.Image.fromarray(f) for f in arr]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0,
                       optimize=False)
        return path
    import imageio.v2 as imageio

    if arr.shape[1] % 2 or arr.shape[2] % 2:
        raise ValueError(f"H.264 needs even frame sides, got {arr.shape[1]}x{arr.shape[2]}; use a GIF or `scale=2`.")
    with imageio.get_writer(path, format="FFMPEG", mode="I", fps=fps, codec="libx264", macro_block_size=1,
                            pixelformat="yuv420p", output_params=["-crf", "18"]) as writer:
        for f in arr:
            writer.append_data(f)
    return path
