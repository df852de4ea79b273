"""Pick the implementation of ``verify_from_logits``: the Triton kernels on CUDA, the torch reference elsewhere.

Both compute the same function of the same inputs (the noise ``u``, ``E`` is an input, so the random
streams are identical); see ``triton_verify``'s docstring for where the last bits may differ.
"""

from __future__ import annotations

import functools
import os

import torch

from . import reference
from .request import FusedVerifyOutput, fusable, make_request

__all__ = ["verify_from_logits", "resolve_backend", "triton_available", "BACKENDS", "ENV_VAR"]

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MMSPEC_KERNELS"


@functools.cache
def _triton_module():
    """The kernel module, or the ImportError that keeps it from loading (cached: triton imports once)."""
    try:
        from . import triton_verify
    except ImportError as err:  # triton missing or broken on this machine
        return err
    return triton_verify


def triton_available() -> bool:
    """True when ``triton`` imports and the kernels compile or interpret on this machine."""
    return not isinstance(_triton_module(), ImportError)


def resolve_backend(backend: str = "auto", device=None) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``.

    An explicit ``backend`` other than ``"auto"`` wins; with ``"auto"`` the ``MMSPEC_KERNELS`` environment
    variable (``auto``/``triton``/``torch``) decides; ``auto`` means Triton for CUDA tensors when it
    imports, the torch reference otherwise. Triton is imported only when it may be used.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {backend!r}.")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        module = _triton_module()
        if isinstance(module, ImportError):
            raise RuntimeError(f"the triton backend was requested but triton does not import: {module}")
        if device.type != "cuda" and not module.INTERPRETED:
            raise RuntimeError(
                f"the triton backend was requested for {device.type} tensors; Triton runs on the CPU only in "
                "its interpreter: set TRITON_INTERPRET=1 before triton is first imported, or use backend='torch'."
            )
    return backend


def verify_from_logits(draft_tokens, draft_probs, target_logits, *, backend: str = "auto",
                       **settings) -> FusedVerifyOutput:
    """Speculative verification from raw logits, fused on GPUs.

    Guidance ``u + s (c - u)`` -> temperature -> top-k -> top-p -> softmax -> accept each draft with
    ``u_i <= a_i`` left to right (``a_i = min(1, p_i(x_i) / q_i(x_i))`` for ``exact``; the neighbour-moved or
    group masses for ``lantern`` / ``gsd``) -> emit ``argmax(w / E)`` over the criterion's residual at the
    first rejection, or over ``p_{K+1}`` (bonus) when all K are accepted. Greedy rows accept iff
    ``x_i == argmax`` and emit the argmax.

    Args:
        draft_tokens: [B, K] drafts; draft_probs: [B, K, V] or None; target_logits: [B, K+1, V].
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``; with ``"auto"``
            the ``MMSPEC_KERNELS`` environment variable may force either. A criterion the kernels do not
            compute (``fusable``) runs on the torch reference under ``"auto"`` and raises under ``"triton"``.
        **settings: the keyword arguments of ``mmspec.kernels.make_request`` (temperature, top_k, top_p,
            greedy, u, E, guidance_scale, uncond_logits, criterion, return_probs), checked there.

    Returns:
        FusedVerifyOutput ``(num_accepted [B], tokens [B, K+1] -1 padded, next_token [B],
        target_probs [B, K+1, V] or None)``.
    """
    request = make_request(draft_tokens, draft_probs, target_logits, **settings)
    if resolve_backend(backend, target_logits.device) == "triton":
        if fusable(request.criterion):
            return _triton_module().run(request)
        if backend == "triton":
            raise ValueError(f"the Triton kernels do not compute the {request.criterion.name!r} criterion; "
                             "use backend='torch' (or 'auto').")
    return reference.run(request)
