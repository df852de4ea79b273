"""``compile=True``: the window forward through ``torch.compile``, on the static KV cache.

The target's (and a draft model's) window forward over ``mmspec.models.static_cache`` has fixed shapes per window
size: the block is padded at the front to the next size in ``BUCKETS`` (padding places are holes, invisible to the
real ones), so a decode sees a handful of shapes, each compiled once (``dynamic=False``) and never recompiled per
step. On CUDA the mode is ``"reduce-overhead"``: one CUDA graph per window size, captured lazily on first use. The
prefill stays eager (one call per decode, prompt-length shapes).

``MMSPEC_COMPILE_BACKEND`` picks another ``torch.compile`` backend (e.g. ``aot_eager``: traced, not code-generated,
which the tests use to check tracing and recompiles in seconds).
"""

from __future__ import annotations

import importlib
import os

import torch

__all__ = ["BUCKETS", "bucket", "cache_options", "compile_window", "check_compile"]

#: window sizes the compiled forward is traced at (blocks are padded up to the next one)
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket(n: int) -> int:
    """The traced window size for a block of ``n`` places: the next of ``BUCKETS``, else a multiple of 128."""
    for b in BUCKETS:
        if n <= b:
            return b
    return -(-n // 128) * 128


def cache_options(cache: str | None, compile: bool, reserve: int) -> dict:
    """Check ``cache=`` / ``compile=`` as ``generate`` and the pipelines take them -> the adapter's keyword
    arguments (empty for the default dynamic cache). ``cache=None`` means static when compiling, else dynamic;
    ``reserve``: new columns the static cache keeps after the prompt."""
    from .models.causal_lm import CACHE_KINDS

    if not isinstance(compile, bool):
        raise ValueError(f"`compile` must be True or False, got {compile!r}.")
    if cache is None:
        cache = "static" if compile else "dynamic"
    if cache not in CACHE_KINDS:
        raise ValueError(f"`cache` must be one of {list(CACHE_KINDS)} or None, got {cache!r}.")
    if compile and cache != "static":
        raise ValueError("`compile=True` needs cache='static' (or cache=None): a growing cache changes shapes every "
                         "step, which would recompile every step.")
    if compile:
        check_compile()
    return {} if cache == "dynamic" else dict(cache=cache, compile=compile, reserve=int(reserve))


def check_compile() -> None:
    """Raise a clear error when ``torch.compile`` cannot be used here."""
    fn = getattr(torch, "compile", None)
    if fn is None or not callable(fn):
        raise RuntimeError(f"`compile=True` needs torch.compile (PyTorch >= 2.0); this PyTorch {torch.__version__} has "
                           "none. Use compile=False.")
    try:
        dynamo = importlib.import_module("torch._dynamo")
    except Exception as err:  # a build without dynamo
        raise RuntimeError(f"`compile=True` needs torch.compile, which does not import here ({err}). Use "
                           "compile=False.") from err
    if not dynamo.is_dynamo_supported():
        raise RuntimeError("`compile=True`: torch.compile is not supported on this Python / platform. Use "
                           "compile=False.")


def compile_window(fn, device: torch.device):
    """``fn`` (an adapter's window forward) through ``torch.compile``: static shapes, CUDA graphs on CUDA.

    The compiled function's outputs are cloned under CUDA graphs (the graph's output buffer is reused by the next
    replay, while the loop may still hold this step's logits).
    """
    check_compile()
    import torch._dynamo

    # Every adapter's window forward is one code object: the target, a draft model and each window size are
    # separate entries of its compile cache, more than dynamo's default limit of 8.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    cuda = torch.device(device).type == "cuda"
    backend = os.environ.get("MMSPEC_COMPILE_BACKEND", "inductor")
    mode = "reduce-overhead" if cuda and backend == "inductor" else None
    compiled = torch.compile(fn, dynamic=False, backend=backend, mode=mode)
    if not cuda:
        return compiled

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args).clone()

    return run
