"""Static procedural scenes: :func:`make_scene`, :class:`SceneDataset` and image/tensor conversion."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .captions import Scene, make_caption, scene_labels
from .render import (
    _choose_background,
    _choose_object_colour,
    _finish,
    _jitter_colour,
    _object_alpha,
    _object_fill,
    _render_background,
    _rgb,
)
from .vocab import _SIZE_RADIUS, POSITIONS, SHAPES, SIZES


def make_scene(seed: int, size: int = 64, max_objects: int = 2, clean: bool = False) -> Scene:
    """Render one procedural scene, fully determined by ``seed``.

    Args:
        seed: any non-negative integer; equal seeds give byte-identical scenes.
        size: image side in pixels (64 is the zoo's resolution; shapes scale with it).
        max_objects: 1..9; the scene has ``1..max_objects`` objects (uniform), each in a
            distinct cell of the 3x3 grid.
        clean: also keep the render without sensor noise in ``Scene.clean`` (the noisy ``image``
            is the same either way).

    Returns:
        :class:`Scene` with ``image`` ``np.uint8 [size, size, 3]`` (and ``clean``, same shape, or None).
    """
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}, got {max_objects}")
    rng = np.random.default_rng(seed)
    bg_kind, bg_colour = _choose_background(rng)
    bg_base = _jitter_colour(rng, bg_colour, 14.0)
    img, tone2, bg_params = _render_background(rng, bg_kind, bg_base, size)
    bg_tones = [_rgb(bg_colour), tone2]

    n_obj = int(rng.integers(1, max_objects + 1))
    cells = rng.permutation(len(POSITIONS))[:n_obj]
    cell = size / 3.0
    objects: list[dict[str, Any]] = []
    for cell_idx in cells:
        r, c = divmod(int(cell_idx), 3)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size_name = SIZES[int(rng.integers(len(SIZES)))]
        colour = _choose_object_colour(rng, bg_tones)
        radius = _SIZE_RADIUS[size_name] * size * float(rng.uniform(0.93, 1.07))
        jitter = rng.uniform(-0.045, 0.045, size=2) * size
        cx = (c + 0.5) * cell + float(jitter[0])
        cy = (r + 0.5) * cell + float(jitter[1])
        rotation = float(rng.uniform(-12, 12)) if shape != "ellipse" else float(rng.uniform(-20, 20))
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "size": size_name,
                "position": POSITIONS[int(cell_idx)],
                "center": [cx, cy],
                "radius": radius,
                "rotation": rotation,
            }
        )
    # keep shapes inside the frame and (nearly) disjoint: drop jitter where it would cause overlap
    for i, o in enumerate(objects):
        r, c = divmod(POSITIONS.index(o["position"]), 3)
        grid_xy = ((c + 0.5) * cell, (r + 0.5) * cell)
        for j in range(i):
            p = objects[j]
            d = math.dist(o["center"], p["center"])
            if d < o["radius"] + p["radius"] + 1.0:
                o["center"] = list(grid_xy)
        m = o["radius"] * 1.05 + 0.5
        o["center"] = [float(np.clip(o["center"][0], m, size - m)), float(np.clip(o["center"][1], m, size - m))]

    yy_full, xx_full = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # draw back to front so object 0 (the one the labels describe) is never occluded
    fills = []
    for o in objects:
        fill, shade_params = _object_fill(rng, _jitter_colour(rng, o["colour"], 16.0))
        o.update(shade_params)
        fills.append(fill)
    for o, fill in reversed(list(zip(objects, fills))):
        cx, cy = o["center"]
        alpha, (y0, y1, x0, x1) = _object_alpha(o["shape"], cx, cy, o["radius"], o["rotation"], size)
        col = fill(yy_full[y0:y1, x0:x1], xx_full[y0:y1, x0:x1], cx, cy, o["radius"])
        a = alpha[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + col * a

    image, noise_params, *rest = _finish(rng, img, clean)
    attributes = {
        "objects": objects,
        "background": bg_kind,
        "background_colour": bg_colour,
        "background_params": bg_params,
        **noise_params,
    }
    return Scene(image=image, caption=make_caption(attributes), attributes=attributes, clean=rest[0] if clean else None)


def scene_seed(seed: int, index: int) -> int:
    """Seed of item ``index`` of the stream ``seed`` (streams of different seeds don't overlap
    for fewer than 1,000,003 items)."""
    return int(seed) * 1_000_003 + int(index)


def mean_patch_std(image: np.ndarray, patch: int = 8, reduce: str = "mean") -> float:
    """Texture/entropy proxy: the pixel standard deviation (uint8 units) inside each
    non-overlapping ``patch`` x ``patch`` patch and channel, reduced over patches and channels.

    ``image``: ``[H, W, C]`` with H, W divisible by ``patch``. ``reduce="mean"`` is dominated by
    object edges (a flat toy scene with one shape already scores ~5.6 at 64x64);
    ``reduce="median"`` measures texture and noise in the typical patch (that toy scene scores 0).
    """
    h, w, ch = image.shape
    x = image.astype(np.float32).reshape(h // patch, patch, w // patch, patch, ch)
    std = x.std(axis=(1, 3))
    if reduce == "mean":
        return float(std.mean())
    if reduce == "median":
        return float(np.median(std))
    raise ValueError(f"reduce must be 'mean' or 'median', got {reduce!r}")


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``np.uint8 [H, W, 3]`` (or ``[T, H, W, 3]``) -> float32 ``[3, H, W]`` (``[T, 3, H, W]``) in [-1, 1]."""
    t = torch.from_numpy(np.asarray(image).astype(np.float32))  # astype copies; PIL images take no copy= keyword
    t = t.movedim(-1, -3)
    return t / 127.5 - 1.0


def tensor_to_image(t: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`image_to_tensor`: float ``[..., 3, H, W]`` in [-1, 1] -> ``np.uint8 [..., H, W, 3]``."""
    x = ((t.detach().to(torch.float32).clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


class SceneDataset(Dataset):
    """``n`` procedural scenes; item ``i`` is ``make_scene(scene_seed(seed, i), size, max_objects)``.

    Items: ``{"image": float32 [3, size, size] in [-1, 1], "caption": str, "labels": dict[str, int]}``
    (see :func:`scene_labels`). Works with the default ``DataLoader`` collate.
    """

    def __init__(self, n: int, size: int = 64, seed: int = 0, max_objects: int = 2):
        self.n, self.size, self.seed, self.max_objects = int(n), int(size), int(seed), int(max_objects)

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return make_scene(scene_seed(self.seed, i), self.size, self.max_objects)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.scene(int(i))
        return {"image": image_to_tensor(s.image), "caption": s.caption, "labels": scene_labels(s)}
