"""The bundled model zoo: local data (:mod:`.data`), CPU training recipes (:mod:`.recipes`,
``python -m mmspec.zoo.train``) and the shipped models (:mod:`.hub`).

The hub helpers are exported lazily, so ``import mmspec.zoo.data`` does not import diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_HUB_EXPORTS = (
    "load_vq",
    "encode_images",
    "decode_tokens",
    "codebook",
    "code_statistics",
    "load_classifier",
    "classify",
    "classify_grid",
    "features",
    "frechet_distance",
    "SceneClassifier",
    "weights_path",
)

__all__ = ["data", "hub", *_HUB_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in ("data", "hub", "recipes"):
        return importlib.import_module(f".{name}", __name__)
    if name in _HUB_EXPORTS:
        return getattr(importlib.import_module(".hub", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
