"""LlamaGen's convolutional VQ image tokenizer (``tokenizer/tokenizer_image/vq_model.py``), checkpoint compatible.

A diffusers ``ModelMixin``: ``save_pretrained`` / ``from_pretrained`` are diffusers' own and pipelines save it as
a component; ``model.config`` is a :class:`~mmspec.models.llamagen.LlamaGenVQConfig`.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks the base class up in this module)

from .config import VQ_PRESETS, DataclassConfigModel, LlamaGenVQConfig, _make_config

__all__ = ["LlamaGenVQ", "VectorQuantizer", "Encoder", "Decoder", "build_vq"]


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
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in), ResnetBlock(block_in, block_in, dropout)]
        )
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
        self.mid = nn.ModuleList(
            [ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in), ResnetBlock(block_in, block_in, dropout)]
        )
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


class LlamaGenVQ(DataclassConfigModel):
    """LlamaGen's VQ image tokenizer (``VQModel``).

    State-dict keys: ``encoder.*`` (conv_in, conv_blocks.{l}.res.{i}.{norm1,conv1,norm2,conv2[,nin_shortcut]},
    conv_blocks.{last}.attn.{i}.{norm,q,k,v,proj_out}, conv_blocks.{l}.downsample.conv, mid.{0,1,2},
    norm_out, conv_out), ``decoder.*`` (same naming, ``upsample``), ``quantize.embedding.weight``
    [codebook_size, codebook_embed_dim], ``quantize.codebook_used`` (with ``codebook_show_usage``),
    ``quant_conv`` and ``post_quant_conv`` (1x1 convs between z_channels and codebook_embed_dim).
    """

    config_dataclass = LlamaGenVQConfig

    def __init__(self, config: LlamaGenVQConfig | None = None, **kwargs):
        super().__init__()
        c = self._init_config(config, kwargs)
        self.encoder = Encoder(c.in_channels, c.ch, c.encoder_ch_mult, c.num_res_blocks, c.dropout_p, c.z_channels)
        self.decoder = Decoder(c.z_channels, c.ch, c.decoder_ch_mult, c.num_res_blocks, c.dropout_p, c.out_channels)
        self.quantize = VectorQuantizer(
            c.codebook_size, c.codebook_embed_dim, c.commit_loss_beta, c.entropy_loss_ratio,
            c.codebook_l2_norm, c.codebook_show_usage,
        )
        self.quant_conv = nn.Conv2d(c.z_channels, c.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_embed_dim, c.z_channels, 1)

    @classmethod
    def from_preset(cls, preset: str = "VQ-16", **kwargs) -> LlamaGenVQ:
        return cls(_make_config(LlamaGenVQConfig, preset, VQ_PRESETS, kwargs))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> LlamaGenVQ:
        """diffusers' ``ModelMixin.from_pretrained``, plus a checkpoint file or an mmspec 0.1 folder read by
        :func:`~mmspec.models.llamagen.load_vq` (see :meth:`LlamaGenGPT.from_pretrained`)."""
        from .checkpoint import checkpoint_file, load_vq, loader_kwargs

        file = checkpoint_file(pretrained_model_name_or_path)
        if file is not None:
            return load_vq(file, preset=None, **loader_kwargs(kwargs))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

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
