"""Building blocks of the LlamaGen GPT: 2-D rotary table, RMSNorm, condition embedders, attention, SwiGLU.

Numerics follow LlamaGen's code: rotary table and RMSNorm statistics in float32 (float64 stays float64), all-zero
rotary rows for condition tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CAPTION_UNCOND_TOKENS, LlamaGenConfig

__all__ = [
    "precompute_freqs_cis_2d", "apply_rotary", "RMSNorm", "DropPath", "LabelEmbedder", "CaptionMLP",
    "CaptionEmbedder", "FeedForward", "Attention", "TransformerBlock",
]


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
                raise ValueError(
                    f"captions of {T} tokens are longer than the unconditional caption "
                    f"({self.uncond_embedding.shape[0]})"
                )
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
