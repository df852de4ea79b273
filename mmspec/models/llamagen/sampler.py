"""LlamaGen's reference sampler (``autoregressive/models/generate.py`` semantics): one token per forward.

The baseline the speculative paths are tested against: prefill of the condition, then one token per step, with
classifier-free guidance on a doubled batch (conditional rows first, unconditional rows second).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compat import output_cache
from .gpt import LlamaGenGPT

__all__ = ["top_k_top_p_filtering", "llamagen_sample", "llamagen_generate"]


def top_k_top_p_filtering(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 1.0,
    filter_value: float = -float("inf"),
    min_tokens_to_keep: int = 1,
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
