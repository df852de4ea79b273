"""Natural-image crops of the sample images bundled with scikit-learn and scikit-image (no download)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .scenes import image_to_tensor, scene_seed

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
