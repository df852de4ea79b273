"""Fused GPU verification kernels (Triton) and the torch reference they must match.

>>> import torch
>>> from mmspec.kernels import verify_from_logits, draw_noise
>>> B, K, V, g = 2, 3, 8, torch.Generator().manual_seed(0)
>>> drafts = torch.randint(0, V, (B, K), generator=g)                      # [B, K]
>>> draft_probs = torch.softmax(torch.randn(B, K, V, generator=g), -1)      # [B, K, V], the rows drafts came from
>>> target_logits = torch.randn(B, K + 1, V, generator=g)                  # [B, K + 1, V]
>>> u, E = draw_noise(B, K, V, g)                                          # the draws mmspec.verify would make
>>> n, tokens, next_token, probs = verify_from_logits(
...     drafts, draft_probs, target_logits, temperature=0.8, top_k=5, greedy=False, u=u, E=E)
>>> n.shape, tokens.shape, next_token.shape
(torch.Size([2]), torch.Size([2, 4]), torch.Size([2]))

``verify_from_logits`` runs the Triton kernels for CUDA tensors (when triton imports) and the torch
reference elsewhere; ``backend=`` or ``MMSPEC_KERNELS=auto|triton|torch`` forces either. Triton itself is
imported lazily, only when the Triton backend is used. ``exact``, ``lantern`` and ``gsd`` are fused (other
criteria run on the reference). The decoding loop uses the fused step through ``decode_step.fused_verifier``:
``mmspec.generate(..., kernels="auto"|"triton"|"torch")`` and the image pipeline's ``kernels=`` pass it on.
"""

from .dispatch import BACKENDS, ENV_VAR, resolve_backend, triton_available, verify_from_logits
from .request import FusedVerifyOutput, VerifyRequest, draw_noise, fusable, make_request

__all__ = [
    "verify_from_logits",
    "make_request",
    "draw_noise",
    "fusable",
    "FusedVerifyOutput",
    "VerifyRequest",
    "resolve_backend",
    "triton_available",
    "BACKENDS",
    "ENV_VAR",
]
