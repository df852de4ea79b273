"""Pieces shared by the zoo recipes: seeding, a wall-clock budget, streamed data, JSON output."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import NaturalCropDataset, image_to_tensor, make_scene, scene_labels, scene_seed

#: Seed streams of training and held-out data (scene_seed keeps streams disjoint).
TRAIN_SCENE_SEED = 0
TRAIN_CROP_SEED = 1
HELDOUT_SCENE_SEED = 10_000
HELDOUT_CROP_SEED = 10_001


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def setup_threads(n: int = 2) -> None:
    torch.set_num_threads(n)


class Budget:
    """Wall-clock budget: ``progress()`` in [0, 1] is the larger of elapsed time / budget and
    step / max_steps, so schedules follow whichever limit comes first. ``elapsed_s``: seconds
    already spent by the run being resumed (they count against the budget)."""

    def __init__(self, minutes: float, max_steps: int | None = None, elapsed_s: float = 0.0):
        if minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.seconds = float(minutes) * 60.0
        self.max_steps = max_steps
        self.start = time.perf_counter() - float(elapsed_s)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        p = self.elapsed() / self.seconds
        if self.max_steps is not None:
            p = max(p, step / self.max_steps)
        return min(p, 1.0)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on matrices only (not on norms, biases or scalars)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def cosine_lr(base: float, progress: float, step: int, warmup_steps: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``floor * base`` at progress 1."""
    w = min(1.0, (step + 1) / max(warmup_steps, 1))
    return base * w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def scene_batch(start: int, n: int, seed: int, max_objects: int, clean: bool = False) -> tuple[torch.Tensor, list[Any]]:
    """Scenes ``start .. start+n-1`` of stream ``seed``: images ``[n, 3, 64, 64]`` and the scenes
    (``clean``: each scene also keeps its noise-free render, ``Scene.clean``)."""
    scenes = [make_scene(scene_seed(seed, i), 64, max_objects, clean=clean) for i in range(start, start + n)]
    return torch.stack([image_to_tensor(s.image) for s in scenes]), scenes


def crop_batch(start: int, n: int, seed: int) -> torch.Tensor:
    """Natural crops ``start .. start+n-1`` of stream ``seed``: ``[n, 3, 64, 64]``."""
    ds = NaturalCropDataset(start + n, 64, seed)
    return torch.stack([ds[i]["image"] for i in range(start, start + n)])


def label_tensors(scenes: list[Any]) -> dict[str, torch.Tensor]:
    labels = [scene_labels(s) for s in scenes]
    return {k: torch.tensor([lab[k] for lab in labels]) for k in labels[0]}


@torch.no_grad()
def pair_codes(new_vq: Any, old_vq: Any, batches: Iterator[torch.Tensor], smoothing: float = 1e-3) -> torch.Tensor:
    """How the codes of tokenizer ``new_vq`` stand for those of ``old_vq``: both code every image of ``batches``
    (``[n, 3, H, W]`` in ``[-1, 1]``; cells line up, the tokenizers share their downsampling) and the pairs are
    counted. Returns ``p(old | new)`` ``[K_new, K_old]``, each row summing to 1 (``smoothing`` added to every
    count, so a code never seen spreads evenly)."""
    from .. import hub

    k_new, k_old = int(hub.codebook(new_vq).shape[0]), int(hub.codebook(old_vq).shape[0])
    counts = torch.full((k_new, k_old), smoothing)
    for images in batches:
        a, b = hub.encode_images(new_vq, images).flatten(), hub.encode_images(old_vq, images).flatten()
        counts.view(-1).index_add_(0, a * k_old + b, torch.ones(a.numel()))
    return counts / counts.sum(1, keepdim=True)


def remap_code_rows(rows: torch.Tensor, offset: int, mapping: torch.Tensor, tail: list[int]) -> torch.Tensor:
    """A token embedding or LM head ``rows [V_old, d]`` moved onto a new tokenizer's codes: rows ``:offset`` (words)
    are kept, the old codes' ``K_old`` rows after them become ``mapping @ rows`` (``mapping = p(old | new)``
    ``[K_new, K_old]``, :func:`pair_codes`), and the old rows ``tail`` (BOI, EOI, ...) follow, in that order.
    Returns ``[offset + K_new + len(tail), d]``."""
    codes = rows[offset : offset + mapping.shape[1]]
    return torch.cat([rows[:offset], mapping.to(rows.dtype) @ codes, rows[tail]])


def copy_weights(model: torch.nn.Module, src: dict[str, torch.Tensor], remap: dict[str, Callable]) -> None:
    """Copy the state dict ``src`` into ``model``, passing each tensor named in ``remap`` through its function
    first (a token embedding or head moved onto new codes, :func:`remap_code_rows`). Raises ``ValueError`` when
    ``src`` has other tensors than ``model`` or a tensor's shape differs."""
    dst = model.state_dict()
    if set(src) - set(dst) or set(dst) - set(src) - set(remap):
        raise ValueError("the old model has another architecture")
    with torch.no_grad():
        for name, value in src.items():
            value = remap[name](value) if name in remap else value
            if value.shape != dst[name].shape:
                raise ValueError(f"the old model's {name} has shape {tuple(value.shape)}, not {tuple(dst[name].shape)}")
            dst[name].copy_(value)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] after uint8 quantisation of both."""
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((qa - qb) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(255.0**2 / mse)


def save_fp16(model: Any, out: str | os.PathLike) -> None:
    """``save_pretrained`` in float16 safetensors (the model is cast in place)."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # silence the keep-in-fp32 notice: these models list no such modules
    try:
        model.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    finally:
        dlogging.set_verbosity(level)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def dir_size_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class Checkpoint:
    """Resumable training state in one ``torch.save`` file, written every ``every_s`` seconds
    (atomically: a half-written file never replaces a good one). ``path=None`` disables it."""

    def __init__(self, path: str | os.PathLike | None, every_s: float = 300.0):
        self.path = Path(path) if path else None
        self.every_s = float(every_s)
        self.last = time.perf_counter()

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is no checkpoint file."""
        if self.path is None or not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def resume(self, model, opt, gen: torch.Generator, **identity) -> dict[str, Any] | None:
        """Load a saved state into ``model``, ``opt`` and ``gen``, after checking that it was saved with the same
        ``identity`` entries (``role=...``, ``recipe=asdict(r)``); return the whole state, or None without one."""
        state = self.load()
        if state is None:
            return None
        if any(state.get(k) != v for k, v in identity.items()):
            raise ValueError(f"checkpoint {self.path} was made for another {' or '.join(identity)}; delete it or "
                             "match them")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        return state

    def due(self) -> bool:
        return self.path is not None and time.perf_counter() - self.last >= self.every_s

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.last = time.perf_counter()


def plot_loss_curve(history: list[dict[str, float]], path: str | os.PathLike, title: str, keys: tuple[str, ...] = ("loss",)) -> None:
    """Loss curve PNG: each of ``keys`` (training EMA) against ``step`` from ``history`` rows
    (``{"step": ..., "seconds": ..., key: ...}``); log-scaled y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for k in keys:
        pts = [(h["step"], h[k]) for h in history if k in h]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (EMA)")
    if history:
        ax.set_title(f"{title} ({history[-1]['seconds'] / 60:.0f} min of training)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


class ResumableRun:
    """What the recipes' training loops share: the step and sample counters, the loss EMA and its history (the loss
    curve), the wall-clock budget (time of a resumed run counts against it) and the checkpoint file.

    ``identity`` entries (e.g. ``recipe=asdict(r)``) are saved with the state and must match on resume. Use::

        run = ResumableRun("c2i", model, opt, gen, minutes, max_steps, ckpt, ckpt_every_s, recipe=asdict(r))
        while not run.done():
            lr = run.lr(r.lr, r.warmup_steps)
            ...  # one optimiser step on a batch of n samples, starting at sample run.seen
            run.record(loss.item(), n)
        run.finish(out / "loss_curve.png", "c2i (training loss)")
    """

    def __init__(self, name: str, model, opt, gen: torch.Generator, minutes: float, max_steps: int | None,
                 ckpt: str | os.PathLike | None, ckpt_every_s: float = 300.0, **identity):
        self.name, self.model, self.opt, self.gen, self.identity = name, model, opt, gen, identity
        self.checkpoint = Checkpoint(ckpt, ckpt_every_s)
        self.step, self.seen, self.ema, self.history, elapsed = 0, 0, None, [], 0.0
        state = self.checkpoint.resume(model, opt, gen, **identity)
        if state is not None:
            self.step, self.seen, elapsed, self.ema, self.history = (
                state[k] for k in ("step", "seen", "elapsed", "ema", "history"))
            print(f"[{name}] resumed from {ckpt} at step {self.step} ({elapsed:.0f} s trained)", flush=True)
        self.budget = Budget(minutes, max_steps, elapsed_s=elapsed)

    def done(self) -> bool:
        return self.budget.done(self.step)

    def lr(self, base: float, warmup_steps: int) -> float:
        """The cosine schedule's learning rate for this step, set on the optimiser."""
        lr = cosine_lr(base, self.budget.progress(self.step), self.step, warmup_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def record(self, loss: float, samples: int, log_every: int = 50) -> None:
        """Count one optimiser step over ``samples`` samples with training loss ``loss``; log, keep the curve and
        write the checkpoint when due."""
        self.step += 1
        self.seen += samples
        self.ema = loss if self.ema is None else 0.98 * self.ema + 0.02 * loss
        if self.step % 25 == 0:
            self.history.append({"step": self.step, "seconds": self.budget.elapsed(), "loss": self.ema})
        if self.step % log_every == 0:
            print(f"[{self.name}] step {self.step} t={self.budget.elapsed():.0f}s loss={self.ema:.4f} "
                  f"lr={self.opt.param_groups[0]['lr']:.2e}", flush=True)
        if self.checkpoint.due():
            self.checkpoint.save(self.state())

    def state(self) -> dict[str, Any]:
        return {**self.identity, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "gen": self.gen.get_state(), "step": self.step, "seen": self.seen, "elapsed": self.budget.elapsed(),
                "ema": self.ema, "history": self.history}

    def finish(self, curve: str | os.PathLike, title: str) -> float:
        """Close the curve, save the final state and draw the loss-curve PNG at ``curve``; returns the seconds
        trained (resumed time included)."""
        seconds = self.budget.elapsed()
        self.history.append({"step": self.step, "seconds": seconds, "loss": self.ema})
        self.checkpoint.save(self.state())
        plot_loss_curve(self.history, curve, title)
        return seconds


# ---------------------------------------------------------------------------------------------- loader workers


def one_thread(_worker_id: int) -> None:
    """A loader process's ``worker_init_fn``: one torch thread each (the processes are the parallelism)."""
    torch.set_num_threads(1)


class _IndexedBatches(torch.utils.data.Dataset):
    def __init__(self, fn: Callable[[int], Any], start: int, step: int):
        self.fn, self.start, self.step = fn, start, step

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, k: int) -> Any:
        return self.fn(self.start + k * self.step)


def prefetch(fn: Callable[[int], Any], start: int, step: int, workers: int = 0, pin_memory: bool = False) -> Iterator[Any]:
    """``fn(start)``, ``fn(start + step)``, ... in order, without end: computed in this process one at a time when
    ``workers`` is 0, else ahead of use by that many loader processes (``fn`` must pickle: a module-level function
    or a ``functools.partial`` of one, and depend on its argument alone). Tensors come back in shared memory
    (page-locked with ``pin_memory``, for a fast copy to a GPU)."""
    if workers <= 0:
        return (fn(start + k * step) for k in itertools.count())
    return iter(torch.utils.data.DataLoader(_IndexedBatches(fn, start, step), batch_size=None, num_workers=workers,
                                            prefetch_factor=4, worker_init_fn=one_thread, pin_memory=pin_memory))
