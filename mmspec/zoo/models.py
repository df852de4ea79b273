"""Loading the zoo's token models as ready-to-use pipelines (everything from local files)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import hub

__all__ = ["T2I_TARGET", "T2I_DRAFT", "load_token_model", "load_image_pipeline"]

T2I_TARGET, T2I_DRAFT = "t2i_target", "t2i_draft"


def _folder(name: str) -> Path:
    path = hub.WEIGHTS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"bundled model {name!r} is missing at {path}; train it with "
            f"`python -m mmspec.zoo.recipes.t2i {name.split('_')[-1]} --out {path}`"
        )
    return path


def load_token_model(name: str = T2I_TARGET, device="cpu", dtype=torch.float32):
    """A bundled transformers causal LM (stored in fp16) and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _folder(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_image_pipeline(device="cpu", dtype=torch.float32, with_draft: bool = True):
    """The bundled text-to-image pipeline (target + VQ + tokenizer) and, optionally, its draft model.

    Returns ``(pipeline, draft_model or None)``.
    """
    from ..pipelines import SpeculativeImagePipeline

    model, tokenizer = load_token_model(T2I_TARGET, device, dtype)
    vq = hub.load_vq(device=device, dtype=dtype)
    pipe = SpeculativeImagePipeline(model=model, vq=vq, tokenizer=tokenizer)
    draft = load_token_model(T2I_DRAFT, device, dtype)[0] if with_draft else None
    return pipe, draft
