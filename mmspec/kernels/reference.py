"""The torch reference of the fused verification step: raw logits in, accepted drafts and emitted token out.

``verify_from_logits`` is, by construction and by test, the composition the decoding loop runs today:
optional classifier-free guidance, then ``LogitsPipeline.probs`` (temperature -> top-k -> top-p -> softmax),
then ``mmspec.verify(..., criterion="exact")``, with the random draws passed in as tensors instead of drawn
from a generator. Given the ``u`` and ``E`` that ``verify`` would draw from a generator (``u`` first, then
``E``; see ``draw_noise``), both return the same tokens bit for bit. The Triton kernels in
``triton_verify.py`` compute the same function in one pass over the logits; this file is what they are
tested against and what runs where Triton does not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import acceptance as _acceptance
from ..sampling import Generator, LogitsPipeline, exponential, uniform
from ..verify import _pack, _row

__all__ = ["FusedVerifyOutput", "verify_from_logits", "draw_noise", "compute_dtype", "guided_logits"]


class FusedVerifyOutput(NamedTuple):
    """Result of one fused verification step (a tuple, so it unpacks as ``n, tokens, nxt, probs = ...``).

    Attributes:
        num_accepted: LongTensor [B], accepted drafts per row (0..K).
        tokens: LongTensor [B, K+1]: the accepted drafts, then the correction (or bonus) token, then -1.
        next_token: LongTensor [B], equal to ``tokens[b, num_accepted[b]]``.
        target_probs: [B, K+1, V] rows ``p`` after the logits pipeline (float32, or float64 for float64
            logits) when ``return_probs=True``, else None. Jacobi decoding keeps them as the next ``q``.
    """

    num_accepted: torch.Tensor
    tokens: torch.Tensor
    next_token: torch.Tensor
    target_probs: torch.Tensor | None


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype the pipeline computes in: float64 for float64 logits, float32 otherwise (as ``LogitsPipeline``)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def guided_logits(target_logits, uncond_logits=None, guidance_scale=None):
    """Classifier-free guidance ``u + s (c - u)`` in the compute dtype; the logits unchanged without it."""
    if uncond_logits is None:
        return target_logits
    dtype = compute_dtype(target_logits)
    unc = uncond_logits.to(dtype)
    return unc + guidance_scale * (target_logits.to(dtype) - unc)


def draw_noise(batch: int, window: int, vocab_size: int, generator: Generator = None, device=None):
    """The noise ``mmspec.verify`` draws for one sampled step, in its order: ``u`` [B, K] then ``E`` [B, V].

    Feeding these to ``verify_from_logits`` reproduces ``verify`` with the same generator exactly.
    """
    u = uniform((batch, window), generator, device)
    E = exponential((batch, vocab_size), generator, device)
    return u, E


def check_inputs(draft_tokens, draft_probs, target_logits, *, temperature, top_k, top_p, greedy, u, E,
                 guidance_scale, uncond_logits):
    """Validate the arguments shared by every backend; returns the per-row greedy mask (BoolTensor [B]) or a bool."""
    if draft_tokens.dim() != 2 or draft_tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"`draft_tokens` must be an integer tensor [B, K], got {draft_tokens.dtype} of shape "
            f"{tuple(draft_tokens.shape)}."
        )
    B, K = draft_tokens.shape
    if target_logits.dim() != 3 or target_logits.shape[:2] != (B, K + 1) or not target_logits.is_floating_point():
        raise ValueError(
            f"`target_logits` must be floating [B, K+1, V] = [{B}, {K + 1}, V], got {target_logits.dtype} of shape "
            f"{tuple(target_logits.shape)}."
        )
    V = target_logits.shape[-1]
    if draft_probs is not None and draft_probs.shape != (B, K, V):
        raise ValueError(
            f"`draft_probs` must be None or [B, K, V] = {(B, K, V)}, got shape {tuple(draft_probs.shape)}."
        )
    # Reuse the pipeline's own checks so the messages match everywhere.
    LogitsPipeline(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    if (guidance_scale is None) != (uncond_logits is None):
        raise ValueError("`guidance_scale` and `uncond_logits` go together: pass both for guidance, or neither.")
    if uncond_logits is not None:
        if uncond_logits.shape != target_logits.shape:
            raise ValueError(
                f"`uncond_logits` must have the shape of `target_logits` {tuple(target_logits.shape)}, got "
                f"{tuple(uncond_logits.shape)}."
            )
        if not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"`guidance_scale` must be a number, got {guidance_scale!r}.")
    if isinstance(greedy, torch.Tensor):
        if greedy.shape != (B,) or greedy.dtype != torch.bool:
            raise ValueError(f"`greedy` must be a bool or a BoolTensor [B] = [{B}], got {greedy.dtype} "
                             f"of shape {tuple(greedy.shape)}.")
        greedy = greedy.to(target_logits.device)
    elif not isinstance(greedy, bool):
        raise ValueError(f"`greedy` must be a bool or a BoolTensor [B], got {type(greedy).__name__}.")
    if greedy is not True:  # some row samples: the noise is needed
        if u is None or u.shape != (B, K) or u.dtype != torch.float64:
            raise ValueError(f"`u` must be float64 [B, K] = [{B}, {K}] uniforms in (0, 1], got "
                             f"{None if u is None else (u.dtype, tuple(u.shape))}.")
        if E is None or E.shape != (B, V) or E.dtype != torch.float64:
            raise ValueError(f"`E` must be float64 [B, V] = [{B}, {V}] Exp(1) draws, got "
                             f"{None if E is None else (E.dtype, tuple(E.shape))}.")
    return greedy


def _greedy_step(draft_tokens, scores):
    best = scores.argmax(-1)  # [B, K+1]
    K = draft_tokens.shape[1]
    num_accepted = (draft_tokens.long() == best[:, :K]).long().cumprod(-1).sum(-1)
    return num_accepted, best.gather(1, num_accepted.unsqueeze(1)).squeeze(1)


def _sampled_step(draft_tokens, draft_probs, target_probs, u, E):
    """``mmspec.verify``'s exact branch with its two draws (``u``, then ``E``) given as tensors."""
    exact = _acceptance.get("exact")
    draft_tokens = draft_tokens.long()
    K = draft_tokens.shape[1]
    ratio = exact.acceptance(draft_tokens, draft_probs, target_probs[:, :K])
    num_accepted = (u <= ratio.to(torch.float64)).long().cumprod(-1).sum(-1)
    p_n = _row(target_probs, num_accepted)  # the residual's row at a rejection, p_{K+1} otherwise
    if K > 0:
        at = num_accepted.clamp(max=K - 1)
        x_n = _row(draft_tokens, at)
        q_n = None if draft_probs is None else _row(draft_probs, at)
        weights = exact.residual(x_n, q_n, p_n)
        empty = weights.sum(-1, keepdim=True) <= 0
        rejected = (num_accepted < K).unsqueeze(1)
        weights = torch.where(rejected & ~empty, weights, p_n)
    else:
        weights = p_n
    return num_accepted, (weights.to(torch.float64) / E).argmax(-1)


def verify_from_logits(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy=False,
    u: torch.Tensor | None = None,
    E: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    uncond_logits: torch.Tensor | None = None,
    return_probs: bool = False,
) -> FusedVerifyOutput:
    """Exact speculative verification from raw target logits (torch reference).

    Args:
        draft_tokens: LongTensor [B, K], the drafts ``x_1..x_K`` (K may be 0: plain sampling).
        draft_probs: [B, K, V] rows ``q`` the drafts were drawn from (already through the same pipeline), or
            None for deterministic drafts (one-hot ``q``).
        target_logits: [B, K+1, V] raw target scores for ``[anchor, x_1..x_K]`` (any float dtype; the pipeline
            computes in float32, or float64 for float64 logits). Structural forcing (allowed-token masks) is
            expected to be already applied as -inf.
        temperature, top_k, top_p: the ``LogitsPipeline`` settings (top-k keeps ties with the k-th score;
            top-p follows transformers: drop the low tail whose cumulative mass is <= 1 - top_p).
        greedy: True/False for the whole batch, or BoolTensor [B] mixing greedy rows (accept iff
            ``x_i == argmax``, emit the argmax of the guided logits) and sampled rows in one call.
        u: float64 [B, K] uniforms in (0, 1]: draft ``i`` is accepted iff ``u_i <= min(1, p_i(x_i)/q_i(x_i))``.
            Not needed when ``greedy is True``.
        E: float64 [B, V] Exp(1) draws: the emitted token is ``argmax(w / E)`` over the residual (or bonus)
            weights ``w``. Not needed when ``greedy is True``. ``draw_noise`` draws both as ``verify`` does.
        guidance_scale, uncond_logits: classifier-free guidance ``u + s (c - u)`` on the raw logits, applied
            before everything else (both or neither).
        return_probs: also return the target rows ``p`` [B, K+1, V].

    Returns:
        FusedVerifyOutput ``(num_accepted [B], tokens [B, K+1], next_token [B], target_probs or None)``.
    """
    greedy = check_inputs(draft_tokens, draft_probs, target_logits, temperature=temperature, top_k=top_k,
                          top_p=top_p, greedy=greedy, u=u, E=E, guidance_scale=guidance_scale,
                          uncond_logits=uncond_logits)
    scores = guided_logits(target_logits, uncond_logits, guidance_scale)
    pipeline = LogitsPipeline(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    probs = pipeline.probs(scores) if (return_probs or greedy is not True) else None

    if greedy is True:
        num_accepted, next_token = _greedy_step(draft_tokens, scores)
    elif greedy is False:
        num_accepted, next_token = _sampled_step(draft_tokens, draft_probs, probs, u, E)
    else:  # both kinds of rows in one batch: compute both, keep each row's own (no host sync)
        n_g, t_g = _greedy_step(draft_tokens, scores)
        n_s, t_s = _sampled_step(draft_tokens, draft_probs, probs, u, E)
        num_accepted, next_token = torch.where(greedy, n_g, n_s), torch.where(greedy, t_g, t_s)
    tokens = _pack(draft_tokens.long(), num_accepted, next_token)
    return FusedVerifyOutput(num_accepted, tokens, next_token, probs if return_probs else None)
