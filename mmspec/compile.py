"""``compile=True``: the window forward through ``torch.compile``, on the static KV cache.

The target's (and a draft model's) window forward over ``mmspec.models.static_cache`` has fixed shapes per window
size: the block is padded at the front to the next size in ``BUCKETS`` (padding places are holes, invisible to the
real ones), so a decode sees a handful of shapes, each compiled once (``dynamic=False``) and never recompiled per
step. On CUDA the mode is ``"reduce-overhead"``: one CUDA graph per window size, captured lazily on first use. The
prefill stays eager (one call per decode, prompt-length shapes).
"""

from __future__ import annotations

import torch

__all__ = ["BUCKETS", "bucket", "compile_window", "check_compile"]

#: window sizes the compiled forward is traced at (blocks are padded up to the next one)
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket(n: int) -> int:
    """The traced window size for a block of ``n`` places: the next of ``BUCKETS``, else a multiple of 128."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // 128) * 128


def check_compile() -> None:
    """Raise a clear error when ``torch.compile`` cannot be used here."""
    fn = getattr(torch, "compile", None)
    if fn is None or not callable(fn):
        raise RuntimeError(f"`compile=True` needs torch.compile (PyTorch >= 2.0); this PyTorch {torch.__version__} has "
                           "none. Use compile=False.")
    try:
        import torch._dynamo  # noqa: F401
    except Exception as err:  # a build without dynamo
        raise RuntimeError(f"`compile=True` needs torch.compile, which does not import here ({err}). Use "
                           "compile=False.") from err
    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError("`compile=True`: torch.compile is not supported on this Python / platform. Use "
                           "compile=False.")


def compile_window(fn, device: torch.device):
    """``fn`` (an adapter's window forward) through ``torch.compile``: static shapes, CUDA graphs on CUDA.

    The compiled function's outputs are cloned under CUDA graphs (the graph's output buffer is reused by the next
    replay, while the loop may still hold this step's logits).
    """
    check_compile()
    cuda = torch.device(device).type == "cuda"
    compiled = torch.compile(fn, dynamic=False, mode="reduce-overhead" if cuda else None)
    if not cuda:
        return compiled

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args).clone()

    return run
