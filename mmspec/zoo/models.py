"""Loading the zoo's token models as ready-to-use pipelines (everything from local files)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..progress import quiet_loading
from . import hub

__all__ = [
    "T2I_TARGET", "T2I_DRAFT", "TEXT_TARGET", "TEXT_DRAFT", "C2I", "load_token_model", "load_image_pipeline",
    "load_text_pair", "text_prompts", "load_c2i_pipeline", "load_caption_pipeline", "load_video_pipeline",
]

T2I_TARGET, T2I_DRAFT = "t2i_target", "t2i_draft"
TEXT_TARGET, TEXT_DRAFT = "text_target", "text_draft"
C2I = "c2i"


def _folder(name: str) -> Path:
    path = hub.WEIGHTS_DIR / name
    if not ((path / "config.json").is_file() or (path / "model.safetensors").is_file()):
        raise FileNotFoundError(
            f"bundled model {name!r} is missing at {path}; train it with "
            f"`python -m mmspec.zoo.train {name} --out {path}`"
        )
    return path


@quiet_loading
def load_token_model(name: str = T2I_TARGET, device="cpu", dtype=torch.float32):
    """A bundled transformers causal LM (stored in fp16) and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _folder(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_image_pipeline(device="cpu", dtype=torch.float32, with_draft: bool = True):
    """The bundled text-to-image pipeline (target + the zoo tokenizer its config names + word tokenizer) and,
    optionally, its draft model (over the same codes).

    Returns ``(pipeline, draft_model or None)``.
    """
    from ..pipelines import SpeculativeImagePipeline

    model, tokenizer = load_token_model(T2I_TARGET, device, dtype)
    vq = hub.load_vq_for(model.config, device=device, dtype=dtype)
    pipe = SpeculativeImagePipeline(model=model, vq=vq, tokenizer=tokenizer)
    draft = load_token_model(T2I_DRAFT, device, dtype)[0] if with_draft else None
    return pipe, draft


def load_text_pair(device="cpu", dtype=torch.float32):
    """The bundled text LM target, its draft and their shared tokenizer: ``(target, draft, tokenizer)``."""
    target, tokenizer = load_token_model(TEXT_TARGET, device, dtype)
    draft, _ = load_token_model(TEXT_DRAFT, device, dtype)
    return target, draft, tokenizer


def text_prompts(tokenizer, batch_size: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    """``batch_size`` held-out code prompts of exactly ``prompt_len`` tokens each: LongTensor [B, prompt_len].

    Windows of the validation split of the standard-library corpus (text the zoo text models never trained
    on), each starting at a line start, chosen by ``seed``.
    """
    import random

    from .data import text_corpus_splits

    _, val = text_corpus_splits(6_000_000)
    starts = [i + 1 for i, c in enumerate(val[:-4000]) if c == "\n" and val[i + 1 : i + 2].strip()]
    rng = random.Random(seed)
    rows = []
    while len(rows) < batch_size:
        s = rng.choice(starts)
        ids = tokenizer(val[s : s + 8 * prompt_len], add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_len:
            rows.append(ids[:prompt_len])
    return torch.tensor(rows, dtype=torch.long)


@quiet_loading
def load_c2i_pipeline(device="cpu", dtype=torch.float32):
    """The bundled class-conditional LlamaGen model on natural crops with the zoo VQ, as a pipeline.

    Call it with ``class_labels`` (indices into :data:`mmspec.zoo.data.NATURAL_CLASSES`).
    """
    from ..models.llamagen import LlamaGenGPT
    from ..pipelines import SpeculativeImagePipeline

    model = LlamaGenGPT.from_pretrained(_folder(C2I), torch_dtype=dtype).to(device).eval()
    vq = hub.load_vq_for(_folder(C2I), device=device, dtype=dtype)  # the tokenizer c2i was trained on
    return SpeculativeImagePipeline(model=model, vq=vq)


@quiet_loading
def load_caption_pipeline(device="cpu", dtype=torch.float32, with_draft: bool = True, decoding: str = "lookup"):
    """The bundled captioner (a tiny LLaVA trained on the zoo scenes) as a ``CaptionPipeline``; see
    :func:`mmspec.zoo.recipes.captioner.load_caption_pipeline`."""
    from .recipes.captioner import load_caption_pipeline as load

    return load(device=device, dtype=dtype, with_draft=with_draft, decoding=decoding)


@quiet_loading
def load_video_pipeline(device="cpu", dtype=torch.float32):
    """The bundled caption-to-video token model (4 frames of 16x16 codes) as a ``SpeculativeVideoPipeline``."""
    from .recipes.video import load_video_pipeline as load

    return load(device=device, dtype=dtype)
