"""The torch reference of the fused verification step: raw logits in, accepted drafts and emitted token out.

``run`` is, by construction and by test, the composition the decoding loop runs on the CPU: optional
classifier-free guidance, then ``LogitsPipeline.probs`` (temperature -> top-k -> top-p -> softmax), then
``mmspec.verify(..., criterion)``, with the random draws passed in as tensors instead of drawn from a
generator. Given the ``u`` and ``E`` that ``verify`` would draw from a generator (``u`` first, then ``E``; see
``draw_noise``), both return the same tokens bit for bit: they share ``verify``'s step functions. The Triton
kernels in ``triton_verify.py`` compute the same function in one pass over the logits; this file is what they
are tested against and what runs where Triton does not.
"""

from __future__ import annotations

import torch

from ..verify import _pack, greedy_step, sampled_step
from .request import FusedVerifyOutput, VerifyRequest, guided_logits

__all__ = ["run"]


def run(request: VerifyRequest) -> FusedVerifyOutput:
    """One verification step from raw logits with torch ops (see ``make_request`` for the inputs).

    Returns:
        FusedVerifyOutput ``(num_accepted [B], tokens [B, K+1], next_token [B], target_probs or None)``.
    """
    r = request
    greedy = r.greedy
    scores = guided_logits(r.target_logits, r.uncond_logits, r.guidance_scale)
    probs = r.pipeline.probs(scores) if (r.return_probs or greedy is not True) else None

    def sampled():
        _, n, token = sampled_step(r.draft_tokens, r.draft_probs, probs, r.criterion, lambda shape: r.u,
                                   lambda weights: (weights.to(torch.float64) / r.E).argmax(-1))
        return n, token

    if greedy is True:
        _, num_accepted, next_token = greedy_step(r.draft_tokens, scores)
    elif greedy is False:
        num_accepted, next_token = sampled()
    else:  # both kinds of rows in one batch: compute both, keep each row's own (no host sync)
        _, n_g, t_g = greedy_step(r.draft_tokens, scores)
        n_s, t_s = sampled()
        num_accepted, next_token = torch.where(greedy, n_g, n_s), torch.where(greedy, t_g, t_s)
    tokens = _pack(r.draft_tokens, num_accepted, next_token)
    return FusedVerifyOutput(num_accepted, tokens, next_token, probs if r.return_probs else None)
