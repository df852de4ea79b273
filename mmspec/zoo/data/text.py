"""Text corpus: the Python standard library's own source."""

from __future__ import annotations

import os
import sysconfig

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _stdlib_files() -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("test_"):
                full = os.path.join(dirpath, f)
                files.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    files.sort()
    return files


def stdlib_corpus(max_chars: int | None = None) -> str:
    """The Python standard library's ``.py`` sources, sorted by relative path and joined by a
    blank line; test directories, ``test_*.py`` and site-packages are skipped. Truncated to
    ``max_chars`` if given. Deterministic for a given Python installation (~12M characters for
    CPython 3.11)."""
    parts: list[str] = []
    total = 0
    for _, full in _stdlib_files():
        with open(full, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        parts.append(text)
        total += len(text) + 2
        if max_chars is not None and total >= max_chars:
            break
    out = "\n\n".join(parts)
    return out if max_chars is None else out[:max_chars]


def text_corpus_splits(max_chars: int | None = None, val_fraction: float = 0.05) -> tuple[str, str]:
    """``(train, val)`` split of :func:`stdlib_corpus`: the last ``val_fraction`` of the text is
    validation, cut at a line boundary."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    text = stdlib_corpus(max_chars)
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.rfind("\n", 0, cut)
    if nl > 0:
        cut = nl + 1
    return text[:cut], text[cut:]
