"""Moving scenes: short clips of shapes moving at constant velocity over a static background."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .captions import MovingScene, make_caption
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
from .vocab import _SIZE_RADIUS, DIRECTIONS, POSITIONS, SHAPES, SIZES


def make_moving_scene(seed: int, size: int = 64, frames: int = 8, max_objects: int = 2, clean: bool = False,
                      positions: bool = False, cell_motion: int = 0) -> MovingScene:
    """A clip of ``1..max_objects`` shapes moving at constant velocity over a static background.

    Each object moves in one of the 8 :data:`DIRECTIONS` at 1.2..2.6 pixels per frame (scaled
    with ``size / 64``) and stays inside the frame throughout. Background and its noise are
    identical in every frame; object shading/noise move with the object.

    With ``clean=True`` the clip also comes without its sensor noise (background and object grain) in
    ``MovingScene.clean`` (same shape; the random stream and the noisy frames are the same either way).
    With ``positions=True`` each object also gets the cell of the 3x3 grid its centre starts in (``position``, one
    of :data:`POSITIONS`) and the caption names it: ``"a small red circle at the top left moving right on ..."``
    (the same clip either way: the cell follows from the start, no random draw).
    With ``cell_motion > 0`` every object moves exactly ``cell_motion`` pixels per frame along each axis it moves on
    (diagonals: along both), e.g. 4 = one code of a tokenizer with 4x4-pixel codes, so the codes inside an object
    shift onto whole codes of the next frame (the path is shortened as usual where it would leave the frame; the
    random stream, and so everything else about the clip, is unchanged).

    Returns:
        :class:`MovingScene` with ``frames`` ``np.uint8 [frames, size, size, 3]`` and a caption like
        ``"a small red circle moving up left on a dotted blue background"``.
    """
    if frames < 2:
        raise ValueError("frames must be >= 2")
    rng = np.random.default_rng(seed)
    bg_kind, bg_colour = _choose_background(rng)
    bg_base = _jitter_colour(rng, bg_colour, 14.0)
    bg, tone2, bg_params = _render_background(rng, bg_kind, bg_base, size)
    bg_tones = [_rgb(bg_colour), tone2]
    bg_u8, noise_params, *bg_clean = _finish(rng, bg, clean)

    n_obj = int(rng.integers(1, max_objects + 1))
    objects: list[dict[str, Any]] = []
    fills = []
    for _ in range(n_obj):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size_name = SIZES[int(rng.integers(len(SIZES)))]
        colour = _choose_object_colour(rng, bg_tones)
        radius = _SIZE_RADIUS[size_name] * size * float(rng.uniform(0.93, 1.07))
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        ux, uy = DIRECTIONS[direction]
        m = radius * 1.05 + 0.5
        span = size - 2 * m
        speed = float(rng.uniform(1.2, 2.6)) * size / 64.0
        step = float(cell_motion) if cell_motion > 0 else speed / math.hypot(ux, uy)
        total = step * (frames - 1)
        if total > span * 0.9:  # keep the whole path inside the frame
            step = span * 0.9 / (frames - 1)
            total = step * (frames - 1)
        start = []
        for u in (ux, uy):
            if u > 0:
                start.append(float(rng.uniform(m, size - m - total)))
            elif u < 0:
                start.append(float(rng.uniform(m + total, size - m)))
            else:
                start.append(float(rng.uniform(m, size - m)))
        velocity = [ux * step, uy * step]
        rotation = float(rng.uniform(-12, 12)) if shape != "ellipse" else float(rng.uniform(-20, 20))
        fill, shade = _object_fill(rng, _jitter_colour(rng, colour, 16.0))
        fills.append(fill)
        cell = [min(int(v * 3 / size), 2) for v in start]  # (column, row) of the start centre
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "size": size_name,
                **({"position": POSITIONS[cell[1] * 3 + cell[0]]} if positions else {}),
                "direction": direction,
                "start": start,
                "velocity": velocity,
                "end": [start[0] + velocity[0] * (frames - 1), start[1] + velocity[1] * (frames - 1)],
                "radius": radius,
                "rotation": rotation,
                **shade,
            }
        )
    # object texture noise lives in object coordinates: one field, shifted with the object
    obj_noise = rng.standard_normal((size, size, 1), dtype=np.float32) * noise_params["noise_sigma"]

    yy_full, xx_full = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out = _render_frames(bg_u8, objects, fills, obj_noise, frames, size, yy_full, xx_full)
    quiet = _render_frames(bg_clean[0], objects, fills, None, frames, size, yy_full, xx_full) if clean else None
    attributes = {
        "objects": objects,
        "background": bg_kind,
        "background_colour": bg_colour,
        "background_params": bg_params,
        "frames": frames,
        **noise_params,
    }
    return MovingScene(frames=out, caption=make_caption(attributes), attributes=attributes, clean=quiet)


def _render_frames(bg_u8: np.ndarray, objects: list[dict[str, Any]], fills: list[Any], obj_noise: np.ndarray | None,
                   frames: int, size: int, yy_full: np.ndarray, xx_full: np.ndarray) -> np.ndarray:
    """The clip's frames ``np.uint8 [frames, size, size, 3]``: the objects (first on top) over the static
    background, each moved by its velocity, with its grain ``obj_noise`` moving along (None: no grain)."""
    out = np.empty((frames, size, size, 3), np.uint8)
    bg_f = bg_u8.astype(np.float32)
    for t in range(frames):
        img = bg_f.copy()
        for o, fill in reversed(list(zip(objects, fills))):
            cx = o["start"][0] + o["velocity"][0] * t
            cy = o["start"][1] + o["velocity"][1] * t
            alpha, (y0, y1, x0, x1) = _object_alpha(o["shape"], cx, cy, o["radius"], o["rotation"], size)
            col = fill(yy_full[y0:y1, x0:x1], xx_full[y0:y1, x0:x1], cx, cy, o["radius"])
            if obj_noise is not None:
                shift = (int(round(o["velocity"][1] * t)), int(round(o["velocity"][0] * t)))
                col = col + np.roll(obj_noise, shift, axis=(0, 1))[y0:y1, x0:x1]
            a = alpha[..., None]
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + col * a
        out[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out
