"""What one fused verification step takes and returns, checked once for every backend.

``make_request`` validates the arguments of ``mmspec.kernels.verify_from_logits`` and bundles them into a
``VerifyRequest``; the torch reference (``reference.run``) and the Triton kernels (``triton_verify.run``)
both take that request, so the checks, the messages and the defaults live here only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import acceptance as _acceptance
from ..acceptance import GSD, Exact, Lantern
from ..sampling import Generator, LogitsPipeline, exponential, uniform

__all__ = ["VerifyRequest", "FusedVerifyOutput", "make_request", "draw_noise", "compute_dtype", "guided_logits",
           "fusable", "FUSED_CRITERIA"]

#: criteria the Triton kernels compute (exactly these classes: a subclass may change the math)
FUSED_CRITERIA = (Exact, Lantern, GSD)


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


class VerifyRequest(NamedTuple):
    """The checked inputs of one step (see ``make_request`` for their meaning and shapes)."""

    draft_tokens: torch.Tensor  # LongTensor [B, K]
    draft_probs: torch.Tensor | None  # [B, K, V] or None
    target_logits: torch.Tensor  # [B, K+1, V]
    uncond_logits: torch.Tensor | None  # [B, K+1, V] or None
    guidance_scale: float | None
    pipeline: LogitsPipeline  # temperature, top_k, top_p (no processors)
    greedy: bool | torch.Tensor  # True, False, or BoolTensor [B] on the logits' device
    u: torch.Tensor | None  # float64 [B, K]
    E: torch.Tensor | None  # float64 [B, V]
    criterion: _acceptance.Criterion
    return_probs: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, K, V)``."""
        B, K = self.draft_tokens.shape
        return B, K, self.target_logits.shape[-1]


def fusable(criterion) -> bool:
    """True when the Triton kernels compute ``criterion`` (``exact``, ``lantern``, ``gsd``)."""
    return type(_acceptance.get(criterion)) in FUSED_CRITERIA


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


def draw_noise(batch: int, window: int, vocab_size: int, generator: Generator = None, device=None, counts=None):
    """The noise ``mmspec.verify`` draws for one sampled step, in its order: ``u`` [B, K] then ``E`` [B, V].

    Feeding these to ``verify_from_logits`` reproduces ``verify`` with the same generator exactly. ``counts`` [B]:
    each row's own drafts, when some rows propose fewer than K (per-row generators draw only those, as ``verify``).
    """
    u = uniform((batch, window), generator, device, counts)
    E = exponential((batch, vocab_size), generator, device)
    return u, E


def _check_shapes(draft_tokens, draft_probs, target_logits, uncond_logits):
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
    if draft_probs is not None and (draft_probs.shape != (B, K, V) or not draft_probs.is_floating_point()):
        raise ValueError(
            f"`draft_probs` must be None or floating [B, K, V] = {(B, K, V)}, got {draft_probs.dtype} of shape "
            f"{tuple(draft_probs.shape)}."
        )
    if uncond_logits is not None and uncond_logits.shape != target_logits.shape:
        raise ValueError(
            f"`uncond_logits` must have the shape of `target_logits` {tuple(target_logits.shape)}, got "
            f"{tuple(uncond_logits.shape)}."
        )
    return B, K, V


def _check_criterion(criterion, V):
    criterion = _acceptance.get(criterion)
    if isinstance(criterion, GSD) and criterion._emb is None and math.isfinite(criterion.d_max):
        raise RuntimeError(
            "GSD with a finite `d_max` needs token embeddings: pass `embeddings=` (or `codebook=`) to the "
            "constructor or call `prepare(embeddings=..., image_token_offset=...)` before verifying."
        )
    if isinstance(criterion, Lantern):
        criterion._table_on(torch.device("cpu") if criterion._table is None else criterion._table.device, V)
    return criterion


def make_request(
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
    criterion="exact",
    return_probs: bool = False,
) -> VerifyRequest:
    """Check the inputs of one verification step from raw logits.

    Args:
        draft_tokens: LongTensor [B, K], the drafts ``x_1..x_K`` (K may be 0: plain sampling).
        draft_probs: [B, K, V] rows ``q`` the drafts were drawn from (already through the same pipeline), or
            None for deterministic drafts (one-hot ``q``).
        target_logits: [B, K+1, V] raw target scores for ``[anchor, x_1..x_K]`` (any float dtype; the pipeline
            computes in float32, or float64 for float64 logits). Structural forcing (allowed-token masks) is
            expected to be already applied as -inf; logits processors are not applied here.
        temperature, top_k, top_p: the ``LogitsPipeline`` settings (top-k keeps ties with the k-th score;
            top-p follows transformers: drop the low tail whose cumulative mass is <= 1 - top_p).
        greedy: True/False for the whole batch, or BoolTensor [B] mixing greedy rows (accept iff
            ``x_i == argmax``, emit the argmax of the guided logits) and sampled rows in one call.
        u: float64 [B, K] uniforms in (0, 1]: draft ``i`` is accepted iff ``u_i <= a_i`` (the criterion's
            acceptance probability). Not needed when ``greedy is True``.
        E: float64 [B, V] Exp(1) draws: the emitted token is ``argmax(w / E)`` over the residual (or bonus)
            weights ``w``. Not needed when ``greedy is True``. ``draw_noise`` draws both as ``verify`` does.
        guidance_scale, uncond_logits: classifier-free guidance ``u + s (c - u)`` on the raw logits, applied
            before everything else (both or neither).
        criterion: an acceptance criterion (name or object) for the sampled rows; the Triton kernels compute
            ``exact``, ``lantern`` and ``gsd`` (``fusable``), the torch reference any criterion.
        return_probs: also return the target rows ``p`` [B, K+1, V].

    Returns:
        a ``VerifyRequest``. Raises ValueError (RuntimeError for an unprepared relaxed criterion) otherwise.
    """
    B, K, V = _check_shapes(draft_tokens, draft_probs, target_logits, uncond_logits)
    pipeline = LogitsPipeline(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)  # its checks
    if (guidance_scale is None) != (uncond_logits is None):
        raise ValueError("`guidance_scale` and `uncond_logits` go together: pass both for guidance, or neither.")
    if uncond_logits is not None and (isinstance(guidance_scale, bool)
                                      or not isinstance(guidance_scale, (int, float))):
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
    criterion = _check_criterion(criterion, V)
    return VerifyRequest(draft_tokens.long(), draft_probs, target_logits, uncond_logits,
                         None if guidance_scale is None else float(guidance_scale), pipeline, greedy, u, E,
                         criterion, bool(return_probs))
