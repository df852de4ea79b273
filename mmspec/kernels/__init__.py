"""Fused GPU verification kernels (Triton) and the torch reference they must match.

>>> from mmspec.kernels import verify_from_logits, draw_noise
>>> u, E = draw_noise(B, K, V, generator, device)          # the draws mmspec.verify would make
>>> n, tokens, next_token, probs = verify_from_logits(
...     drafts, draft_probs, target_logits, temperature=0.8, top_k=50, greedy=False, u=u, E=E)

``verify_from_logits`` runs the Triton kernels for CUDA tensors (when triton imports) and the torch
reference elsewhere; ``backend=`` or ``MMSPEC_KERNELS=auto|triton|torch`` forces either. Triton itself is
imported lazily, only when the Triton backend is used.
"""

from .dispatch import BACKENDS, ENV_VAR, resolve_backend, triton_available, verify_from_logits
from .reference import FusedVerifyOutput, draw_noise

__all__ = [
    "verify_from_logits",
    "draw_noise",
    "FusedVerifyOutput",
    "resolve_backend",
    "triton_available",
    "BACKENDS",
    "ENV_VAR",
]
