"""Shared benchmark helpers: timing with medians, result tables, JSON/markdown output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

__all__ = ["timed", "median_time", "write_report", "environment", "markdown_table"]


def _sync(device=None):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """Run ``fn()`` once; return (result, seconds)."""
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def median_time(fn, repeats: int, warmup: int = 1):
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs; returns (last result, median, all)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        out, t = timed(fn)
        times.append(t)
    return out, statistics.median(times), times


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows of dicts -> markdown; columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("" if v is None else (format(v, fmt) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out_dir, name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{name}.json", out / f"{name}.md"
    js.write_text(json.dumps(payload, indent=2, default=str))
    md.write_text(markdown)
    return js, md
