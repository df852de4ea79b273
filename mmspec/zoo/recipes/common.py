"""Pieces shared by the zoo recipes: seeding, a wall-clock budget, streamed data, JSON output."""

from __future__ import annotations

import json
import math
import os
import random
import time
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
