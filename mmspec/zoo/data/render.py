"""Rendering helpers of the procedural scenes (all vectorised numpy; images are float32 in 0..255 until the end)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .vocab import _MIN_CONTRAST, BACKGROUNDS, COLOUR_RGB, COLOURS


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLOUR_RGB[name], dtype=np.float32)


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) / 255.0


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly interpolated random lattice: ``[size, size]`` float32 in about [0, 1], with
    ``cells`` lattice cells across the image (feature scale ``size / cells`` pixels)."""
    lattice = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size)
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i0
    f = f * f * (3.0 - 2.0 * f)  # smoothstep: hides the lattice
    a = lattice[i0][:, i0]
    b = lattice[i0][:, i0 + 1]
    c = lattice[i0 + 1][:, i0]
    d = lattice[i0 + 1][:, i0 + 1]
    fy, fx = f[:, None], f[None, :]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _fractal_noise(rng: np.random.Generator, size: int, octaves: tuple[int, ...] = (2, 4, 8, 16), gain: float = 0.55) -> np.ndarray:
    """Multi-octave value noise ``[size, size]`` normalised to [0, 1]."""
    acc = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    for cells in octaves:
        acc += amp * _value_noise(rng, size, min(cells, size))
        total += amp
        amp *= gain
    acc /= total
    lo, hi = float(acc.min()), float(acc.max())
    return (acc - lo) / max(hi - lo, 1e-6)


def _soft_square_wave(phase: np.ndarray, sharpness: float = 4.0) -> np.ndarray:
    """0/1 square wave of a phase (radians) with soft (antialiased-looking) edges."""
    return 0.5 + 0.5 * np.tanh(sharpness * np.sin(phase))


def _second_tone(rng: np.random.Generator, base: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A lighter (for dark bases) or darker (for light bases) tone of ``base``."""
    t = rng.uniform(lo, hi)
    target = 255.0 if _luminance(base) < 0.5 else 0.0
    return (base * (1 - t) + target * t).astype(np.float32)


def _render_background(rng: np.random.Generator, kind: str, base: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Background ``[size, size, 3]`` float32 (0..255), its second tone, and its parameters."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    params: dict[str, Any] = {}
    scale = size / 64.0
    if kind == "plain":
        tone2 = base.copy()
        p = np.zeros((size, size), np.float32)
    elif kind in ("vertical stripes", "horizontal stripes", "diagonal stripes"):
        tone2 = _second_tone(rng, base, 0.22, 0.4)
        period = float(rng.choice([4, 5, 6, 8, 10, 12, 16])) * scale
        phase0 = rng.uniform(0, 2 * math.pi)
        if kind == "vertical stripes":
            coord = xx
        elif kind == "horizontal stripes":
            coord = yy
        else:
            ang = math.radians(rng.choice([45.0, 135.0]) + rng.uniform(-10, 10))
            coord = xx * math.cos(ang) + yy * math.sin(ang)
        p = _soft_square_wave(2 * math.pi * coord / period + phase0)
        params.update(period=period)
    elif kind == "checkered":
        tone2 = _second_tone(rng, base, 0.22, 0.4)
        cell = float(rng.choice([4, 6, 8, 11, 16])) * scale
        ox, oy = rng.uniform(0, 2 * cell, size=2)
        s = np.sin(math.pi * (xx + ox) / cell) * np.sin(math.pi * (yy + oy) / cell)
        p = 0.5 + 0.5 * np.tanh(6.0 * s)
        params.update(cell=cell)
    elif kind == "gradient":
        tone2 = _second_tone(rng, base, 0.35, 0.6)
        ang = rng.uniform(0, 2 * math.pi)
        proj = (xx - size / 2) * math.cos(ang) + (yy - size / 2) * math.sin(ang)
        p = np.clip(proj / (size * 0.75) + 0.5, 0, 1)
        params.update(angle=math.degrees(ang))
    elif kind == "dotted":
        tone2 = _second_tone(rng, base, 0.25, 0.45)
        spacing = float(rng.choice([6, 8, 10, 13, 16])) * scale
        radius = spacing * rng.uniform(0.18, 0.3)
        ox, oy = rng.uniform(0, spacing, size=2)
        stagger = bool(rng.integers(2))
        gy = (yy + oy) / spacing
        row = np.floor(gy)
        gx = (xx + ox) / spacing + (0.5 * (row % 2) if stagger else 0.0)
        dx = (gx - np.floor(gx) - 0.5) * spacing
        dy = (gy - row - 0.5) * spacing
        d = np.sqrt(dx * dx + dy * dy)
        p = np.clip(radius - d + 0.5, 0, 1)
        params.update(spacing=spacing, radius=radius, stagger=stagger)
    elif kind == "cloudy":
        tone2 = _second_tone(rng, base, 0.3, 0.5)
        n = _fractal_noise(rng, size, octaves=(3, 6, 12, 24), gain=0.6)
        p = np.clip((n - 0.5) * 1.6 + 0.5, 0, 1)
    else:  # pragma: no cover - guarded by BACKGROUNDS
        raise ValueError(kind)
    img = base[None, None, :] * (1 - p[..., None]) + tone2[None, None, :] * p[..., None]
    # large-scale illumination variation, common to every kind (keeps "plain" from being flat)
    illum_amp = rng.uniform(0.04, 0.16)
    illum = 1.0 + illum_amp * (_fractal_noise(rng, size, octaves=(1, 2, 3), gain=0.5) - 0.5) * 2
    img = img * illum[..., None]
    params.update(illumination=illum_amp)
    return img.astype(np.float32), tone2, params


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-test of a unit shape in local coordinates (``u`` right, ``v`` down, the
    shape's half-extent is about 1)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.56**2)
    if shape == "ellipse":
        return (u / 1.05) ** 2 + (v / 0.6) ** 2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82)
    if shape == "diamond":
        return np.abs(u) / 0.8 + np.abs(v) / 1.08 <= 1.0
    if shape == "cross":
        w = 0.34
        au, av = np.abs(u), np.abs(v)
        return ((au <= w) & (av <= 1.0)) | ((av <= w) & (au <= 1.0))
    if shape == "triangle":
        r = 1.12
        ang = np.radians([-90.0, 30.0, 150.0])
        verts = np.stack([r * np.cos(ang), r * np.sin(ang) + r * 0.25], axis=1)
        return _polygon_mask(u, v, verts)
    if shape == "star":
        k = np.arange(10)
        radius = np.where(k % 2 == 0, 1.08, 0.46)
        ang = -math.pi / 2 + k * math.pi / 5
        verts = np.stack([radius * np.cos(ang), radius * np.sin(ang) + 0.08], axis=1)
        return _polygon_mask(u, v, verts)
    raise ValueError(f"unknown shape {shape!r}")


def _polygon_mask(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points (loop over the few edges)."""
    inside = np.zeros(px.shape, dtype=bool)
    x0, y0 = verts[-1]
    for x1, y1 in verts:
        crosses = (y1 > py) != (y0 > py)
        dy = y0 - y1
        x_at = (x0 - x1) * (py - y1) / (dy if dy != 0 else 1e-12) + x1
        inside ^= crosses & (px < x_at)
        x0, y0 = x1, y1
    return inside


_SUPERSAMPLE = 4
_EXTENT = 1.2  # bounding half-extent of every unit shape (with rotation)


def _object_alpha(shape: str, cx: float, cy: float, radius: float, rotation_deg: float, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Antialiased coverage of one object inside its bounding box.

    Returns ``alpha`` ``[h, w]`` float32 in [0, 1] (``_SUPERSAMPLE``^2 samples per pixel) and the
    box ``(y0, y1, x0, x1)`` in image pixels.
    """
    ext = radius * _EXTENT + 1.0
    x0, x1 = max(int(math.floor(cx - ext)), 0), min(int(math.ceil(cx + ext)), size)
    y0, y1 = max(int(math.floor(cy - ext)), 0), min(int(math.ceil(cy + ext)), size)
    ss = _SUPERSAMPLE
    xs = x0 + (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss
    ys = y0 + (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss
    dx = (xs[None, :] - cx) / radius
    dy = (ys[:, None] - cy) / radius
    th = math.radians(rotation_deg)
    c, s = math.cos(th), math.sin(th)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    m = _shape_mask(shape, u, v).astype(np.float32)
    alpha = m.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return alpha, (y0, y1, x0, x1)


def _object_fill(rng: np.random.Generator, base: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """Shading model of an object: returns ``fill(yy, xx, cx, cy, radius) -> [h, w, 3]`` and its
    parameters. Shading is a function of position relative to the object centre, so a moving
    object keeps its look."""
    shading = str(rng.choice(["flat", "linear", "radial"], p=[0.3, 0.35, 0.35]))
    amount = float(rng.uniform(0.15, 0.35))
    ang = float(rng.uniform(0, 2 * math.pi))
    hx, hy = float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.6, 0.0))
    light = np.full(3, 255.0, np.float32)
    dark = np.zeros(3, np.float32)

    def fill(yy: np.ndarray, xx: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
        du = (xx - cx) / radius
        dv = (yy - cy) / radius
        if shading == "flat":
            t = np.zeros(np.broadcast_shapes(du.shape, dv.shape), np.float32)
        elif shading == "linear":
            t = np.clip((du * math.cos(ang) + dv * math.sin(ang)) * 0.5, -1, 1) * amount * 2
        else:
            d = np.sqrt((du - hx) ** 2 + (dv - hy) ** 2)
            t = np.clip(0.7 - d, -1, 1) * amount * 1.6
        t = t[..., None]
        lighter = base + (light - base) * np.clip(t, 0, None)
        return np.where(t >= 0, lighter, base + (dark - base) * np.clip(-t, 0, None)).astype(np.float32)

    return fill, {"shading": shading, "shading_amount": amount}


def _jitter_colour(rng: np.random.Generator, name: str, amount: float) -> np.ndarray:
    return np.clip(_rgb(name) + rng.uniform(-amount, amount, size=3), 0, 255).astype(np.float32)


def _choose_background(rng: np.random.Generator) -> tuple[str, str]:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    return kind, colour


def _contrasts(obj_colour: str, bg_colours: list[np.ndarray]) -> bool:
    o = _rgb(obj_colour)
    return all(float(np.linalg.norm(o - b)) >= _MIN_CONTRAST for b in bg_colours)


def _choose_object_colour(rng: np.random.Generator, bg_tones: list[np.ndarray]) -> str:
    allowed = [c for c in COLOURS if _contrasts(c, bg_tones)]
    if not allowed:  # cannot happen with the palette above, kept for safety
        allowed = list(COLOURS)
    return allowed[int(rng.integers(len(allowed)))]


def _finish(rng: np.random.Generator, img: np.ndarray, clean: bool = False):
    """Colour cast + per-pixel sensor noise, then quantise to uint8. ``img``: [..., H, W, 3].

    Returns the noisy uint8 image and the noise parameters; with ``clean=True`` also the same image
    with the colour cast but without the sensor noise (uint8, same shape). The random stream is
    consumed identically either way."""
    gain = 1.0 + rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
    sigma_l = float(rng.uniform(3.0, 9.0))
    sigma_c = float(rng.uniform(1.0, 3.0))
    shape = img.shape
    noise = rng.standard_normal(shape[:-1] + (1,), dtype=np.float32) * sigma_l
    noise = noise + rng.standard_normal(shape, dtype=np.float32) * sigma_c
    out = img * gain + noise
    params = {"noise_sigma": sigma_l, "chroma_noise_sigma": sigma_c}
    noisy = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if not clean:
        return noisy, params
    return noisy, params, np.clip(np.rint(img * gain), 0, 255).astype(np.uint8)
