"""A MAR-style continuous autoregressive model: a causal transformer conditions a small diffusion head.

Tokens are continuous vectors (here: latents of a diffusers ``AutoencoderKL``, one token per latent pixel,
row-major). Item 0 of the sequence is the class embedding (the null class is the unconditional branch of
classifier-free guidance, as in MAR); item ``i >= 1`` is token ``i - 1``. The transformer's output at item
``i`` is the condition ``z_i`` of token ``i``. A small MLP denoiser (MAR's ``SimpleMLPAdaLN``: residual
blocks with adaLN modulation by ``timestep embedding + z``) predicts the noise of ``x_t`` and turns noise into
the token through a DDPM schedule (diffusers' :class:`~diffusers.DDPMScheduler`).

Sampling one token (:class:`DDPMTrajectory`): ``x_T ~ N(0, I)``; for each inference timestep ``t`` but the
last, ``x_prev = mean(x_t, eps) + tau * sigma_t * n_t``. The last step ends at timestep 0 and *is* stochastic:
the token is ``mean + s * n_last`` with ``s = tau * sigma_last``, so given everything before it the token has a
Gaussian density ``N(mean, s^2 I)``. (diffusers' own schedule would end with one more, deterministic step from
timestep 0 to the clean sample; it moves the sample by about ``sqrt(1 - alphas_cumprod[0])``, 0.006 for the
cosine schedule, far below ``s``, and is dropped so the token keeps a density, which exact speculative
acceptance needs: see :mod:`mmspec.acceptance.continuous`.) Guidance mixes the noise predictions,
``eps_u + w (eps_c - eps_u)``, as MAR does.

:class:`MARRunner` is the decoding adapter: a per-row KV cache (``prefill`` / ``checkpoint`` / ``forward`` /
``rollback``, the same contract as :class:`mmspec.models.causal_lm.CausalLM`) with cond and uncond rows.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from einops import rearrange

__all__ = [
    "ContinuousARModel", "DiffusionHead", "DDPMTrajectory", "MARRunner", "latents_to_tokens", "tokens_to_latents",
]


def latents_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents -> [B, h * w, C] tokens (row-major)."""
    return rearrange(latents, "b c h w -> b (h w) c")


def tokens_to_latents(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """[B, h * w, C] tokens -> [B, C, h, w] latents (square grid of side ``grid_size``)."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=grid_size, w=grid_size)


# --------------------------------------------------------------------------------------------
# Diffusion head
# --------------------------------------------------------------------------------------------


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, h, c):
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return h + gate * self.mlp(_modulate(self.norm(h), shift, scale))


class DiffusionHead(nn.Module):
    """MLP denoiser ``eps(x_t [M, C], t [M], z [M, D]) -> [M, C]`` with adaLN conditioning (MAR's head)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(_ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        for block in self.blocks:  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for layer in (self.final_ada[-1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.time_embed(self.time_proj(t.reshape(-1)).to(z.dtype)) + self.cond_embed(z)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(_modulate(self.final_norm(h), shift, scale))


# --------------------------------------------------------------------------------------------
# Causal transformer with an explicit per-row cache
# --------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        width = mlp_ratio * hidden
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))

    def forward(self, h, cache=None, rows=None, positions=None, mask=None):
        """h [R, L, H]. Without a cache: causal self-attention over the block. With one (a pair of [R, S, heads,
        d] buffers): write this block's keys/values at ``positions`` [R, L] and attend under ``mask`` [R, 1, L, S]."""
        R, L, _ = h.shape
        q, k, v = rearrange(self.qkv(self.norm1(h)), "r l (three n d) -> three r l n d", three=3, n=self.heads)
        if cache is None:
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        else:
            k_buf, v_buf = cache
            k_buf[rows, positions] = k.to(k_buf.dtype)
            v_buf[rows, positions] = v.to(v_buf.dtype)
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k_buf.transpose(1, 2), v_buf.transpose(1, 2),
                                               attn_mask=mask)
        h = h + self.proj(rearrange(a, "r n l d -> r l (n d)"))
        return h + self.mlp(self.norm2(h))


class ContinuousARModel(ModelMixin, ConfigMixin):
    """Class-conditional continuous autoregressive model (causal transformer + MLP diffusion head).

    Args:
        token_dim: channels C of a token (the autoencoder's latent channels).
        grid_size: tokens per side; a sample has ``grid_size**2`` tokens.
        num_classes: class labels ``0..num_classes-1``; ``num_classes`` is the null (unconditional) class.
        hidden_size, num_layers, num_heads, mlp_ratio: the transformer.
        head_width, head_depth: the diffusion head.
        num_train_timesteps, beta_schedule: the DDPM noise schedule (``scheduler()``).
    """

    @register_to_config
    def __init__(self, token_dim: int = 4, grid_size: int = 8, num_classes: int = 9, hidden_size: int = 192,
                 num_layers: int = 4, num_heads: int = 4, mlp_ratio: int = 4, head_width: int = 256,
                 head_depth: int = 3, num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}).")
        self.num_tokens = grid_size * grid_size
        self.class_embed = nn.Embedding(num_classes + 1, hidden_size)
        self.token_embed = nn.Linear(token_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(self.num_tokens, hidden_size) * 0.02)
        self.blocks = nn.ModuleList(_Block(hidden_size, num_heads, mlp_ratio) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)
        self.head = DiffusionHead(token_dim, hidden_size, head_width, head_depth)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def scheduler(self, **overrides) -> DDPMScheduler:
        """The DDPM scheduler the head was trained with (epsilon prediction, no clipping)."""
        kw = dict(num_train_timesteps=self.config.num_train_timesteps, beta_schedule=self.config.beta_schedule,
                  clip_sample=False, prediction_type="epsilon", variance_type="fixed_large")
        kw.update(overrides)
        return DDPMScheduler(**kw)

    def embed(self, class_labels: torch.Tensor | None, tokens: torch.Tensor | None,
              first_item: int = 0) -> torch.Tensor:
        """Input embeddings of items ``first_item ..``: the class item (only when ``first_item == 0``, from
        ``class_labels`` [R]) then ``tokens`` [R, L, C]. Positions are added by the caller."""
        parts = []
        if first_item == 0:
            parts.append(self.class_embed(class_labels).unsqueeze(1))
        if tokens is not None and tokens.shape[1]:
            parts.append(self.token_embed(tokens.to(self.token_embed.weight.dtype)))
        return torch.cat(parts, dim=1)

    def conditions(self, class_labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced conditions: labels [B], tokens [B, N, C] -> z [B, N, D] (z_i sees tokens < i)."""
        N = tokens.shape[1]
        h = self.embed(class_labels, tokens[:, : N - 1]) + self.pos_embed[:N]
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def diffusion_loss(self, tokens: torch.Tensor, class_labels: torch.Tensor, generator=None, batch_mul: int = 4):
        """MAR's training loss: noise-prediction MSE at random timesteps, each condition used ``batch_mul`` times.

        Args:
            tokens: [B, N, C] clean tokens; class_labels: LongTensor [B] (``null_class`` for the uncond branch).
        """
        z = self.conditions(class_labels, tokens)
        x0 = tokens.reshape(-1, tokens.shape[-1]).repeat(batch_mul, 1)
        z = z.reshape(-1, z.shape[-1]).repeat(batch_mul, 1)
        sched = self.scheduler()
        t = torch.randint(0, self.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        x_t = sched.add_noise(x0, noise, t)
        return F.mse_loss(self.head(x_t, t.to(x0.device), z), noise)

    def eps(self, x: torch.Tensor, t, z: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
        """Guided noise prediction: x [M, C], timestep t (int or [M]), z [M, G, D] with G = 1 (no guidance) or
        2 (cond, uncond) -> [M, C] = ``eps_u + w (eps_c - eps_u)``."""
        M, G, _ = z.shape
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(M)
        e = self.head(x.repeat(G, 1), t.repeat(G), z.transpose(0, 1).reshape(G * M, -1)).view(G, M, -1)
        if G == 1:
            return e[0]
        return e[1] + guidance_scale * (e[0] - e[1])

    def forward(self, class_labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced conditions (``conditions``)."""
        return self.conditions(class_labels, tokens)


# --------------------------------------------------------------------------------------------
# The token sampler (one trajectory per token, noise supplied by the caller)
# --------------------------------------------------------------------------------------------


class DDPMTrajectory:
    """DDPM ancestral sampling of one token per row, with all noise supplied by the caller.

    ``noise [M, num_steps + 1, C]``: ``noise[:, 0]`` is ``x_T``, ``noise[:, 1 + i]`` the noise of step ``i``,
    ``noise[:, -1]`` the noise of the last step (so two trajectories of different lengths that share a noise
    tensor share ``x_T``, their first steps and their last step). Schedule values (cumulative alphas, the
    inference timesteps) come from the diffusers scheduler; ``test_continuous`` checks every step against
    ``DDPMScheduler.step``.

    Args:
        scheduler: a ``DDPMScheduler`` (epsilon prediction, ``variance_type`` "fixed_small" or "fixed_large").
        num_inference_steps: passed to ``set_timesteps``; the final (deterministic, timestep 0) step is dropped,
            so ``num_steps = num_inference_steps - 1`` head evaluations make a token.
        temperature: MAR's ``tau``, multiplying every step's noise scale.
    """

    def __init__(self, scheduler: DDPMScheduler, num_inference_steps: int = 25, temperature: float = 1.0):
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 2:
            raise ValueError(f"`num_inference_steps` must be an int >= 2, got {num_inference_steps!r}.")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
        cfg = scheduler.config
        if cfg.prediction_type != "epsilon" or cfg.clip_sample or cfg.thresholding:
            raise ValueError("DDPMTrajectory needs an epsilon-prediction scheduler without clipping or thresholding.")
        if cfg.variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got {cfg.variance_type!r}.")
        scheduler.set_timesteps(num_inference_steps)
        ts = scheduler.timesteps.tolist()
        if ts[-1] != 0:
            raise ValueError(f"the inference timesteps must end at 0, got {ts}.")
        self.timesteps = ts[:-1]
        self.temperature = float(temperature)
        ac = scheduler.alphas_cumprod.to(torch.float64)
        a_t = torch.stack([ac[t] for t in self.timesteps])
        a_prev = torch.stack([ac[t] for t in ts[1:]])
        beta = 1 - a_t / a_prev
        self._sqrt_a_t, self._sqrt_1m_a_t = a_t.sqrt(), (1 - a_t).sqrt()
        self._coef_x0 = a_prev.sqrt() * beta / (1 - a_t)
        self._coef_xt = (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)
        var = beta if cfg.variance_type == "fixed_large" else (beta * (1 - a_prev) / (1 - a_t)).clamp_min(1e-20)
        self.sigmas = var.sqrt() * self.temperature  # float64 [num_steps]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def last_scale(self) -> float:
        """``s``: the standard deviation of the token given the trajectory before the last step."""
        return float(self.sigmas[-1])

    def step_mean(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Posterior mean of step ``i`` (DDPM eq. 7) from ``x_t`` and the predicted noise."""
        x0 = (x - float(self._sqrt_1m_a_t[i]) * eps) / float(self._sqrt_a_t[i])
        return float(self._coef_x0[i]) * x0 + float(self._coef_xt[i]) * x

    @torch.no_grad()
    def last_mean(self, eps_fn, noise: torch.Tensor) -> torch.Tensor:
        """Run every step but the last's noise: ``eps_fn(x [M, C], t) -> [M, C]``; returns the mean [M, C] of
        the token given the trajectory (the token is ``mean + last_scale * noise[:, -1]``)."""
        x = noise[:, 0]
        for i, t in enumerate(self.timesteps):
            mean = self.step_mean(i, x, eps_fn(x, t))
            if i + 1 < self.num_steps:
                x = mean + float(self.sigmas[i]) * noise[:, 1 + i]
        return mean

    def sample(self, eps_fn, noise: torch.Tensor) -> torch.Tensor:
        """A token [M, C] (float32 or the noise's dtype)."""
        return self.last_mean(eps_fn, noise) + self.last_scale * noise[:, -1]


# --------------------------------------------------------------------------------------------
# Decoding adapter
# --------------------------------------------------------------------------------------------


class MARRunner:
    """Step-by-step conditions of a :class:`ContinuousARModel` with a per-row rollback cache.

    Rows are ``G * B`` model rows (G = 2 with guidance: the conditional rows, then the same rows with the null
    class). The cache is one buffer per layer with a length per row, so rows that accepted different numbers of
    drafts simply sit at different lengths: no holes, positions stay exact, and rolling back is resetting a
    length.

        z0 = runner.prefill(class_labels)                   # [B, G, D]: condition of token 0
        runner.checkpoint()
        z = runner.forward(tokens, valid)                   # [B, L, G, D]: conditions of the next tokens
        runner.rollback(keep)                               # keep[b] tokens of the block in row b
    """

    vocab_size = None  # continuous tokens: no vocabulary (``mmspec.models.TargetAdapter``)

    def __init__(self, model: ContinuousARModel, guidance_scale: float = 1.0):
        if not isinstance(model, ContinuousARModel):
            raise TypeError(f"`model` must be a ContinuousARModel, got {type(model).__name__}.")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0, got {guidance_scale!r}.")
        self.model = model
        self.guidance_scale = float(guidance_scale)
        self.groups = 1 if guidance_scale == 1.0 else 2
        self.num_tokens = model.num_tokens
        self.token_dim = model.config.token_dim
        self._cache = None
        self.lengths = None  # LongTensor [G * B] (CPU): items in the cache per model row
        self._start = None

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.pos_embed.dtype

    def _run(self, h, positions):
        """h [R, L, H] (positions already added), cache slots [R, L] -> normed outputs [R, L, H]."""
        R, L, _ = h.shape
        dev = h.device
        S = self.num_tokens + 1  # the last slot takes the keys of invalid places; no valid query sees it
        rows = torch.arange(R, device=dev).unsqueeze(1).expand(R, L)
        mask = (torch.arange(S, device=dev).view(1, 1, S) <= positions.unsqueeze(-1)).unsqueeze(1)
        for block, cache in zip(self.model.blocks, self._cache):
            h = block(h, cache, rows, positions, mask)
        return self.model.norm(h)

    def _split(self, out, B):
        """[G * B, L, D] -> [B, L, G, D]."""
        return rearrange(out, "(g b) l d -> b l g d", g=self.groups, b=B)

    @torch.no_grad()
    def prefill(self, class_labels: torch.Tensor) -> torch.Tensor:
        """Start ``B`` samples: class_labels LongTensor [B] -> condition of token 0, [B, G, D]."""
        B = class_labels.shape[0]
        labels = class_labels.to(self.device).long()
        if self.groups == 2:
            labels = torch.cat([labels, torch.full_like(labels, self.model.null_class)])
        R, cfg = labels.shape[0], self.model.config
        d = cfg.hidden_size // cfg.num_heads
        self._cache = [tuple(torch.zeros(R, self.num_tokens + 1, cfg.num_heads, d, device=self.device, dtype=self.dtype)
                             for _ in range(2)) for _ in self.model.blocks]
        positions = torch.zeros(R, 1, dtype=torch.long, device=self.device)
        h = self.model.embed(labels, None) + self.model.pos_embed[:1]
        out = self._run(h, positions)
        self.lengths = torch.ones(R, dtype=torch.long)
        self._start = self.lengths.clone()
        return self._split(out, B)[:, 0]

    def checkpoint(self) -> None:
        """Mark the current lengths; ``rollback`` keeps a per-row number of items added since."""
        self._start = self.lengths.clone()

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Append tokens [B, L, C] (``valid`` [B, L] CPU bool: rows' real tokens, a prefix of each row) and
        return the conditions of the tokens that follow each of them, [B, L, G, D].

        Invalid places (finished rows) are computed at clamped positions and never kept.
        """
        B, L, _ = tokens.shape
        G = self.groups
        x = tokens.to(self.device, self.dtype).repeat(G, 1, 1)
        N = self.num_tokens
        positions = self.lengths.view(-1, 1) + torch.arange(L)
        valid_rows = valid.to(torch.bool).repeat(G, 1)
        if bool((positions[valid_rows] >= N).any()):
            raise ValueError(f"the block runs past the {N} tokens of a sample.")
        slots = torch.where(valid_rows, positions, N).to(self.device)
        h = self.model.embed(None, x, first_item=1) + self.model.pos_embed[positions.clamp_max(N - 1).to(self.device)]
        out = self._run(h, slots)
        self.lengths = self.lengths + valid.long().sum(-1).repeat(G)
        return self._split(out, B)

    def rollback(self, keep: torch.Tensor) -> None:
        """Keep the first ``keep[b]`` tokens appended since ``checkpoint`` in row b (LongTensor [B], CPU)."""
        self.lengths = torch.minimum(self.lengths, self._start + keep.repeat(self.groups))
        self._start = self.lengths.clone()

    def eps_fn(self, z: torch.Tensor):
        """The guided denoiser for conditions z [M, G, D], as ``fn(x [M, C], t) -> eps [M, C]``."""
        return lambda x, t: self.model.eps(x.to(self.dtype), t, z, self.guidance_scale).to(x.dtype)
