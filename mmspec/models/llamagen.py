"""LlamaGen (Sun et al., 2024) image generator and VQ image tokenizer, checkpoint compatible.

This is an independent implementation of the two LlamaGen model families:

* :class:`LlamaGenGPT` - the Llama-style autoregressive transformer over VQ codes
  (LlamaGen ``autoregressive/models/gpt.py``), class-conditional (``model_type="c2i"``) or
  text-conditional (``model_type="t2i"``, T5 caption features).
* :class:`LlamaGenVQ` - the convolutional VQ tokenizer (LlamaGen ``tokenizer/tokenizer_image/vq_model.py``).

Parameter names equal LlamaGen's ``state_dict`` keys, so LlamaGen's public ``.pt`` checkpoints load with
``strict=True`` (see :func:`load_gpt` / :func:`load_vq`), and the numerics follow LlamaGen's own code
(float32 rotary table and RMSNorm statistics, all-zero rotary rows for condition tokens, float32 logits).

Unlike LlamaGen's ``Transformer.forward`` (which owns a static KV cache), :meth:`LlamaGenGPT.forward` is
driven like a transformers causal LM: ``transformers.DynamicCache`` as the KV cache, a 2-D 0/1
``attention_mask`` over all cached positions (padding and holes anywhere), and ``position_ids`` that index
the 2-D rotary table. Position convention (the *logical* position of a token):

* ``p < cls_token_num``: condition token ``p`` (class embedding or caption token). LlamaGen's rotary table
  holds zeros there, so condition queries/keys are zero vectors - reproduced on purpose.
* ``p >= cls_token_num``: image token ``p - cls_token_num`` in raster order on the
  ``sqrt(block_size)`` x ``sqrt(block_size)`` grid; the first half of every head's rotary pairs rotates by
  the grid row, the second half by the grid column.

:func:`llamagen_generate` is a plain reference sampler mirroring LlamaGen's ``generate`` (prefill of the
condition, then one token per step, classifier-free guidance with conditional rows first and
unconditional rows second in one batch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .compat import make_output, output_cache

__all__ = [
    "GPT_PRESETS",
    "VQ_PRESETS",
    "LLAMAGEN_CHECKPOINTS",
    "LlamaGenConfig",
    "LlamaGenVQConfig",
    "LlamaGenGPT",
    "LlamaGenVQ",
    "build_gpt",
    "build_vq",
    "ffn_hidden_dim",
    "precompute_freqs_cis_2d",
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

    def get_text_config(self, *args, **kwargs) -> "LlamaGenConfig":
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
# GPT building blocks
# ------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs (as LlamaGen's ``.float()``), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float = 10000, cls_token_num: int = 1) -> torch.Tensor:
    """LlamaGen's 2-D rotary table, float32.

    Each head's ``head_dim // 2`` rotation pairs are split in two: the first ``head_dim // 4`` pairs rotate
    by the token's grid row, the last ``head_dim // 4`` by its grid column, with frequencies
    ``base ** (-2k / (head_dim // 2))``. Rows for the ``cls_token_num`` condition positions are all zero
    (cos = sin = 0), as in LlamaGen.

    Returns:
        FloatTensor [cls_token_num + grid_size**2, head_dim // 2, 2]; ``[..., 0]`` cos, ``[..., 1]`` sin.
    """
    cpu = torch.device("cpu")  # explicit, so building under ``torch.device("meta")`` still gets real values
    half = head_dim // 2
    exponents = torch.arange(0, half, 2, device=cpu)[: half // 2].float() / half
    inv_freq = 1.0 / (base**exponents)  # [half // 2]
    angles = torch.outer(torch.arange(grid_size, device=cpu), inv_freq)  # [grid, half // 2]
    n = angles.shape[1]
    grid = torch.cat(
        [angles[:, None, :].expand(grid_size, grid_size, n), angles[None, :, :].expand(grid_size, grid_size, n)],
        dim=-1,
    )  # [grid(row), grid(col), half]
    table = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)  # [grid**2, half, 2]
    return torch.cat([torch.zeros(cls_token_num, table.shape[1], 2, device=cpu), table])


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of every head.

    Args:
        x: [B, L, H, head_dim].
        rope: [B or 1, L, head_dim // 2, 2] (cos, sin).
    Returns:
        Tensor like ``x`` (computed in at least float32, cast back to ``x.dtype``).
    """
    cdtype = _compute_dtype(x.dtype)
    xs = x.to(cdtype).reshape(*x.shape[:-1], -1, 2)  # [B, L, H, hd/2, 2]
    r = rope.to(cdtype).unsqueeze(2)  # [B, L, 1, hd/2, 2]
    cos, sin = r[..., 0], r[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).to(x.dtype)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` with the statistics in (at least) float32, as LlamaGen."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_compute_dtype(x.dtype))
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p`` (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (noise / keep if keep > 0 else noise)


class LabelEmbedder(nn.Module):
    """Class label -> one condition token. Row ``num_classes`` (present when ``dropout_prob > 0``) is the
    null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """labels: LongTensor [B]; drop: optional bool [B] (True -> null class). Returns [B, 1, hidden]."""
        labels = labels.reshape(-1).long()
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        if drop is not None:
            labels = torch.where(drop.to(labels.device).reshape(-1).bool(), self.num_classes, labels)
        rows = self.embedding_table.num_embeddings
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= rows):
            raise ValueError(
                f"class labels must be in [0, {rows - 1}] (num_classes={self.num_classes}"
                + (", the null class is num_classes" if rows > self.num_classes else ", this model has no null class")
                + f"), got range [{int(labels.min())}, {int(labels.max())}]"
            )
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``, no biases (LlamaGen's ``MLP``)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Caption features [B, T, caption_dim] -> condition tokens [B, T, dim]; ``uncond_embedding``
    ([120, caption_dim], a persistent buffer as in LlamaGen) replaces dropped captions."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int = CAPTION_UNCOND_TOKENS):
        super().__init__()
        self.cap_proj = CaptionMLP(in_channels, hidden_size, hidden_size)
        self.register_buffer("uncond_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """caption: [B, T, caption_dim] (T <= 120); drop: optional bool [B]. Returns [B, T, dim]."""
        T = caption.shape[1]
        if drop is None and self.training and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        caption = caption.to(self.cap_proj.fc1.weight.dtype)
        if drop is not None:
            if T > self.uncond_embedding.shape[0]:
                raise ValueError(f"captions of {T} tokens are longer than the unconditional caption ({self.uncond_embedding.shape[0]})")
            uncond = self.uncond_embedding[:T].to(caption.dtype)
            caption = torch.where(drop.to(caption.device).reshape(-1, 1, 1).bool(), uncond, caption)
        return self.cap_proj(caption)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        hidden = config.ffn_hidden_dim
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Attention(nn.Module):
    """Multi-head attention with a fused ``wqkv`` projection (q: n_head, k/v: n_kv_head heads) and
    LlamaGen's 2-D rotary embedding. K/V are cached un-repeated (n_kv_head heads)."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.dim = config.dim
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache=None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """x: [B, L, dim]; rope: [B|1, L, head_dim/2, 2]; mask: bool [B|1, 1, L, K] (True = attend) or
        additive float, or None (with ``is_causal``). Returns [B, L, dim]."""
        B, L, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rotary(q.view(B, L, self.n_head, self.head_dim), rope).transpose(1, 2)
        k = apply_rotary(k.view(B, L, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(B, L, self.dim)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + ffn(norm(h))`` (with optional drop-path)."""

    def __init__(self, config: LlamaGenConfig, drop_path: float):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x, rope, mask, is_causal, cache=None, layer_idx=0):
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, mask, is_causal, cache, layer_idx))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


# ------------------------------------------------------------------------------------------------------
# GPT
# ------------------------------------------------------------------------------------------------------


class LlamaGenGPT(nn.Module):
    """LlamaGen's autoregressive image transformer with a transformers-style forward.

    State-dict keys (``i`` over layers)::

        cls_embedding.embedding_table.weight                  # c2i: [num_classes + (class_dropout_prob > 0), dim]
        cls_embedding.cap_proj.fc1.weight, ...fc2.weight      # t2i: [dim, caption_dim], [dim, dim]
        cls_embedding.uncond_embedding                        # t2i buffer: [120, caption_dim]
        tok_embeddings.weight                                 # [vocab_size, dim]
        layers.{i}.attention.wqkv.weight                      # [(n_head + 2 n_kv_head) * head_dim, dim]
        layers.{i}.attention.wo.weight                        # [dim, dim]
        layers.{i}.feed_forward.w1/w3.weight, .w2.weight      # [hidden, dim], [dim, hidden]
        layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight
        norm.weight, output.weight                            # [dim], [vocab_size, dim]
    """

    def __init__(self, config: LlamaGenConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = LlamaGenConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a LlamaGenConfig or keyword arguments, not both")
        self.config = config
        self.vocab_size = config.vocab_size
        self.n_layer = config.n_layer
        self.block_size = config.block_size
        self.num_classes = config.num_classes
        self.model_type = config.model_type
        self.cls_token_num = config.cls_token_num
        if config.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(config.caption_dim, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        rates = torch.linspace(0, config.drop_path_rate, config.n_layer, device="cpu").tolist()
        self.layers = nn.ModuleList(TransformerBlock(config, rates[i]) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # float32 rotary table; a plain attribute (not a buffer) so ``model.to(bfloat16)`` leaves it float32
        # and it never enters the state dict - as in LlamaGen.
        self._rope_cpu = precompute_freqs_cis_2d(config.grid_size, config.head_dim, config.rope_base, config.cls_token_num)
        self._rope_by_device: dict[torch.device, torch.Tensor] = {}
        self.init_weights()

    # -- construction helpers ---------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "LlamaGenGPT":
        """``LlamaGenGPT.from_preset("GPT-B", vocab_size=16384, block_size=256)``."""
        return cls(_make_config(LlamaGenConfig, preset, GPT_PRESETS, kwargs))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``save_directory/model.safetensors`` with the config in its metadata (see :func:`save_gpt`).
        Extra keyword arguments (as diffusers/transformers pass them) are ignored."""
        _save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None, **kwargs) -> "LlamaGenGPT":
        """Load what :meth:`save_pretrained` wrote (a directory, or a checkpoint file for :func:`load_gpt`).
        ``torch_dtype`` / ``dtype`` and ``device`` are honoured; other loader keyword arguments are ignored."""
        return load_gpt(_pretrained_file(path), **_pretrained_kwargs(torch_dtype, kwargs))

    def init_weights(self, zero_output: bool = True) -> None:
        """LlamaGen's initialisation: N(0, initializer_range) for Linear/Embedding weights, zero output
        head (the t2i unconditional caption keeps its N(0, 1/caption_dim) draw, RMSNorm weights ones)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if zero_output:
            nn.init.zeros_(self.output.weight)

    # -- transformers-style accessors ---------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def freqs_cis(self) -> torch.Tensor:
        """The float32 rotary table [cls_token_num + block_size, head_dim // 2, 2] on the model's device."""
        return self._rope(self.device)

    def _rope(self, device: torch.device) -> torch.Tensor:
        table = self._rope_by_device.get(device)
        if table is None:
            table = self._rope_cpu.to(device)
            self._rope_by_device[device] = table
        return table

    # -- conditions ------------------------------------------------------------------------------------
    def embed_condition(self, cond: torch.Tensor, cond_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Condition tokens.

        Args:
            cond: c2i: LongTensor [B] class labels (``num_classes`` = null class);
                t2i: float [B, T, caption_dim] caption features with T >= cls_token_num (only the first
                cls_token_num tokens are used, as LlamaGen slices ``[:, :cls_token_num]``).
            cond_drop: optional bool/0-1 [B]; True replaces the row's condition by the null class / the
                learned unconditional caption. In training mode without it, rows are dropped at random with
                probability ``class_dropout_prob`` (LlamaGen's CFG training).
        Returns:
            [B, cls_token_num, dim].
        """
        if self.model_type == "c2i":
            cond = torch.as_tensor(cond, device=self.device)
            return self.cls_embedding(cond, cond_drop)
        if cond.dim() != 3 or cond.shape[-1] != self.config.caption_dim:
            raise ValueError(f"t2i condition must be [B, T, {self.config.caption_dim}] caption features, got {tuple(cond.shape)}")
        if cond.shape[1] < self.cls_token_num:
            raise ValueError(f"captions have {cond.shape[1]} tokens, the model needs cls_token_num={self.cls_token_num}")
        return self.cls_embedding(cond[:, : self.cls_token_num], cond_drop)

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """The unconditional counterpart of ``cond`` as LlamaGen's ``generate`` builds it: the null class
        label for c2i, the learned unconditional caption for t2i (same shape as ``cond``)."""
        if self.model_type == "c2i":
            if self.config.class_dropout_prob <= 0:
                raise ValueError("this c2i model has no null class (class_dropout_prob == 0), so no CFG")
            return torch.full_like(torch.as_tensor(cond), self.num_classes)
        T = cond.shape[1]
        if T > self.cls_embedding.uncond_embedding.shape[0]:
            raise ValueError(f"captions of {T} tokens are longer than the unconditional caption")
        return torch.zeros_like(cond) + self.cls_embedding.uncond_embedding[:T].to(cond)

    # -- forward -----------------------------------------------------------------------------------------
    def rotary_for_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids: Long [B, L] logical positions -> rotary rows [B, L, head_dim // 2, 2] (float32)."""
        table = self._rope(position_ids.device)
        # Checked on the CPU only: on an accelerator the check would force a host sync every step (an
        # out-of-range index still fails there, as a device-side assert).
        if position_ids.device.type == "cpu" and position_ids.numel():
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0 or hi >= table.shape[0]:
                raise IndexError(
                    f"position_ids must lie in [0, {table.shape[0] - 1}] (cls_token_num={self.cls_token_num} condition "
                    f"positions + block_size={self.block_size} image positions); got [{lo}, {hi}]"
                )
        return table[position_ids]

    @staticmethod
    def build_attention_mask(
        attention_mask: torch.Tensor | None, cache_position: torch.Tensor, batch_size: int, key_len: int
    ) -> torch.Tensor:
        """Boolean attention mask [B, 1, L, K] (True = attend).

        Query ``i`` (cache slot ``cache_position[i]``) may attend key slot ``j`` iff ``j <= cache_position[i]``
        and ``attention_mask[b, j] == 1``; a query always attends its own slot (as LlamaGen's ``emb_masks``
        handling does), so fully masked rows stay finite.

        Args:
            attention_mask: None or 0/1 [B, K] over all cached slots (past + current).
            cache_position: Long [L] cache slots of the current tokens.
        """
        keys = torch.arange(key_len, device=cache_position.device)
        allowed = keys[None, :] <= cache_position[:, None]  # [L, K]
        diag = keys[None, :] == cache_position[:, None]
        if attention_mask is None:
            return allowed[None, None].expand(batch_size, 1, -1, -1)
        if attention_mask.shape != (batch_size, key_len):
            raise ValueError(
                f"2-D attention_mask must be [B, past + L] = [{batch_size}, {key_len}], got {tuple(attention_mask.shape)}"
            )
        am = attention_mask.to(device=cache_position.device).bool()
        return ((allowed[None] & am[:, None, :]) | diag[None])[:, None]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        cond: torch.Tensor | None = None,
        cond_drop: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        cache_position: torch.Tensor | None = None,
        use_cache: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool = False,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """Run L new positions on top of an optional KV cache.

        The new positions are, in order: the ``cls_token_num`` condition tokens if ``cond`` is given (only
        at prefill), then the image tokens ``input_ids`` (or ``inputs_embeds``).

        Args:
            input_ids: Long [B, L_img] image token ids (may be None or [B, 0] at prefill).
            cond: condition, see :meth:`embed_condition` (c2i: Long [B]; t2i: float [B, T, caption_dim]).
            cond_drop: optional bool [B]: use the null/unconditional condition in these rows.
            inputs_embeds: float [B, L_img, dim] instead of ``input_ids``.
            attention_mask: 0/1 [B, past + L] over every cache slot (0 = padding or hole anywhere), combined
                with causality; or a ready 4-D mask [B|1, 1, L, past + L] (bool True = attend, or additive
                float) used as given.
            position_ids: Long [B, L] logical positions into the rotary table (``p < cls_token_num``:
                condition slot; ``p >= cls_token_num``: image token ``p - cls_token_num``). Default:
                ``cache_position`` (no holes).
            past_key_values: ``transformers.DynamicCache`` (created when None and ``use_cache``); updated
                in place with the new keys/values (``n_kv_head`` heads), so ``cache.crop(-n)`` rolls back.
            cache_position: Long [L] cache slots of the new positions; default ``past + arange(L)``.
            use_cache: create a cache when none is given.
            logits_to_keep: 0 = logits for all L positions; n > 0 = the last n; or a 1-D index tensor.
            output_hidden_states: also return per-layer hidden states.
            labels: optional Long [B, L'] targets aligned with the returned logits (cross-entropy, -100
                ignored); LlamaGen's training uses logits ``[:, cls_token_num - 1 : -1]`` for image targets.
        Returns:
            ``transformers.modeling_outputs.CausalLMOutputWithPast`` with ``logits`` float [B, L', vocab_size]
            (float32 for 16/32-bit models, as LlamaGen's ``.float()``; L' = L or the kept tail),
            ``past_key_values`` (the DynamicCache, None if ``use_cache=False`` and none was given),
            ``hidden_states`` (each layer's input [B, L, dim] plus the final normed states, on request)
            and ``loss`` (with ``labels``).
        """
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass input_ids or inputs_embeds, not both")
        parts = []
        if cond is not None:
            parts.append(self.embed_condition(cond, cond_drop))
        if inputs_embeds is not None:
            parts.append(inputs_embeds)
        elif input_ids is not None:
            parts.append(self.tok_embeddings(input_ids))
        if not parts:
            raise ValueError("nothing to run: give cond (prefill) and/or input_ids / inputs_embeds")
        if len(parts) > 1:
            parts[1] = parts[1].to(parts[0].dtype)
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        h = self.tok_dropout(h)
        B, L, _ = h.shape
        device = h.device

        if past_key_values is None and use_cache:
            from transformers import DynamicCache

            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        explicit_slots = cache_position is not None
        if cache_position is None:
            cache_position = torch.arange(past, past + L, device=device)
        cache_position = cache_position.to(device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0).expand(B, L)
        position_ids = position_ids.to(device)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(B, L)
        rope = self.rotary_for_positions(position_ids)
        key_len = past + L

        is_causal = False
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask.to(device)
            if mask.dtype != torch.bool:
                mask = mask.to(h.dtype)
        elif attention_mask is None and not explicit_slots and (L == 1 or past == 0):
            mask, is_causal = None, L > 1  # plain causal: let SDPA pick its fast path
        else:
            mask = self.build_attention_mask(attention_mask, cache_position, B, key_len)

        hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if hidden is not None:
                hidden.append(h)
            h = layer(h, rope, mask, is_causal, past_key_values, i)
        h = self.norm(h)
        if hidden is not None:
            hidden.append(h)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep.to(device)]
        logits = self.output(h)
        logits = logits.to(_compute_dtype(logits.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=-100)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return make_output(
            CausalLMOutputWithPast, loss=loss, logits=logits, past_key_values=past_key_values,
            hidden_states=tuple(hidden) if hidden is not None else None,
        )


def build_gpt(preset: str | None = None, **kwargs) -> LlamaGenGPT:
    """Build a GPT from a preset name in :data:`GPT_PRESETS` and/or ``LlamaGenConfig`` kwargs."""
    return LlamaGenGPT(_make_config(LlamaGenConfig, preset, GPT_PRESETS, kwargs))


# ------------------------------------------------------------------------------------------------------
# Reference sampler (LlamaGen generate.py semantics)
# ------------------------------------------------------------------------------------------------------


def top_k_top_p_filtering(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, filter_value: float = -float("inf"), min_tokens_to_keep: int = 1
) -> torch.Tensor:
    """Mask logits [B, V] outside the top-k and/or nucleus (top-p) set with ``filter_value``.

    Top-k keeps every logit >= the k-th largest (ties kept); top-p keeps the smallest prefix of the
    sorted distribution whose cumulative probability exceeds ``top_p`` (the crossing token included).
    Returns a new tensor.
    """
    logits = logits.clone()
    if top_k > 0:
        k = min(max(top_k, min_tokens_to_keep), logits.size(-1))
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        if min_tokens_to_keep > 1:
            remove[..., :min_tokens_to_keep] = False
        remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], dim=-1)
        remove = remove.scatter(-1, sorted_idx, remove)
        logits = logits.masked_fill(remove, filter_value)
    return logits


def llamagen_sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    sample_logits: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaGen's ``sample``: logits [B, V] -> (token Long [B, 1], probs [B, V]).

    ``logits / max(temperature, 1e-5)``, then top-k / top-p filtering, softmax, and one multinomial draw
    (``generator`` if given, else the global RNG), or the argmax when ``sample_logits`` is False.
    """
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
    probs = F.softmax(logits, dim=-1)
    if sample_logits:
        idx = torch.multinomial(probs, num_samples=1, generator=generator)
    else:
        idx = torch.topk(probs, k=1, dim=-1)[1]
    return idx, probs


@torch.no_grad()
def llamagen_generate(
    model: LlamaGenGPT,
    cond: torch.Tensor,
    max_new_tokens: int,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    emb_masks: torch.Tensor | None = None,
    cfg_interval: int = -1,
    sample_logits: bool = True,
) -> torch.Tensor:
    """Sample image tokens exactly as LlamaGen's ``generate`` does, one token per forward.

    With ``cfg_scale > 1`` the batch is doubled: rows ``[:B]`` carry ``cond``, rows ``[B:]`` the null
    condition (:meth:`LlamaGenGPT.null_condition`); guided logits are
    ``uncond + (cond - uncond) * cfg_scale``, and the sampled token is fed to both halves. After step
    ``cfg_interval`` (if > -1) the conditional logits are used alone (the prefill step is always guided).

    Args:
        model: a :class:`LlamaGenGPT`.
        cond: c2i: Long [B] labels; t2i: float [B, T, caption_dim] (LlamaGen zeroes padded caption tokens).
        max_new_tokens: number of image tokens (``block_size`` for a full image).
        emb_masks: t2i only, 0/1 [B, cls_token_num]: valid caption tokens (LlamaGen's left padding); padded
            condition slots are hidden from every query except themselves.
        generator: RNG for the multinomial draws; ``top_k=1`` is greedy.
    Returns:
        LongTensor [B, max_new_tokens].
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cond = torch.as_tensor(cond, device=model.device)
    B = cond.shape[0]
    cfg = cfg_scale > 1.0
    cond_all = torch.cat([cond, model.null_condition(cond)]) if cfg else cond
    T = model.cls_token_num
    mask = None
    if emb_masks is not None:
        if emb_masks.shape != (B, T):
            raise ValueError(f"emb_masks must be [B, cls_token_num] = [{B}, {T}], got {tuple(emb_masks.shape)}")
        mask = emb_masks.to(model.device).long()
        mask = torch.cat([mask, mask]) if cfg else mask
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, sample_logits=sample_logits, generator=generator)

    def guided(logits: torch.Tensor, use_cfg: bool) -> torch.Tensor:
        if not cfg:
            return logits
        c, u = logits.split(B, dim=0)
        return u + (c - u) * cfg_scale if use_cfg else c

    out = model(cond=cond_all, attention_mask=mask, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    token = llamagen_sample(guided(out.logits[:, -1], True), **kw)[0]  # [B, 1]
    tokens = [token]
    for i in range(max_new_tokens - 1):
        use_cfg = not (cfg_interval > -1 and i > cfg_interval)
        x = torch.cat([token, token]) if cfg else token
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=x, attention_mask=mask, past_key_values=cache, use_cache=True)
        token = llamagen_sample(guided(out.logits[:, -1], use_cfg), **kw)[0]
        tokens.append(token)
    return torch.cat(tokens, dim=1).long()


# ------------------------------------------------------------------------------------------------------
# VQ tokenizer
# ------------------------------------------------------------------------------------------------------


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``x + conv2(drop(swish(norm2(conv1(swish(norm1(x)))))))``; 1x1 ``nin_shortcut`` when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, hh * ww).transpose(1, 2)  # [b, hw, c]
        k = self.k(n).reshape(b, c, hh * ww)  # [b, c, hw]
        v = self.v(n).reshape(b, c, hh * ww)  # [b, c, hw]
        w = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)  # [b, hw(q), hw(k)]
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv (halves H and W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` (ResnetBlocks), ``attn`` (AttnBlocks, lowest resolution only) and an
    optional ``downsample``/``upsample``."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


class Encoder(nn.Module):
    """images [B, in_channels, H, W] -> latents [B, z_channels, H / 2^(levels-1), W / 2^(levels-1)]."""

    def __init__(self, in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout=0.0, z_channels=256):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for lvl in range(self.num_resolutions):
            level = _Level()
            block_in, block_out = ch * in_mult[lvl], ch * ch_mult[lvl]
            for _ in range(num_res_blocks):
                level.res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if lvl == self.num_resolutions - 1:
                    level.attn.append(AttnBlock(block_in))
            if lvl != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in), ResnetBlock(block_in, block_in, dropout)])
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for lvl, level in enumerate(self.conv_blocks):
            for i in range(self.num_res_blocks):
                h = level.res[i](h)
                if len(level.attn):
                    h = level.attn[i](h)
            if lvl != self.num_resolutions - 1:
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """latents [B, z_channels, h, w] -> images [B, out_channels, h * 2^(levels-1), w * 2^(levels-1)].

    ``conv_blocks[0]`` is the lowest resolution (it holds the attention blocks), each level has
    ``num_res_blocks + 1`` ResnetBlocks and all but the last level end in an ``upsample``.
    """

    def __init__(self, z_channels=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout=0.0, out_channels=3):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in), ResnetBlock(block_in, block_in, dropout)])
        self.conv_blocks = nn.ModuleList()
        for lvl in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = ch * ch_mult[lvl]
            for _ in range(num_res_blocks + 1):
                level.res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if lvl == self.num_resolutions - 1:
                    level.attn.append(AttnBlock(block_in))
            if lvl != 0:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for idx, level in enumerate(self.conv_blocks):
            for i in range(self.num_res_blocks + 1):
                h = level.res[i](h)
                if len(level.attn):
                    h = level.attn[i](h)
            if idx != self.num_resolutions - 1:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


def _entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-sample entropy minus entropy of the mean code distribution (LlamaGen's ``softmax`` variant)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg = probs.mean(0)
    avg_entropy = -torch.sum(avg * torch.log(avg + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser; with ``l2_norm`` both the latents and the codebook are l2-normalised
    before the (squared Euclidean) search and the normalised code vectors are returned.

    ``embedding.weight``: [n_e, e_dim]; ``codebook_used`` (buffer [65536], only with ``show_usage``): the
    recent code history LlamaGen tracks during training (kept for checkpoint compatibility).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float, entropy_loss_ratio: float, l2_norm: bool, show_usage: bool):
        super().__init__()
        self.n_e, self.e_dim = n_e, e_dim
        self.beta = beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.l2_norm = l2_norm
        self.show_usage = show_usage
        self.embedding = nn.Embedding(n_e, e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n_e, 1.0 / n_e)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        """The code vectors actually used: [n_e, e_dim], l2-normalised when ``l2_norm``."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor):
        """z: [B, e_dim, h, w] -> (z_q [B, e_dim, h, w], (vq_loss, commit_loss, entropy_loss, usage),
        (None, None, indices Long [B*h*w] in (b, row, col) order)). Losses are None outside training."""
        z = z.permute(0, 2, 3, 1).contiguous()  # [B, h, w, c]
        flat = z.view(-1, self.e_dim)
        emb = self.embedding.weight
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
            flat = F.normalize(flat, p=2, dim=-1)
            emb = F.normalize(emb, p=2, dim=-1)
        d = torch.sum(flat**2, dim=1, keepdim=True) + torch.sum(emb**2, dim=1) - 2 * flat @ emb.t()
        indices = torch.argmin(d, dim=1)
        z_q = emb[indices].view(z.shape)
        vq_loss = commit_loss = entropy_loss = None
        usage = 0
        if self.training:
            if self.show_usage:
                n = indices.shape[0]
                self.codebook_used[:-n] = self.codebook_used[n:].clone()
                self.codebook_used[-n:] = indices.to(self.codebook_used.dtype)
                usage = len(torch.unique(self.codebook_used)) / self.n_e
            vq_loss = torch.mean((z_q - z.detach()) ** 2)
            commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
            entropy_loss = self.entropy_loss_ratio * _entropy_loss(-d)
        z_q = z + (z_q - z).detach()  # straight-through (kept in eval too: same rounding as LlamaGen)
        return z_q.permute(0, 3, 1, 2), (vq_loss, commit_loss, entropy_loss, usage), (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """indices (any shape) -> code vectors. With ``shape=(B, C, h, w)`` and ``channel_first`` the result
        is [B, C, h, w]; with ``channel_first=False`` it is viewed as ``shape`` (B, h, w, C)."""
        z_q = self.codebook()[indices]
        if shape is not None:
            if channel_first:
                z_q = z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
            else:
                z_q = z_q.view(shape)
        return z_q


class LlamaGenVQ(nn.Module):
    """LlamaGen's VQ image tokenizer (``VQModel``).

    State-dict keys: ``encoder.*`` (conv_in, conv_blocks.{l}.res.{i}.{norm1,conv1,norm2,conv2[,nin_shortcut]},
    conv_blocks.{last}.attn.{i}.{norm,q,k,v,proj_out}, conv_blocks.{l}.downsample.conv, mid.{0,1,2},
    norm_out, conv_out), ``decoder.*`` (same naming, ``upsample``), ``quantize.embedding.weight``
    [codebook_size, codebook_embed_dim], ``quantize.codebook_used`` (with ``codebook_show_usage``),
    ``quant_conv`` and ``post_quant_conv`` (1x1 convs between z_channels and codebook_embed_dim).
    """

    def __init__(self, config: LlamaGenVQConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = LlamaGenVQConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a LlamaGenVQConfig or keyword arguments, not both")
        self.config = config
        c = config
        self.encoder = Encoder(c.in_channels, c.ch, c.encoder_ch_mult, c.num_res_blocks, c.dropout_p, c.z_channels)
        self.decoder = Decoder(c.z_channels, c.ch, c.decoder_ch_mult, c.num_res_blocks, c.dropout_p, c.out_channels)
        self.quantize = VectorQuantizer(
            c.codebook_size, c.codebook_embed_dim, c.commit_loss_beta, c.entropy_loss_ratio,
            c.codebook_l2_norm, c.codebook_show_usage,
        )
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_embed_dim, c.z_channels, 1)

    @classmethod
    def from_preset(cls, preset: str = "VQ-16", **kwargs) -> "LlamaGenVQ":
        return cls(_make_config(LlamaGenVQConfig, preset, VQ_PRESETS, kwargs))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``save_directory/model.safetensors`` with the config in its metadata (see :func:`save_vq`)."""
        _save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None, **kwargs) -> "LlamaGenVQ":
        """Load what :meth:`save_pretrained` wrote (a directory, or a checkpoint file for :func:`load_vq`)."""
        return load_vq(_pretrained_file(path), preset=None, **_pretrained_kwargs(torch_dtype, kwargs))

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def codebook(self) -> torch.Tensor:
        """Raw codebook weights ``quantize.embedding.weight`` [codebook_size, codebook_embed_dim] (not
        normalised; see :meth:`normalized_codebook` for the vectors the quantiser uses)."""
        return self.quantize.embedding.weight

    def normalized_codebook(self) -> torch.Tensor:
        """[codebook_size, codebook_embed_dim]: l2-normalised rows when ``codebook_l2_norm``, else raw."""
        return self.quantize.codebook()

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> (quant [B, codebook_embed_dim, h, w], indices Long [B, h*w]).

        ``h = H / downsample_factor``; indices are in raster order (row-major), the GPT's token order.
        """
        h = self.quant_conv(self.encoder(images))
        quant, _, (_, _, idx) = self.quantize(h)
        return quant, idx.view(images.shape[0], -1)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """quant [B, codebook_embed_dim, h, w] -> images [B, 3, H, W] (about [-1, 1])."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Code indices -> images [B, 3, H, W].

        Args:
            indices: Long [B, h*w] (raster order) or [B, h, w].
            shape: ``(B, codebook_embed_dim, h, w)`` as LlamaGen's ``qzshape``; inferred from [B, h, w]
                indices or from a square [B, h*w] when None.
        """
        if shape is None:
            if indices.dim() == 3:
                B, hh, ww = indices.shape
            elif indices.dim() == 2:
                B, n = indices.shape
                hh = ww = math.isqrt(n)
                if hh * ww != n:
                    raise ValueError(f"cannot infer a square latent grid from {n} codes; pass shape=(B, C, h, w)")
            else:
                raise ValueError(f"indices must be [B, h*w] or [B, h, w], got {tuple(indices.shape)}")
            shape = (B, self.config.codebook_embed_dim, hh, ww)
        return self.decode(self.quantize.get_codebook_entry(indices, shape, channel_first))

    def forward(self, images: torch.Tensor):
        """images -> (reconstruction [B, 3, H, W], losses tuple as LlamaGen's ``VQModel.forward``)."""
        h = self.quant_conv(self.encoder(images))
        quant, losses, _ = self.quantize(h)
        return self.decode(quant), losses


def build_vq(preset: str | None = "VQ-16", **kwargs) -> LlamaGenVQ:
    """Build a VQ tokenizer from a preset in :data:`VQ_PRESETS` and/or ``LlamaGenVQConfig`` kwargs."""
    return LlamaGenVQ(_make_config(LlamaGenVQConfig, preset, VQ_PRESETS, kwargs))


# ------------------------------------------------------------------------------------------------------
# Checkpoint I/O
# ------------------------------------------------------------------------------------------------------

_CONFIG_META_KEY = "mmspec_llamagen_config"
# Derived / runtime tensors that some LlamaGen-era checkpoints carry; they are not weights and are dropped.
_GPT_DERIVED_KEYS = re.compile(r"^(freqs_cis|causal_mask|layers\.\d+\.attention\.kv_cache\.[kv]_cache)$")
_PREFIXES = ("_orig_mod.", "module.")


def _torch_load(path: str, weights_only: bool):
    if not weights_only:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        # LlamaGen training checkpoints also pickle the argparse Namespace of the run ("args").
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise RuntimeError(
            f"could not load {path} with weights_only=True ({type(exc).__name__}: {exc}). If you trust this "
            "file, pass weights_only=False."
        ) from exc


def read_state_dict(path: str | os.PathLike, *, use_ema: bool = False, weights_only: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a LlamaGen-style checkpoint on the CPU.

    Accepts ``.safetensors`` files and ``torch.save`` files holding ``{"model": sd}`` (LlamaGen DDP),
    ``{"module": sd}`` (DeepSpeed), ``{"state_dict": sd}``, ``{"ema": sd}`` (with ``use_ema``) or a bare
    state dict (LlamaGen FSDP). ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes are removed.

    Returns:
        (state_dict, saved_config) where ``saved_config`` is the config stored by :func:`save_gpt` /
        :func:`save_vq` in safetensors metadata (``{}`` otherwise).
    """
    path = os.fspath(path)
    saved: dict = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if _CONFIG_META_KEY in meta:
            saved = json.loads(meta[_CONFIG_META_KEY])
        sd = load_file(path, device="cpu")
    else:
        obj = _torch_load(path, weights_only)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
        if use_ema:
            if "ema" not in obj:
                raise KeyError(f"{path}: use_ema=True but the checkpoint has no 'ema' entry (keys: {sorted(obj)[:10]})")
            sd = obj["ema"]
        elif "model" in obj:
            sd = obj["model"]
        elif "module" in obj:
            sd = obj["module"]
        elif "state_dict" in obj:
            sd = obj["state_dict"]
        elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = obj
        else:
            raise ValueError(f"{path}: no 'model' / 'module' / 'state_dict' entry and not a bare state dict (keys: {sorted(obj)[:10]})")
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out, saved


def _check_and_load(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or bad_shapes:
        lines = [f"checkpoint does not match the {what} built from the given arguments:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if bad_shapes:
            lines.append(f"  shape mismatches ({len(bad_shapes)}): {bad_shapes}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(sd, strict=True, assign=True)


def infer_gpt_args(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """GPT arguments readable from a state dict's shapes: model_type, vocab_size, dim, n_layer,
    num_classes (c2i, assuming a null-class row) / caption_dim (t2i) and, when (dim, n_layer) matches
    one, the preset's n_head (:func:`load_gpt` then also reads n_kv_head from ``wqkv``). ``cls_token_num`` and ``block_size`` are not stored in checkpoints."""
    args: dict[str, Any] = {}
    if "tok_embeddings.weight" in sd:
        args["vocab_size"], args["dim"] = map(int, sd["tok_embeddings.weight"].shape)
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"^layers\.(\d+)\.", k))}
    if layers:
        args["n_layer"] = max(layers) + 1
    if "cls_embedding.embedding_table.weight" in sd:
        args["model_type"] = "c2i"
        args["num_classes"] = int(sd["cls_embedding.embedding_table.weight"].shape[0]) - 1
    elif "cls_embedding.cap_proj.fc1.weight" in sd:
        args["model_type"] = "t2i"
        args["caption_dim"] = int(sd["cls_embedding.cap_proj.fc1.weight"].shape[1])
    for name, preset in GPT_PRESETS.items():
        if preset["dim"] == args.get("dim") and preset["n_layer"] == args.get("n_layer"):
            args["n_head"] = preset["n_head"]
            break
    return args


def load_gpt(
    path: str | os.PathLike,
    preset: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    use_ema: bool = False,
    weights_only: bool = True,
    **model_args,
) -> LlamaGenGPT:
    """Load a LlamaGen GPT checkpoint (strict: every key must match, else ``ValueError`` listing
    missing/unexpected keys and shape mismatches).

    Precedence of arguments: explicit ``model_args`` > ``preset`` (:data:`GPT_PRESETS`) > config saved by
    :func:`save_gpt` > values inferred from the tensor shapes (:func:`infer_gpt_args`). LlamaGen's ``.pt``
    files do not record ``block_size`` (= (image_size / 16)**2, e.g. 576 for the 384px c2i models) nor
    ``cls_token_num`` (1 for c2i, 120 for t2i): pass them (see :data:`LLAMAGEN_CHECKPOINTS`).
    Derived tensors some checkpoints carry (``freqs_cis``, KV-cache buffers) are dropped.

    Returns the model in eval mode on ``device`` (dtype of the checkpoint unless ``dtype`` is given).
    """
    sd, saved = read_state_dict(path, use_ema=use_ema, weights_only=weights_only)
    sd = {k: v for k, v in sd.items() if not _GPT_DERIVED_KEYS.match(k)}
    args: dict[str, Any] = {**infer_gpt_args(sd), **saved}
    if preset is not None:
        if preset not in GPT_PRESETS:
            raise KeyError(f"unknown preset {preset!r}; known: {sorted(GPT_PRESETS)}")
        args.update(GPT_PRESETS[preset])
    args.update(model_args)
    if args.get("model_type") == "c2i" and "num_classes" not in model_args and "num_classes" not in saved:
        # infer_gpt_args assumed a null-class row; without class dropout there is none.
        if float(args.get("class_dropout_prob", 0.1)) <= 0:
            args["num_classes"] += 1
    wqkv = sd.get("layers.0.attention.wqkv.weight")
    if wqkv is not None and "n_kv_head" not in model_args and "n_kv_head" not in saved:
        n_head, dim = int(args.get("n_head", 32)), int(args.get("dim", 4096))
        heads = wqkv.shape[0] // max(dim // n_head, 1)
        if dim % n_head == 0 and heads > n_head and (heads - n_head) % 2 == 0 and (heads - n_head) // 2 != n_head:
            args["n_kv_head"] = (heads - n_head) // 2  # grouped-query attention checkpoint
    config = _make_config(LlamaGenConfig, None, {}, args)
    with torch.device("meta"):
        model = LlamaGenGPT(config)
    _check_and_load(model, sd, "LlamaGen GPT")
    model._rope_by_device.clear()
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_vq(
    path: str | os.PathLike,
    preset: str | None = "VQ-16",
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    use_ema: bool = False,
    weights_only: bool = True,
    **vq_args,
) -> LlamaGenVQ:
    """Load a LlamaGen VQ tokenizer checkpoint strictly (see :func:`load_gpt` for formats and errors).

    Precedence: ``vq_args`` > config saved by :func:`save_vq` > ``preset``. ``codebook_size`` /
    ``codebook_embed_dim`` and ``codebook_show_usage`` (whether ``quantize.codebook_used`` is present) are
    read from the checkpoint unless given.
    """
    sd, saved = read_state_dict(path, use_ema=use_ema, weights_only=weights_only)
    args: dict[str, Any] = {}
    if preset is not None and not saved:
        if preset not in VQ_PRESETS:
            raise KeyError(f"unknown preset {preset!r}; known: {sorted(VQ_PRESETS)}")
        args.update(VQ_PRESETS[preset])
    if "quantize.embedding.weight" in sd:
        args["codebook_size"], args["codebook_embed_dim"] = map(int, sd["quantize.embedding.weight"].shape)
    args["codebook_show_usage"] = "quantize.codebook_used" in sd
    args.update(saved)
    args.update(vq_args)
    config = _make_config(LlamaGenVQConfig, None, {}, args)
    with torch.device("meta"):
        model = LlamaGenVQ(config)
    _check_and_load(model, sd, "LlamaGen VQ tokenizer")
    model.to(device=device, dtype=dtype)
    return model.eval()


def _save(model: nn.Module, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, path, metadata={_CONFIG_META_KEY: json.dumps(model.config.to_dict())})
    else:  # LlamaGen's own layout, e.g. for their scripts
        torch.save({"model": sd}, path)


def save_gpt(model: LlamaGenGPT, path: str | os.PathLike) -> None:
    """Write the GPT weights: ``.safetensors`` (config in the metadata, so :func:`load_gpt` needs no
    arguments) or, for any other suffix, LlamaGen's ``torch.save({"model": state_dict})`` layout."""
    _save(model, path)


def save_vq(model: LlamaGenVQ, path: str | os.PathLike) -> None:
    """Write the VQ weights, as :func:`save_gpt`."""
    _save(model, path)


_PRETRAINED_FILE = "model.safetensors"


def _save_pretrained(model: nn.Module, directory: str | os.PathLike) -> None:
    os.makedirs(directory, exist_ok=True)
    _save(model, os.path.join(os.fspath(directory), _PRETRAINED_FILE))


def _pretrained_file(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return os.path.join(path, _PRETRAINED_FILE) if os.path.isdir(path) else path


def _pretrained_kwargs(torch_dtype, kwargs: dict) -> dict:
    dtype = torch_dtype if torch_dtype is not None else kwargs.get("dtype")
    return {"dtype": dtype, "device": kwargs.get("device") or "cpu"}
