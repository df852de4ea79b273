"""LlamaGen hyper-parameters: named presets, the GPT and VQ configs, and the bridge to diffusers' config I/O.

The configs are dataclasses (field names and defaults are LlamaGen's ``ModelArgs``) with validation and the
values derived from them (``head_dim``, ``grid_size``, ...). :class:`DataclassConfigModel` lets a diffusers
``ModelMixin`` keep such a dataclass as ``model.config`` while diffusers writes and reads ``config.json``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin

__all__ = [
    "CAPTION_UNCOND_TOKENS", "GPT_PRESETS", "VQ_PRESETS", "LLAMAGEN_CHECKPOINTS", "LlamaGenConfig",
    "LlamaGenVQConfig", "DataclassConfigModel", "ffn_hidden_dim",
]

# LlamaGen's CaptionEmbedder keeps a learned unconditional caption of this many tokens (hard-coded there).
CAPTION_UNCOND_TOKENS = 120

# ------------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------------

#: LlamaGen's named GPT sizes (``GPT_models`` in ``gpt.py``), as ``LlamaGenConfig`` keyword arguments.
GPT_PRESETS: dict[str, dict[str, int]] = {
    # class-conditional sizes
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),  # 3.9B
    # text-conditional sizes (GPT-3B is also LlamaGen's largest class-conditional model)
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),  # 1.2B
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),  # 3.1B
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),  # 6.6B
}

#: LlamaGen's named VQ tokenizers (``VQ_models`` in ``vq_model.py``), as ``LlamaGenVQConfig`` kwargs.
VQ_PRESETS: dict[str, dict[str, Any]] = {
    "VQ-16": dict(encoder_ch_mult=[1, 1, 2, 2, 4], decoder_ch_mult=[1, 1, 2, 2, 4]),
    "VQ-8": dict(encoder_ch_mult=[1, 2, 2, 4], decoder_ch_mult=[1, 2, 2, 4]),
}

#: The public checkpoints listed in LlamaGen's README and the constructor arguments their sampling scripts
#: use (``block_size = (image_size // downsample) ** 2``). ``preset`` names a GPT or VQ preset.
LLAMAGEN_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "vq_ds16_c2i.pt": dict(preset="VQ-16", codebook_size=16384, codebook_embed_dim=8),
    "vq_ds8_c2i.pt": dict(preset="VQ-8", codebook_size=16384, codebook_embed_dim=8),
    "vq_ds16_t2i.pt": dict(preset="VQ-16", codebook_size=16384, codebook_embed_dim=8),
    "c2i_B_256.pt": dict(preset="GPT-B", model_type="c2i", block_size=256, cls_token_num=1),
    "c2i_B_384.pt": dict(preset="GPT-B", model_type="c2i", block_size=576, cls_token_num=1),
    "c2i_L_256.pt": dict(preset="GPT-L", model_type="c2i", block_size=256, cls_token_num=1),
    "c2i_L_384.pt": dict(preset="GPT-L", model_type="c2i", block_size=576, cls_token_num=1),
    "c2i_XL_384.pt": dict(preset="GPT-XL", model_type="c2i", block_size=576, cls_token_num=1),
    "c2i_XXL_384.pt": dict(preset="GPT-XXL", model_type="c2i", block_size=576, cls_token_num=1),
    "c2i_3B_384.pt": dict(preset="GPT-3B", model_type="c2i", block_size=576, cls_token_num=1),
    "t2i_XL_stage1_256.pt": dict(preset="GPT-XL", model_type="t2i", block_size=256, cls_token_num=120),
    "t2i_XL_stage2_512.pt": dict(preset="GPT-XL", model_type="t2i", block_size=1024, cls_token_num=120),
}


# ------------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------------


@dataclass
class LlamaGenConfig:
    """GPT hyper-parameters; field names and defaults are LlamaGen's ``gpt.ModelArgs``.

    ``max_batch_size`` and ``max_seq_len`` are kept for compatibility only (LlamaGen sizes its static KV
    cache with them; here the cache is a growing ``DynamicCache``). A few read-only aliases
    (``hidden_size``, ``num_hidden_layers``, ...) let generic transformers-style code inspect the model.
    """

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"

    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    max_batch_size: int = 32
    max_seq_len: int = 2048

    is_encoder_decoder = False  # class attribute, not a field

    def __post_init__(self) -> None:
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        if self.dim % self.n_head:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        grid = math.isqrt(self.block_size)
        if grid * grid != self.block_size:
            raise ValueError(f"block_size ({self.block_size}) must be a square number (grid of image tokens)")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            # LlamaGen's LabelEmbedder yields exactly one condition token; with cls_token_num > 1 its rotary
            # table and its training loss disagree about where image tokens start.
            raise ValueError(f"c2i models have exactly one condition token (cls_token_num=1), got {self.cls_token_num}")
        if self.model_type == "t2i" and not 1 <= self.cls_token_num <= CAPTION_UNCOND_TOKENS:
            raise ValueError(
                f"t2i cls_token_num must be in [1, {CAPTION_UNCOND_TOKENS}] (LlamaGen's unconditional caption "
                f"has {CAPTION_UNCOND_TOKENS} tokens), got {self.cls_token_num}"
            )

    # derived values --------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def max_position(self) -> int:
        """Rows of the rotary table: ``cls_token_num + block_size`` logical positions."""
        return self.cls_token_num + self.block_size

    # transformers-style read-only aliases ----------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.dim

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.kv_heads

    def get_text_config(self, *args, **kwargs) -> LlamaGenConfig:
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LlamaGenVQConfig:
    """VQ tokenizer hyper-parameters; the first ten fields are LlamaGen's ``vq_model.ModelArgs``.

    ``ch``, ``num_res_blocks``, ``in_channels`` and ``out_channels`` are hard-coded in LlamaGen's
    ``Encoder``/``Decoder`` defaults (128, 2, 3, 3); they are exposed here only so tests can build tiny
    tokenizers. Normalisation is GroupNorm with 32 groups, so ``ch * mult`` must be a multiple of 32.
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    z_channels: int = 256
    dropout_p: float = 0.0
    # not LlamaGen ModelArgs fields (hard-coded there):
    ch: int = 128
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        self.encoder_ch_mult = [int(m) for m in self.encoder_ch_mult]
        self.decoder_ch_mult = [int(m) for m in self.decoder_ch_mult]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _make_config(cls, preset: str | None, presets: dict, kwargs: dict):
    if preset is not None:
        if preset not in presets:
            raise KeyError(f"unknown preset {preset!r}; known: {sorted(presets)}")
        kwargs = {**presets[preset], **kwargs}
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} argument(s) {unknown}; valid: {sorted(names)}")
    return cls(**kwargs)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's SwiGLU width: ``int(2 * 4 * dim / 3)``, times ``ffn_dim_multiplier`` (truncated), rounded
    up to a multiple of ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    if hidden % multiple_of:
        hidden += multiple_of - hidden % multiple_of
    return hidden


# ------------------------------------------------------------------------------------------------------
# diffusers bridge
# ------------------------------------------------------------------------------------------------------


class DataclassConfigModel(ModelMixin, ConfigMixin):
    """A diffusers model whose hyper-parameters are one dataclass (``config_dataclass``).

    ``save_pretrained`` / ``from_pretrained`` are diffusers' own: ``config.json`` holds the dataclass fields
    (recorded with ``register_to_config``) and the weights sit beside it, so ``DiffusionPipeline`` saves and
    loads these models like any diffusers component. ``model.config`` is the typed dataclass (validation and
    derived values such as ``head_dim``) rather than diffusers' plain dict.
    """

    config_dataclass: type

    def _init_config(self, config, kwargs: dict):
        """Build (or take) the dataclass config, record it for diffusers and return it."""
        cls = self.config_dataclass
        if config is None:
            config = cls(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either a {cls.__name__} or keyword arguments, not both")
        elif not isinstance(config, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        self._typed_config = config
        self.register_to_config(**config.to_dict())
        return config

    @property
    def config(self):
        """The model's hyper-parameters as a ``config_dataclass`` instance."""
        return self._typed_config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' ``ModelMixin.from_pretrained``; without ``torch_dtype`` (or its alias ``dtype``) the weights
        keep the dtype they were saved in, as transformers' ``dtype="auto"`` (diffusers would cast to float32)."""
        dtype = kwargs.pop("dtype", None)
        if kwargs.get("torch_dtype") is None:
            folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
            kwargs["torch_dtype"] = dtype or saved_dtype(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @staticmethod
    def _get_init_keys(input_class):
        # diffusers' from_config reads the constructor's keyword arguments from its signature; these models take
        # ``config=None, **fields``, so the names come from the dataclass instead.
        spec = getattr(input_class, "config_dataclass", None)
        if spec is None:
            return ConfigMixin._get_init_keys(input_class)
        return {"self", *(f.name for f in fields(spec))}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def saved_dtype(path: str) -> torch.dtype | None:
    """The floating dtype of the tensors in a safetensors file (read from its header), None if unknown."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    found = {_SAFETENSORS_DTYPES.get(v.get("dtype")) for k, v in header.items() if k != "__metadata__"} - {None}
    return found.pop() if len(found) == 1 else None
