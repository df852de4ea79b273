"""Loaders and helpers for the models that ship inside the package (the "bundled zoo").

Three models live under ``mmspec/zoo/weights/`` (fp16 safetensors + JSON configs, trained by the recipes in
:mod:`mmspec.zoo.recipes`; see ``mmspec/zoo/cards/`` for how):

* ``vq4096/`` and ``vq/``: diffusers :class:`~diffusers.VQModel` image tokenizers. 64x64 RGB in ``[-1, 1]`` <-> a
  16x16 grid of codes (256 tokens per image, row-major) from a 4,096- or 1,024-entry codebook. A token model's
  config names the one whose codes it generates (:func:`tag_vq`, :func:`load_vq_for`).
  :func:`load_vq`, :func:`encode_images`, :func:`decode_tokens`, :func:`codebook`.
* ``classifier/``: :class:`SceneClassifier`, the evaluation classifier of procedural scenes (the
  GenEval/CLIP-score analogue for prompt adherence, and the feature space of the FID analogue).
  :func:`load_classifier`, :func:`classify`, :func:`features`, :func:`frechet_distance`.

Everything loads from local files; nothing is downloaded.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ModelMixin, VQModel
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .data import LABEL_NAMES, POSITIONS

__all__ = [
    "WEIGHTS_DIR",
    "weights_path",
    "load_vq",
    "load_vq_for",
    "tag_vq",
    "tag_vq_folder",
    "vq_tag",
    "codebook_id",
    "encode_images",
    "decode_tokens",
    "codebook",
    "code_statistics",
    "SceneClassifier",
    "load_classifier",
    "classify",
    "classify_grid",
    "features",
    "frechet_distance",
]

#: Directory of the bundled weights (inside the installed package).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_BUNDLED = ("vq", "vq4096", "classifier")


def weights_path(name: str) -> Path:
    """Directory of bundled model ``name``: ``"vq"`` (the 1,024-code tokenizer of the first token models),
    ``"vq4096"`` (the 4,096-code tokenizer of `cards/vq.md`) or ``"classifier"``. Which tokenizer a token model
    generates is in its config (:func:`load_vq_for`)."""
    if name not in _BUNDLED:
        raise ValueError(f"unknown bundled model {name!r}; expected one of {_BUNDLED}")
    path = WEIGHTS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"bundled weights for {name!r} are missing at {path}; train them with "
            f"`python -m mmspec.zoo.train {name} --out {path}`"
        )
    return path


def _resolve(name: str, path: str | os.PathLike | None) -> Path:
    if path is None:
        return weights_path(name)
    p = Path(path)
    if not p.is_dir():
        hint = " (device and dtype are keyword arguments)" if str(path).split(":")[0] in ("cpu", "cuda", "mps", "xpu") else ""
        raise FileNotFoundError(f"no saved model directory at {str(path)!r}{hint}")
    return p


# --------------------------------------------------------------------------------------------
# VQ tokenizer
# --------------------------------------------------------------------------------------------


def load_vq(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VQModel:
    """The bundled image tokenizer (or the one saved at ``path``), in eval mode.

    Weights are stored in float16 and cast to ``dtype`` (float32 by default: the CPU has no fast
    half-precision convolutions, and codes of a float32 encoder are the reference).
    """
    vq = VQModel.from_pretrained(str(_resolve("vq", path)), torch_dtype=dtype)
    return vq.to(device).eval()


#: The tokenizer of a token model whose config names none (the models trained before configs named theirs).
DEFAULT_VQ = "vq"


def codebook_id(vq: VQModel) -> str:
    """A fingerprint of a VQ tokenizer's codebook: the codes a token model learns (its decoder may change)."""
    import hashlib

    return hashlib.sha1(codebook(vq).detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def tag_vq(config, vq: VQModel, name: str | os.PathLike | None) -> None:
    """Write into a token model's ``config`` which tokenizer its codes belong to: ``config.zoo_vq = {"name": ...,
    "codebook": codebook_id(vq)}`` (``name``: the tokenizer's folder or bundled name; None: the default one), so
    :func:`load_vq_for` finds it again and refuses a tokenizer with other codes."""
    config.zoo_vq = {"name": DEFAULT_VQ if name is None else Path(name).name, "codebook": codebook_id(vq)}


#: The file beside a diffusers-layout token model (whose frozen config takes no new keys) naming its tokenizer.
VQ_TAG_FILE = "zoo_vq.json"


def tag_vq_folder(folder: str | os.PathLike, vq: VQModel, name: str | os.PathLike | None) -> None:
    """:func:`tag_vq` for a saved model folder: writes the tag to ``folder/zoo_vq.json`` (for the LlamaGen models,
    whose diffusers config is frozen)."""
    import json

    cfg = type("Tag", (), {})()
    tag_vq(cfg, vq, name)
    (Path(folder) / VQ_TAG_FILE).write_text(json.dumps(cfg.zoo_vq) + "\n")


def vq_tag(config) -> dict[str, str]:
    """The tokenizer tag (:func:`tag_vq`) of a token model's ``config``, or of a saved model's folder (read through
    its ``zoo_vq.json``, :func:`tag_vq_folder`); ``{"name": DEFAULT_VQ}`` when it names none."""
    if isinstance(config, (str, os.PathLike)):
        import json

        file = Path(config) / VQ_TAG_FILE
        tag = json.loads(file.read_text()) if file.is_file() else None
    else:
        tag = getattr(config, "zoo_vq", None)
    return tag or {"name": DEFAULT_VQ}


def load_vq_for(config, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VQModel:
    """The bundled tokenizer whose codes the token model with this ``config`` (or saved in this folder) generates
    (:func:`vq_tag`). Raises ``ValueError`` when that tokenizer's codebook is not the one the model was trained on
    (its images would decode to noise)."""
    tag = vq_tag(config)
    vq = load_vq(weights_path(tag["name"]), device=device, dtype=dtype)
    if tag.get("codebook") not in (None, codebook_id(vq)):
        raise ValueError(f"the model was trained on the codes of tokenizer {tag['name']!r} with codebook "
                         f"{tag['codebook']}, but the bundled {tag['name']!r} has codebook {codebook_id(vq)}; "
                         "retrain one of them or restore the matching weights")
    return vq


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a float tensor [B, 3, H, W] in [-1, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [-1, 1] (see mmspec.zoo.data.image_to_tensor), got {images.dtype}")


def _vq_param(vq: VQModel) -> torch.Tensor:
    return vq.quantize.embedding.weight


@torch.no_grad()
def encode_images(vq: VQModel, images: torch.Tensor) -> torch.LongTensor:
    """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> codes ``LongTensor [B, (H/4) * (W/4)]``, row-major
    over the code grid (``[B, 256]`` for 64x64 images).

    Uses the model's own nearest-codebook lookup (``vq.quantize``), so codes are exactly those
    that diffusers' ``VQModel.forward`` would quantize to.
    """
    _check_images(images)
    w = _vq_param(vq)
    h = vq.encode(images.to(device=w.device, dtype=w.dtype)).latents
    _, _, (_, _, idx) = vq.quantize(h)
    return idx.reshape(h.shape[0], h.shape[2] * h.shape[3]).long()


@torch.no_grad()
def decode_tokens(vq: VQModel, tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Codes ``[B, L]`` (row-major, ``L = gh * gw``; square grid unless ``grid`` is given) ->
    images ``[B, 3, 4 * gh, 4 * gw]`` in ``[-1, 1]`` (clamped), in the model's dtype."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError(f"tokens must be a LongTensor [B, L], got {getattr(tokens, 'shape', type(tokens).__name__)}")
    n_codes = vq.config.num_vq_embeddings
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= n_codes):
        raise ValueError(f"tokens must lie in [0, {n_codes}), got range [{int(tokens.min())}, {int(tokens.max())}]")
    b, length = tokens.shape
    if grid is None:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"{length} tokens per image do not form a square grid; pass grid=(gh, gw)")
        grid = (side, side)
    if grid[0] * grid[1] != length:
        raise ValueError(f"grid {grid} does not hold {length} tokens")
    w = _vq_param(vq)
    shape = (b, grid[0], grid[1], w.shape[1])
    z_q = vq.quantize.get_codebook_entry(tokens.reshape(-1).to(w.device).long(), shape)
    return vq.decode(z_q, force_not_quantize=True).sample.clamp(-1.0, 1.0)


def codebook(vq: VQModel) -> torch.Tensor:
    """The code vectors ``[N, D]`` (a detached copy, float32), e.g. for LANTERN neighbour tables."""
    return _vq_param(vq).detach().float().clone()


def code_statistics(tokens: torch.Tensor, n_codes: int) -> dict[str, float]:
    """Usage and unigram entropy of a bag of codes (any shape).

    Returns ``usage`` (fraction of the ``n_codes`` codes that occur), ``used`` (their count),
    ``entropy_nats`` of the empirical unigram distribution, and ``perplexity`` (``exp`` of it).
    """
    counts = torch.bincount(tokens.reshape(-1).long().cpu(), minlength=n_codes).double()
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    ent = float(-(nz * nz.log()).sum())
    used = int((counts > 0).sum())
    return {"usage": used / n_codes, "used": used, "entropy_nats": ent, "perplexity": math.exp(ent)}


# --------------------------------------------------------------------------------------------
# Evaluation classifier
# --------------------------------------------------------------------------------------------

_OBJECT_HEADS = ("shape", "colour", "size")
_N_CELLS = len(POSITIONS)


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SceneClassifier(ModelMixin, ConfigMixin):
    """Small CNN that reads a 64x64 procedural scene (see :mod:`mmspec.zoo.data`).

    A trunk maps the image, plus a colour-blind edge channel (the RGB Sobel gradient magnitude,
    which makes shapes learnable in minutes instead of hours: object/background colour pairs vary
    widely, silhouettes do not) and two coordinate channels, to a 16x16 feature map. Objects are read
    per cell of the 3x3 position grid by one cell head shared by the nine cells: it looks at the
    8x8 window of the feature map around its cell (a 32x32-pixel glimpse, so each object appears
    roughly centred), adds a learned cell embedding, and predicts the cell's shape, colour and size,
    with an extra class 0 meaning "no object here". Background kind and colour come from a global
    branch (mean and max pooling of the trunk). The "first object" heads of
    :data:`~mmspec.zoo.data.LABEL_NAMES` are read off the grid by :func:`classify` (the occupied
    cell, or the cell a caption names), because nothing in an image says which of several objects
    a caption mentions first.

    ``forward(images [B, 3, 64, 64]) -> dict``: ``features [B, global_dim + cell_dim]``
    (penultimate layer: the global hidden units and the cell hidden units averaged over cells; the
    space of the Frechet distance), ``grid_shape [B, 9, 1 + 8]``, ``grid_colour [B, 9, 1 + 9]``,
    ``grid_size [B, 9, 1 + 3]``, ``background [B, 8]``, ``background_colour [B, 9]`` logits.
    """

    @register_to_config
    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), head_channels: int = 96, cell_dim: int = 128, global_dim: int = 128, image_size: int = 64):
        super().__init__()
        c1, c2, c3 = channels
        self.trunk = nn.Sequential(
            _conv_block(6, c1, 1),  # RGB + edge magnitude + 2 coordinate channels
            _conv_block(c1, c2, 2),
            _conv_block(c2, c2, 1),
            _conv_block(c2, c3, 2),
            _conv_block(c3, c3, 1),
        )
        self.cell_embedding = nn.Parameter(torch.zeros(_N_CELLS, c3, 1, 1))
        self.cell_conv = nn.Sequential(_conv_block(c3, head_channels, 2), _conv_block(head_channels, head_channels, 1))
        self.cell_hidden = nn.Sequential(nn.Linear(2 * head_channels, cell_dim), nn.ReLU(inplace=True))
        self._cell_split = [1 + len(LABEL_NAMES[k]) for k in _OBJECT_HEADS]
        self.cell_out = nn.Linear(cell_dim, sum(self._cell_split))
        self.global_hidden = nn.Sequential(nn.Linear(2 * c3, global_dim), nn.ReLU(inplace=True))
        self.background = nn.Linear(global_dim, len(LABEL_NAMES["background"]))
        self.background_colour = nn.Linear(global_dim, len(LABEL_NAMES["background_colour"]))
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, image_size), torch.linspace(-1, 1, image_size), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys])[None], persistent=False)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4
        self.register_buffer("sobel", torch.stack([sobel, sobel.t()])[:, None], persistent=False)

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, 1, H, W]``: gradient magnitude over the RGB channels (x2)."""
        b, ch, hgt, wid = images.shape
        g = F.conv2d(F.pad(images.reshape(b * ch, 1, hgt, wid), (1, 1, 1, 1), mode="replicate"), self.sobel.to(images.dtype))
        return 2.0 * g.reshape(b, ch * 2, hgt, wid).pow(2).sum(1, keepdim=True).add(1e-6).sqrt()

    def _glimpses(self, h: torch.Tensor) -> torch.Tensor:
        """``[B, C, S, S]`` -> ``[B * 9, C, S/2, S/2]``: the window around each cell, row-major."""
        s = h.shape[-1]
        w, step = s // 2, s // 4
        return torch.stack([h[:, :, r * step : r * step + w, c * step : c * step + w] for r in range(3) for c in range(3)], 1).flatten(0, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b = images.shape[0]
        coords = self.coords.to(images.dtype)
        if coords.shape[-2:] != images.shape[-2:]:
            coords = F.interpolate(coords, size=images.shape[-2:], mode="bilinear", align_corners=True)
        h = self.trunk(torch.cat([images, self.edges(images), coords.expand(b, -1, -1, -1)], dim=1))  # [B, c3, 16, 16]
        g = self.global_hidden(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))
        cells = self.cell_conv(self._glimpses(h) + self.cell_embedding.repeat(b, 1, 1, 1))
        cells = self.cell_hidden(torch.cat([cells.mean((2, 3)), cells.amax((2, 3))], dim=1)).view(b, _N_CELLS, -1)
        shape, colour, size = self.cell_out(cells).split(self._cell_split, dim=-1)
        return {
            "features": torch.cat([g, cells.mean(1)], dim=1),
            "grid_shape": shape,
            "grid_colour": colour,
            "grid_size": size,
            "background": self.background(g),
            "background_colour": self.background_colour(g),
        }


def load_classifier(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> SceneClassifier:
    """The bundled evaluation classifier (or the one saved at ``path``), in eval mode."""
    clf = SceneClassifier.from_pretrained(str(_resolve("classifier", path)), torch_dtype=dtype)
    return clf.to(device).eval()


def _run(clf: SceneClassifier, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    _check_images(images)
    p = next(clf.parameters())
    outs: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            outs.append(clf(images[i : i + batch_size].to(device=p.device, dtype=p.dtype)))
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]} if outs else {}


def classify_grid(clf: SceneClassifier, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-cell predictions: ``grid_shape``/``grid_colour``/``grid_size`` ``LongTensor [B, 9]``
    (0 = empty cell, else 1 + class index), ``occupied`` ``FloatTensor [B, 9]`` (probability that
    the cell holds an object), ``background``/``background_colour`` ``LongTensor [B]``."""
    out = _run(clf, images, batch_size)
    return {
        "grid_shape": out["grid_shape"].argmax(-1),
        "grid_colour": out["grid_colour"].argmax(-1),
        "grid_size": out["grid_size"].argmax(-1),
        "occupied": 1.0 - out["grid_shape"].float().softmax(-1)[..., 0],
        "background": out["background"].argmax(-1),
        "background_colour": out["background_colour"].argmax(-1),
    }


def classify(clf: SceneClassifier, images: torch.Tensor, positions: torch.Tensor | None = None, batch_size: int = 256) -> dict[str, torch.LongTensor]:
    """Predicted labels of each head of :data:`~mmspec.zoo.data.LABEL_NAMES` (indices into it),
    ``dict[head, LongTensor [B]]``, comparable with :func:`~mmspec.zoo.data.scene_labels` and
    :func:`~mmspec.zoo.data.caption_labels`.

    Args:
        images: ``[B, 3, 64, 64]`` in ``[-1, 1]``.
        positions: optional ``LongTensor [B]`` of grid cells (indices into ``POSITIONS``), e.g.
            the ``position`` label of each image's caption. Without it, the object heads describe
            the most confidently occupied cell (the object of a one-object scene). With it, they
            describe the object in that cell (prompt adherence in multi-object scenes), and
            ``position`` equals it when that cell is predicted occupied, else the most confident
            occupied cell (so a missing or misplaced object scores as a wrong position).
    """
    out = _run(clf, images, batch_size)
    probs = {k: out[f"grid_{k}"].float().softmax(-1) for k in _OBJECT_HEADS}
    occupied = 1.0 - probs["shape"][..., 0]  # [B, 9]
    best = occupied.argmax(-1)
    if positions is None:
        cell = best
        position = best
    else:
        positions = torch.as_tensor(positions, dtype=torch.long, device=best.device).reshape(-1)
        if positions.shape[0] != images.shape[0]:
            raise ValueError(f"positions must have one cell per image ({images.shape[0]}), got {tuple(positions.shape)}")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= _N_CELLS):
            raise ValueError(f"positions must be cell indices in [0, {_N_CELLS}), got {positions.tolist()}")
        cell = positions
        here = occupied.gather(1, positions[:, None])[:, 0] > 0.5
        position = torch.where(here, positions, best)
    result: dict[str, torch.Tensor] = {}
    for k in _OBJECT_HEADS:
        p = probs[k].gather(1, cell[:, None, None].expand(-1, 1, probs[k].shape[-1]))[:, 0]
        result[k] = p[:, 1:].argmax(-1)  # the best non-empty class of that cell
    result["position"] = position
    result["background"] = out["background"].argmax(-1)
    result["background_colour"] = out["background_colour"].argmax(-1)
    return {k: result[k].long().cpu() for k in LABEL_NAMES}


def features(clf: SceneClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate-layer features ``[B, F]`` (float32) of the classifier, for :func:`frechet_distance`."""
    return _run(clf, images, batch_size)["features"].float().cpu()


def _as_float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, F], got shape {a.shape}")
    return a


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, F]`` and ``[M, F]``:
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``.

    Computed in float64 with symmetric eigendecompositions, ``tr((S_a S_b)^(1/2)) = sum sqrt(eig(
    S_a^(1/2) S_b S_a^(1/2)))``, which stays real and well defined for singular (rank-deficient)
    covariances, unlike a general matrix square root. Needs at least 2 samples per set; with fewer
    samples than feature dimensions the estimate is biased upwards, as FID is.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("each feature set needs at least 2 samples")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(s_a)
    m = root_a @ s_b @ root_a
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_cross = float(np.sqrt(np.clip(eig, 0, None)).sum())
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_cross)
    return max(d, 0.0)
