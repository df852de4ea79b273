"""Deterministic, seeded data for the bundled model zoo.

Everything here is made locally or read from files that ship inside installed packages, so
the zoo can be trained and evaluated on a machine with no network:

* **Procedural scenes with captions** (:func:`make_scene`, :class:`SceneDataset`): 1..N shapes
  of named colour, size and 3x3-grid position on textured, noisy backgrounds, with a caption
  from a small regular vocabulary (:data:`SCENE_VOCAB`). :func:`parse_caption` inverts a caption
  back into attributes, so prompt adherence of a generated image can be scored by a classifier
  (:func:`scene_labels`, :data:`LABEL_NAMES`).
* **Natural-image crops** (:class:`NaturalCropDataset`): random crops of the sample images bundled
  with scikit-learn and scikit-image, labelled by source image (:data:`NATURAL_CLASSES`).
* **Text corpus** (:func:`stdlib_corpus`, :func:`text_corpus_splits`): the Python standard
  library's own source.
* **Moving scenes** (:func:`make_moving_scene`): short clips of shapes moving at constant
  velocity over a static background.

Images are ``np.uint8`` arrays of shape ``[H, W, 3]``; dataset items are float tensors of shape
``[3, H, W]`` in ``[-1, 1]``. No global random state is used: every generator is an
``np.random.default_rng`` seeded from the caller's integers.

The scenes are deliberately not toy-easy: backgrounds carry texture at several scales (stripes,
checks, dots, multi-octave cloud noise, illumination gradients), objects carry shading, and every
image gets per-pixel sensor noise and a slight colour cast. Image tokens of such data have a
realistic entropy, which matters because trivially predictable images make every speculative
decoding method look fast.

Run ``python -m mmspec.zoo.data --out DIR`` to write preview grids.
"""

from __future__ import annotations

import math
import os
import sysconfig
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "SIZES",
    "POSITIONS",
    "BACKGROUNDS",
    "BACKGROUND_PHRASES",
    "DIRECTIONS",
    "SCENE_VOCAB",
    "LABEL_NAMES",
    "NATURAL_CLASSES",
    "Scene",
    "MovingScene",
    "make_scene",
    "make_caption",
    "caption_words",
    "parse_caption",
    "scene_labels",
    "labels_from_attributes",
    "caption_labels",
    "scene_seed",
    "mean_patch_std",
    "image_to_tensor",
    "tensor_to_image",
    "SceneDataset",
    "NaturalCropDataset",
    "load_natural_images",
    "stdlib_corpus",
    "text_corpus_splits",
    "make_moving_scene",
]

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "diamond",
    "ellipse",
)

#: Named colours and their nominal sRGB values (0..255). Used for objects and backgrounds.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (240, 215, 40),
    "green": (45, 165, 60),
    "blue": (35, 80, 215),
    "purple": (135, 55, 185),
    "white": (238, 238, 238),
    "gray": (128, 128, 128),
    "black": (22, 22, 22),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

SIZES: tuple[str, ...] = ("small", "medium", "large")
#: Object half-extent as a fraction of the image side, per size name.
_SIZE_RADIUS: dict[str, float] = {"small": 0.09, "medium": 0.125, "large": 0.162}

#: 3x3 grid positions, row-major; index ``r * 3 + c``.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)

BACKGROUNDS: tuple[str, ...] = (
    "plain",
    "vertical stripes",
    "horizontal stripes",
    "diagonal stripes",
    "checkered",
    "gradient",
    "dotted",
    "cloudy",
)
#: Adjective phrase used in captions for each background kind.
BACKGROUND_PHRASES: dict[str, str] = {
    "plain": "plain",
    "vertical stripes": "vertically striped",
    "horizontal stripes": "horizontally striped",
    "diagonal stripes": "diagonally striped",
    "checkered": "checkered",
    "gradient": "gradient",
    "dotted": "dotted",
    "cloudy": "cloudy",
}
_PHRASE_TO_BACKGROUND = {v: k for k, v in BACKGROUND_PHRASES.items()}

#: Motion directions of moving scenes -> unit step (dx, dy) in image coordinates (y down).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0),
    "down right": (1, 1),
    "down": (0, 1),
    "down left": (-1, 1),
    "left": (-1, 0),
    "up left": (-1, -1),
    "up": (0, -1),
    "up right": (1, -1),
}

_FUNCTION_WORDS = ("a", "at", "the", "and", "on", "background", "moving")


def _build_vocab() -> list[str]:
    words: set[str] = set(_FUNCTION_WORDS)
    for group in (SHAPES, COLOURS, SIZES, POSITIONS, tuple(BACKGROUND_PHRASES.values()), tuple(DIRECTIONS)):
        for phrase in group:
            words.update(phrase.split())
    return sorted(words)


#: Sorted list of every word that can appear in a scene or moving-scene caption.
SCENE_VOCAB: list[str] = _build_vocab()

#: Class names for each label head of the evaluation classifier (see :func:`scene_labels`).
LABEL_NAMES: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "position": list(POSITIONS),
    "size": list(SIZES),
    "background": list(BACKGROUNDS),
    "background_colour": list(COLOURS),
}

#: Minimum RGB distance between an object's nominal colour and the background's colours.
_MIN_CONTRAST = 115.0

# --------------------------------------------------------------------------------------------
# Scene container and captions
# --------------------------------------------------------------------------------------------


@dataclass
class Scene:
    """One procedural scene.

    Attributes:
        image: ``np.uint8`` array ``[size, size, 3]``.
        caption: e.g. ``"a small red triangle at the top left on a checkered gray background"``.
        attributes: ``{"objects": [per-object dict], "background": kind, "background_colour":
            name, ...}``. Each object dict has the caption-level keys ``shape``, ``colour``,
            ``size``, ``position`` plus render details (``center`` (x, y) in pixels, ``radius``,
            ``rotation`` in degrees, ``shading``). Object 0 is drawn on top.
    """

    image: np.ndarray
    caption: str
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, int]:
        return scene_labels(self)


class MovingScene(NamedTuple):
    """A short clip: ``frames`` is ``np.uint8 [T, size, size, 3]``; caption and attributes as in
    :class:`Scene`, with ``direction``/``velocity``/``start``/``end`` per object instead of a
    grid position."""

    frames: np.ndarray
    caption: str
    attributes: dict[str, Any]


def _object_phrase(obj: dict[str, Any]) -> str:
    head = f"a {obj['size']} {obj['colour']} {obj['shape']}"
    if "direction" in obj:
        return f"{head} moving {obj['direction']}"
    return f"{head} at the {obj['position']}"


def make_caption(attributes: dict[str, Any]) -> str:
    """Caption for a scene's attributes (inverse of :func:`parse_caption`)."""
    objects = " and ".join(_object_phrase(o) for o in attributes["objects"])
    bg = BACKGROUND_PHRASES[attributes["background"]]
    return f"{objects} on a {bg} {attributes['background_colour']} background"


def caption_words(caption: str) -> list[str]:
    """Split a caption into vocabulary words (lower-cased, whitespace separated)."""
    return caption.lower().split()


def parse_caption(caption: str) -> dict[str, Any]:
    """Parse a scene (or moving-scene) caption back into attributes.

    Returns ``{"objects": [{"shape", "colour", "size", "position"} or {..., "direction"}],
    "background": kind, "background_colour": name}``. Raises ``ValueError`` on anything that
    :func:`make_caption` could not have produced.
    """
    words = caption_words(caption)
    try:
        on = len(words) - 1 - words[::-1].index("on")
    except ValueError:
        raise ValueError(f"no background clause in caption {caption!r}") from None
    obj_words, bg_words = words[:on], words[on + 1 :]
    if len(bg_words) < 4 or bg_words[0] != "a" or bg_words[-1] != "background":
        raise ValueError(f"malformed background clause in {caption!r}")
    bg_colour = bg_words[-2]
    bg_phrase = " ".join(bg_words[1:-2])
    if bg_colour not in COLOUR_RGB or bg_phrase not in _PHRASE_TO_BACKGROUND:
        raise ValueError(f"unknown background {bg_phrase!r} {bg_colour!r} in {caption!r}")

    objects: list[dict[str, Any]] = []
    # split object clauses on "and"
    clauses: list[list[str]] = [[]]
    for w in obj_words:
        if w == "and":
            clauses.append([])
        else:
            clauses[-1].append(w)
    for cl in clauses:
        if len(cl) < 5 or cl[0] != "a":
            raise ValueError(f"malformed object clause {' '.join(cl)!r} in {caption!r}")
        size, colour, shape = cl[1], cl[2], cl[3]
        if size not in SIZES or colour not in COLOUR_RGB or shape not in SHAPES:
            raise ValueError(f"unknown object words {cl[1:4]} in {caption!r}")
        obj: dict[str, Any] = {"shape": shape, "colour": colour, "size": size}
        if cl[4] == "at" and len(cl) >= 7 and cl[5] == "the":
            pos = " ".join(cl[6:])
            if pos not in POSITIONS:
                raise ValueError(f"unknown position {pos!r} in {caption!r}")
            obj["position"] = pos
        elif cl[4] == "moving":
            direction = " ".join(cl[5:])
            if direction not in DIRECTIONS:
                raise ValueError(f"unknown direction {direction!r} in {caption!r}")
            obj["direction"] = direction
        else:
            raise ValueError(f"malformed object clause {' '.join(cl)!r} in {caption!r}")
        objects.append(obj)
    return {"objects": objects, "background": _PHRASE_TO_BACKGROUND[bg_phrase], "background_colour": bg_colour}


def labels_from_attributes(attributes: dict[str, Any]) -> dict[str, int]:
    """Integer labels (indices into :data:`LABEL_NAMES`) of the FIRST object and the background.

    Keys: ``shape``, ``colour``, ``position``, ``size``, ``background``, ``background_colour``.
    For moving scenes (no grid position) ``position`` is ``-1``.
    """
    o = attributes["objects"][0]
    return {
        "shape": SHAPES.index(o["shape"]),
        "colour": COLOURS.index(o["colour"]),
        "position": POSITIONS.index(o["position"]) if "position" in o else -1,
        "size": SIZES.index(o["size"]),
        "background": BACKGROUNDS.index(attributes["background"]),
        "background_colour": COLOURS.index(attributes["background_colour"]),
    }


def scene_labels(scene: Scene) -> dict[str, int]:
    """Labels of a scene for the evaluation classifier (see :func:`labels_from_attributes`)."""
    return labels_from_attributes(scene.attributes)


def caption_labels(caption: str) -> dict[str, int]:
    """Labels a generated image should have if it follows ``caption`` (prompt adherence)."""
    return labels_from_attributes(parse_caption(caption))


# --------------------------------------------------------------------------------------------
# Rendering helpers (all vectorised numpy; images are float32 in 0..255 until the end)
# --------------------------------------------------------------------------------------------


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


def _finish(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Colour cast + per-pixel sensor noise, then quantise to uint8. ``img``: [..., H, W, 3]."""
    gain = 1.0 + rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
    sigma_l = float(rng.uniform(3.0, 9.0))
    sigma_c = float(rng.uniform(1.0, 3.0))
    shape = img.shape
    noise = rng.standard_normal(shape[:-1] + (1,), dtype=np.float32) * sigma_l
    noise = noise + rng.standard_normal(shape, dtype=np.float32) * sigma_c
    out = img * gain + noise
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), {"noise_sigma": sigma_l, "chroma_noise_sigma": sigma_c}


# --------------------------------------------------------------------------------------------
# Static scenes
# --------------------------------------------------------------------------------------------


def make_scene(seed: int, size: int = 64, max_objects: int = 2) -> Scene:
    """Render one procedural scene, fully determined by ``seed``.

    Args:
        seed: any non-negative integer; equal seeds give byte-identical scenes.
        size: image side in pixels (64 is the zoo's resolution; shapes scale with it).
        max_objects: 1..9; the scene has ``1..max_objects`` objects (uniform), each in a
            distinct cell of the 3x3 grid.

    Returns:
        :class:`Scene` with ``image`` ``np.uint8 [size, size, 3]``.
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

    image, noise_params = _finish(rng, img)
    attributes = {
        "objects": objects,
        "background": bg_kind,
        "background_colour": bg_colour,
        "background_params": bg_params,
        **noise_params,
    }
    return Scene(image=image, caption=make_caption(attributes), attributes=attributes)


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
    t = torch.from_numpy(np.array(image, dtype=np.float32, copy=True))
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


# --------------------------------------------------------------------------------------------
# Natural-image crops
# --------------------------------------------------------------------------------------------

#: Source images (name -> loader) that ship inside scikit-learn / scikit-image; no download.
#: Order defines the class index.
NATURAL_CLASSES: list[str] = [
    "china",
    "flower",
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "rocket",
    "retina",
    "brick",
    "grass",
    "gravel",
    "page",
    "motorcycle",
]

_NATURAL_LOCK = threading.Lock()
_NATURAL_RAW: dict[str, np.ndarray] = {}
_NATURAL_RESIZED: dict[int, list[Any]] = {}


def _load_natural_raw(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    import skimage.data as skd

    if name == "motorcycle":
        img = skd.stereo_motorcycle()[0]
    else:
        img = getattr(skd, name)()
    return np.asarray(img)


def _as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def load_natural_images() -> dict[str, np.ndarray]:
    """All source images at their original resolution, ``name -> np.uint8 [H, W, 3]`` (grayscale
    sources replicated to RGB). Loaded once per process; nothing is downloaded."""
    with _NATURAL_LOCK:
        for name in NATURAL_CLASSES:
            if name not in _NATURAL_RAW:
                _NATURAL_RAW[name] = _as_rgb_uint8(_load_natural_raw(name))
        return {n: _NATURAL_RAW[n] for n in NATURAL_CLASSES}


def _natural_sources(size: int) -> list[Any]:
    """Source images as PIL images resized so the short side is ``3 * size`` (a crop at scale 1
    spans a third of the short side, so content stays recognisable)."""
    from PIL import Image

    raw = load_natural_images()
    with _NATURAL_LOCK:
        if size not in _NATURAL_RESIZED:
            out = []
            for name in NATURAL_CLASSES:
                a = raw[name]
                h, w = a.shape[:2]
                k = 3 * size / min(h, w)
                im = Image.fromarray(a).resize((max(round(w * k), 1), max(round(h * k), 1)), Image.Resampling.LANCZOS)
                out.append(im)
            _NATURAL_RESIZED[size] = out
        return _NATURAL_RESIZED[size]


def natural_crop(label: int, seed: int, size: int = 64, min_std: float = 6.0, tries: int = 10) -> np.ndarray:
    """One random crop of source ``NATURAL_CLASSES[label]``: ``np.uint8 [size, size, 3]``.

    The crop window is ``size * s`` pixels with ``s ~ U(0.5, 1.5)`` at a uniform position,
    resampled to ``size`` (Lanczos) and flipped horizontally with probability 1/2. Nearly flat
    windows (std < ``min_std``, e.g. the black border of ``retina``) are redrawn up to ``tries``
    times.
    """
    from PIL import Image

    src = _natural_sources(size)[label]
    rng = np.random.default_rng(seed)
    w_img, h_img = src.size
    crop = None
    for _ in range(tries):
        win = size * float(rng.uniform(0.5, 1.5))
        win = min(win, w_img, h_img)
        x0 = float(rng.uniform(0, w_img - win))
        y0 = float(rng.uniform(0, h_img - win))
        flip = bool(rng.integers(2))
        crop = np.asarray(src.resize((size, size), Image.Resampling.LANCZOS, box=(x0, y0, x0 + win, y0 + win)))
        if flip:
            crop = crop[:, ::-1]
        if crop.std() >= min_std:
            break
    assert crop is not None
    return np.ascontiguousarray(crop)


class NaturalCropDataset(Dataset):
    """``n`` random crops of the bundled natural images; class-balanced (item ``i`` has label
    ``i % len(NATURAL_CLASSES)``), deterministic per ``(seed, i)``.

    Items: ``{"image": float32 [3, size, size] in [-1, 1], "label": int}``.
    """

    def __init__(self, n: int, size: int = 64, seed: int = 0):
        self.n, self.size, self.seed = int(n), int(size), int(seed)

    def __len__(self) -> int:
        return self.n

    def crop(self, i: int) -> tuple[np.ndarray, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        label = i % len(NATURAL_CLASSES)
        return natural_crop(label, scene_seed(self.seed, i), self.size), label

    def __getitem__(self, i: int) -> dict[str, Any]:
        img, label = self.crop(int(i))
        return {"image": image_to_tensor(img), "label": label}


# --------------------------------------------------------------------------------------------
# Text corpus
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Moving scenes
# --------------------------------------------------------------------------------------------


def make_moving_scene(seed: int, size: int = 64, frames: int = 8, max_objects: int = 2) -> MovingScene:
    """A clip of ``1..max_objects`` shapes moving at constant velocity over a static background.

    Each object moves in one of the 8 :data:`DIRECTIONS` at 1.2..2.6 pixels per frame (scaled
    with ``size / 64``) and stays inside the frame throughout. Background and its noise are
    identical in every frame; object shading/noise move with the object.

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
    bg_u8, noise_params = _finish(rng, bg)

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
        step = speed / math.hypot(ux, uy)
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
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "size": size_name,
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
    out = np.empty((frames, size, size, 3), np.uint8)
    bg_f = bg_u8.astype(np.float32)
    for t in range(frames):
        img = bg_f.copy()
        for o, fill in reversed(list(zip(objects, fills))):
            cx = o["start"][0] + o["velocity"][0] * t
            cy = o["start"][1] + o["velocity"][1] * t
            alpha, (y0, y1, x0, x1) = _object_alpha(o["shape"], cx, cy, o["radius"], o["rotation"], size)
            col = fill(yy_full[y0:y1, x0:x1], xx_full[y0:y1, x0:x1], cx, cy, o["radius"])
            shift = (int(round(o["velocity"][1] * t)), int(round(o["velocity"][0] * t)))
            col = col + np.roll(obj_noise, shift, axis=(0, 1))[y0:y1, x0:x1]
            a = alpha[..., None]
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + col * a
        out[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    attributes = {
        "objects": objects,
        "background": bg_kind,
        "background_colour": bg_colour,
        "background_params": bg_params,
        "frames": frames,
        **noise_params,
    }
    return MovingScene(frames=out, caption=make_caption(attributes), attributes=attributes)


# --------------------------------------------------------------------------------------------
# CLI preview
# --------------------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> None:
    import argparse

    from torchvision.utils import save_image

    ap = argparse.ArgumentParser(prog="python -m mmspec.zoo.data", description="Write preview grids of the zoo data.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n", type=int, default=16, help="number of scenes / crops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--zoom", type=int, default=2, help="nearest-neighbour upscaling of the saved grids")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    def save(batch: torch.Tensor, path: str, nrow: int) -> None:
        x = (batch + 1) / 2
        if args.zoom > 1:
            x = torch.nn.functional.interpolate(x, scale_factor=args.zoom, mode="nearest")
        save_image(x, path, nrow=nrow, padding=2 * args.zoom, pad_value=1.0)

    nrow = max(1, int(math.ceil(math.sqrt(args.n))))
    scenes = SceneDataset(args.n, size=args.size, seed=args.seed)
    items = [scenes[i] for i in range(args.n)]
    save(torch.stack([it["image"] for it in items]), os.path.join(args.out, "scenes.png"), nrow)
    with open(os.path.join(args.out, "scenes.txt"), "w") as fh:
        for i, it in enumerate(items):
            fh.write(f"{i // nrow},{i % nrow}: {it['caption']}\n")

    crops = NaturalCropDataset(args.n, size=args.size, seed=args.seed)
    citems = [crops[i] for i in range(args.n)]
    save(torch.stack([it["image"] for it in citems]), os.path.join(args.out, "natural.png"), nrow)
    with open(os.path.join(args.out, "natural.txt"), "w") as fh:
        for i, it in enumerate(citems):
            fh.write(f"{i // nrow},{i % nrow}: {NATURAL_CLASSES[it['label']]}\n")

    clips = [make_moving_scene(scene_seed(args.seed, i), args.size) for i in range(4)]
    save(torch.cat([image_to_tensor(c.frames) for c in clips]), os.path.join(args.out, "moving.png"), clips[0].frames.shape[0])
    with open(os.path.join(args.out, "moving.txt"), "w") as fh:
        for i, c in enumerate(clips):
            fh.write(f"row {i}: {c.caption}\n")
    print(f"wrote previews to {args.out}")


if __name__ == "__main__":
    _main()
