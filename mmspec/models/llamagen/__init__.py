"""LlamaGen (Sun et al., 2024) image generator and VQ image tokenizer, checkpoint compatible.

An independent implementation of the two LlamaGen model families:

* :class:`LlamaGenGPT` - the Llama-style autoregressive transformer over VQ codes (LlamaGen
  ``autoregressive/models/gpt.py``), class-conditional (``model_type="c2i"``) or text-conditional
  (``model_type="t2i"``, T5 caption features), driven like a transformers causal LM.
* :class:`LlamaGenVQ` - the convolutional VQ tokenizer (LlamaGen ``tokenizer/tokenizer_image/vq_model.py``).

Parameter names equal LlamaGen's ``state_dict`` keys, so LlamaGen's public ``.pt`` checkpoints load with
``strict=True`` (:func:`load_gpt` / :func:`load_vq`), and the numerics follow LlamaGen's own code. Both models are
diffusers ``ModelMixin`` s, so ``SpeculativeImagePipeline.save_pretrained`` / ``from_pretrained`` handle them like
any diffusers component.

Files, one responsibility each:

========================  ===================================================================================
``config.py``             presets, :class:`LlamaGenConfig`, :class:`LlamaGenVQConfig`, the diffusers bridge
``layers.py``             rotary table, RMSNorm, condition embedders, attention, SwiGLU, transformer block
``gpt.py``                :class:`LlamaGenGPT` (forward with a ``DynamicCache``, masks, position ids)
``sampler.py``            :func:`llamagen_generate`, LlamaGen's one-token-per-step sampler (the test reference)
``vq.py``                 :class:`LlamaGenVQ`: encoder, decoder, quantiser
``checkpoint.py``         :func:`load_gpt`, :func:`load_vq`, :func:`save_gpt`, :func:`save_vq`, ``.pt`` layouts
========================  ===================================================================================

The image-pipeline family (prefix, guidance branch, layout) is :mod:`mmspec.models.llamagen_family`.
"""

from diffusers import ModelMixin  # noqa: F401  (pipelines saved by mmspec 0.1 name this module as the library)

from .checkpoint import infer_gpt_args, load_gpt, load_vq, read_state_dict, save_gpt, save_vq
from .config import (
    CAPTION_UNCOND_TOKENS,
    GPT_PRESETS,
    LLAMAGEN_CHECKPOINTS,
    VQ_PRESETS,
    LlamaGenConfig,
    LlamaGenVQConfig,
    ffn_hidden_dim,
)
from .gpt import LlamaGenGPT, build_gpt
from .layers import apply_rotary, precompute_freqs_cis_2d
from .sampler import llamagen_generate, llamagen_sample, top_k_top_p_filtering
from .vq import LlamaGenVQ, build_vq

__all__ = [
    "GPT_PRESETS",
    "VQ_PRESETS",
    "LLAMAGEN_CHECKPOINTS",
    "CAPTION_UNCOND_TOKENS",
    "LlamaGenConfig",
    "LlamaGenVQConfig",
    "LlamaGenGPT",
    "LlamaGenVQ",
    "build_gpt",
    "build_vq",
    "ffn_hidden_dim",
    "precompute_freqs_cis_2d",
    "apply_rotary",
    "llamagen_generate",
    "llamagen_sample",
    "top_k_top_p_filtering",
    "read_state_dict",
    "infer_gpt_args",
    "load_gpt",
    "load_vq",
    "save_gpt",
    "save_vq",
]
