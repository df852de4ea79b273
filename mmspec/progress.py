"""Progress output: bars on a terminal only, none while loading weights.

Logs, CI output and servers are not terminals: there a tqdm bar writes hundreds of carriage-return updates.
mmspec's bars default to tqdm's ``disable=None`` (shown only when the stream is a terminal) unless the caller
asks (``progress=True``, ``set_progress_bar_config(disable=False)``); transformers' and diffusers' own bars
("Loading weights", "Loading pipeline components") are switched off while mmspec loads a model.
"""

from __future__ import annotations

import contextlib
import functools

__all__ = ["quiet_loading", "TerminalProgressMixin"]


@contextlib.contextmanager
def _quiet():
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (t_logging, d_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was_enabled in states:
            if was_enabled:
                lib.enable_progress_bar()


def quiet_loading(fn):
    """Decorator: run a loader with transformers' and diffusers' progress bars off (restored afterwards)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _quiet():
            return fn(*args, **kwargs)

    return wrapper


def _rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TerminalProgressMixin:
    """For ``DiffusionPipeline`` subclasses: the step bar shows on a terminal only (tqdm's ``disable=None``) and
    on the first process, unless ``set_progress_bar_config`` sets ``disable`` (``disable=False`` forces it)."""

    def progress_bar(self, iterable=None, total=None):
        from tqdm.auto import tqdm

        config = dict(getattr(self, "_progress_bar_config", None) or {})
        if "disable" not in config:
            config["disable"] = None if _rank_zero() else True
        if iterable is None and total is None:
            raise ValueError("Either `total` or `iterable` has to be defined.")
        return tqdm(iterable, total=total, **config)
