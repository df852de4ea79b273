"""Shared benchmark helpers: timing with medians, result tables, JSON/markdown output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

__all__ = ["timed", "median_time", "write_report", "environment", "markdown_table", "default_threads",
           "interleaved_times", "speedup_summary"]


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


def default_threads(limit: int = 4) -> int:
    """A torch thread count that does not oversubscribe the CPU: the cores this process may run on, minus the
    load other processes already put on them (1-minute load average, rounded), capped at ``limit`` (the zoo's
    small models gain nothing from more), at least 1. On a busy machine torch's default (one thread per core)
    makes a run 20-40x slower whenever the cores are taken, which turns speed comparisons into noise."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(round(os.getloadavg()[0]))
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(limit, cpus - busy))


def interleaved_times(runs: dict, repeats: int = 3, warmup: int = 1):
    """Time several ways of doing the same work fairly: ``warmup`` untimed calls of each, then ``repeats``
    rounds that call each once, alternating the order every round (drift and caches hit all alike).

    Args:
        runs: name -> ``fn()`` returning ``(result, seconds)``.
    Returns:
        ``(results, times)``: the last result and the list of ``repeats`` times per name.
    """
    names = list(runs)
    results = {}
    for _ in range(warmup):
        for name in names:
            results[name] = runs[name]()[0]
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            results[name], t = runs[name]()
            times[name].append(t)
    return results, times


def paired_ratio(base_times: list[float], times: list[float]) -> float:
    """Speed of a method relative to ``base``: the median over repeats of ``base_i / t_i``, with both timed in the same
    round of an interleaved run (a shared or throttled machine slows a whole round: the pair moves together, a
    ratio of the two medians would mix rounds)."""
    if len(base_times) != len(times):
        raise ValueError(f"paired timings need as many repeats on both sides, got {len(base_times)} and {len(times)}")
    return statistics.median(b / t for b, t in zip(base_times, times))


def speedup_summary(times: dict, base: str, other: str) -> str:
    """One line: median times, the ratio of the medians and the spread of the per-round ratios."""
    ratios = [b / o for b, o in zip(times[base], times[other])]
    mb, mo = statistics.median(times[base]), statistics.median(times[other])
    return (f"wall-clock speedup vs {base}: {mb / mo:.2f}x (median of {len(ratios)} interleaved runs after a "
            f"warm-up; per-run ratios {min(ratios):.2f}-{max(ratios):.2f}x; {base} {mb:.2f}s "
            f"[{min(times[base]):.2f}-{max(times[base]):.2f}], {other} {mo:.2f}s "
            f"[{min(times[other]):.2f}-{max(times[other]):.2f}])")


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


def add_ratios(rows: list[dict]) -> list[dict]:
    """Set each row's ``speedup_vs_ar`` (AR's median seconds over its own) and ``compression_vs_sjd`` (its step
    compression over SJD as published), where the run has an "AR" / "SJD (random ..." row. Returns ``rows``."""
    ar = next((r for r in rows if r["method"] == "AR"), None)
    sjd = next((r for r in rows if r["method"].startswith("SJD (random")), None)
    for r in rows:
        if ar:
            r["speedup_vs_ar"] = ar["median_s"] / r["median_s"]
        if sjd:
            r["compression_vs_sjd"] = r["step_compression"] / sjd["step_compression"]
    return rows
