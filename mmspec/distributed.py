"""Data-parallel generation over ``torch.distributed``: shard a prompt list by rank, resume, merge stats.

Launch any script built on :func:`run_sharded` with ``torchrun`` (or ``accelerate launch``)::

    torchrun --nproc_per_node 4 samples/generate_image.py --model zoo --prompt-file prompts.txt --out outputs/run1

Every item has a global index and a deterministic seed (``seed + index``), so what an item produces does not
depend on the number of processes or on which process ran it: a 4-process run writes the same files as a
1-process run. Each finished item leaves a record ``records/NNNNNN.json`` next to its outputs; a rerun skips
items whose record says ``ok`` (failed items are retried), so a crashed or pre-empted job is resumed by
starting it again. A failure inside one item is caught and recorded (with the error) instead of stopping the
process. After a barrier, rank 0 merges every record into ``stats.json``.

Without ``torchrun`` (no ``RANK`` / ``WORLD_SIZE`` in the environment) everything runs in one process.
The gloo backend is used on CPUs, nccl when each rank has a GPU.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DistContext", "init_distributed", "shard_indices", "run_sharded", "merge_records", "read_prompt_file"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` and the device it should compute on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # True when this call set up a process group that must be torn down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialized and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(backend: str | None = None, device: str | None = None) -> DistContext:
    """Join the process group described by torchrun's environment variables (or run alone).

    Args:
        backend: ``"gloo"`` / ``"nccl"``; default nccl when CUDA is available, else gloo.
        device: force a device (``"cpu"``); default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torch.distributed environment: RANK={rank}, WORLD_SIZE={world}")
    cuda = torch.cuda.is_available() and device in (None, "cuda")
    dev = torch.device(device) if device not in (None, "cuda") else (
        torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    initialized = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"),
                                             rank=rank, world_size=world)
        initialized = True
    return DistContext(rank, world, local, dev, initialized)


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Round-robin share of ``range(n)`` for ``rank``: ``[rank, rank + world, ...]`` (balanced to one item)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    return list(range(rank, n, world_size))


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line; '#' starts a comment)")
    return prompts


def _record_path(out: Path, index: int) -> Path:
    return out / "records" / f"{index:06d}.json"


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)  # atomic: a killed process never leaves a half-written record


def run_sharded(
    items: Sequence[Any],
    process_batch: Callable[[list[int], list[Any]], list[dict]],
    out_dir: str | os.PathLike,
    ctx: DistContext | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict | None:
    """Run ``process_batch`` over this rank's share of ``items``, resumably; rank 0 returns the merged stats.

    Args:
        items: the whole list (every rank passes the same list).
        process_batch: ``(indices, items) -> one record dict per item``; it writes the item's outputs itself
            (named by global index) and returns JSON-able facts (stats, file names). If it raises, the batch is
            retried item by item so that only the failing items are recorded as failed.
        out_dir: folder for outputs, ``records/`` and ``stats.json``.
        ctx: from :func:`init_distributed` (default: a single process).
        batch_size: items per ``process_batch`` call.
    Returns:
        On rank 0 the merged summary (also written to ``out_dir/stats.json``); None elsewhere.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ctx = ctx or DistContext()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = shard_indices(len(items), ctx.rank, ctx.world_size)
    todo = [i for i in mine if not _done(out, i)]
    skipped = len(mine) - len(todo)
    bar = tqdm(total=len(todo), desc=f"rank {ctx.rank}", disable=not progress, position=ctx.rank)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        for index, record in zip(chunk, _process(process_batch, chunk, [items[i] for i in chunk])):
            record = {"index": index, "rank": ctx.rank, **record}
            _write_json(_record_path(out, index), record)
        bar.update(len(chunk))
    bar.close()
    ctx.barrier()
    if not ctx.is_main:
        return None
    summary = merge_records(out, len(items))
    summary.update(world_size=ctx.world_size, skipped_on_rank0=skipped)
    _write_json(out / "stats.json", summary)
    return summary


def _done(out: Path, index: int) -> bool:
    path = _record_path(out, index)
    try:
        return json.loads(path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def _process(fn, indices, batch) -> list[dict]:
    t0 = time.perf_counter()
    try:
        records = fn(indices, batch)
        if len(records) != len(indices):
            raise RuntimeError(f"process_batch returned {len(records)} records for {len(indices)} items")
        seconds = (time.perf_counter() - t0) / len(indices)
        return [{"status": "ok", "seconds": seconds, **r} for r in records]
    except Exception:
        if len(indices) > 1:  # isolate the failing item(s)
            return [r for i, item in zip(indices, batch) for r in _process(fn, [i], [item])]
        return [{"status": "failed", "error": traceback.format_exc(limit=3).strip().splitlines()[-1]}]


def merge_records(out_dir: str | os.PathLike, n: int) -> dict:
    """Summarise ``records/*.json`` of an ``n``-item run: counts, failures, and sums of numeric ``stats``."""
    out = Path(out_dir)
    records, missing = [], []
    for i in range(n):
        try:
            records.append(json.loads(_record_path(out, i).read_text()))
        except (OSError, ValueError):
            missing.append(i)
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [{"index": r["index"], "error": r.get("error", "")} for r in records if r.get("status") != "ok"]
    totals: dict[str, float] = {}
    for r in ok:
        for k, v in (r.get("stats") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
    summary = {"items": n, "ok": len(ok), "failed": failed, "missing": missing, "totals": totals}
    if totals.get("row_forwards"):
        summary["step_compression"] = totals.get("new_tokens", 0) / totals["row_forwards"]
    summary["records"] = sorted(records, key=lambda r: r["index"])
    return summary
