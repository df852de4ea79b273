"""The transformers differences mmspec meets between the versions pyproject allows (5.x).

transformers renamed the KV cache of ``forward`` and of model outputs from ``past_key_values`` to ``cache``
(5.2x; the old name still works there but logs a deprecation warning on every use). mmspec passes and reads
the cache through these helpers, which use the name the installed model actually has: the keyword a
``forward`` declares, the field an output class declares. Nothing here depends on a version number, so the
same code is right on 5.0 (only ``past_key_values`` exists) and on the versions that renamed it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

__all__ = ["cache_keyword", "output_cache", "make_output"]


@functools.cache
def _forward_keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_keyword(module) -> str:
    """``"cache"`` when ``module.forward`` declares it (recent transformers), else ``"past_key_values"``.

    Checked on the class's ``forward`` once per class (the signature does not change between calls).
    """
    forward = getattr(type(module), "forward", None) or module.forward
    return _forward_keyword(forward)


def output_cache(out):
    """The cache a model output carries (its ``cache`` field, or ``past_key_values`` on older versions), or None.

    Reads the field the output class declares, so it never goes through the renamed attribute's warning.
    """
    names = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set()
    return getattr(out, "cache" if "cache" in names else "past_key_values", None)


def make_output(cls, **fields):
    """Build a transformers output ``cls`` with ``cache=`` given as ``past_key_values=`` or ``cache=``, under the
    field name ``cls`` declares (so constructing it logs no deprecation warning)."""
    names = {f.name for f in dataclasses.fields(cls)}
    for old, new in (("past_key_values", "cache"), ("cache", "past_key_values")):
        if old in fields and old not in names and new in names:
            fields[new] = fields.pop(old)
    return cls(**fields)
