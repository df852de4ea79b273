"""Recipe of the bundled image tokenizer: a diffusers ``VQModel``, 64x64 RGB <-> 16x16 codes.

Architecture: diffusers ``VQModel`` with three encoder/decoder levels (two 2x downsamplings),
``layers_per_block=1``, no attention (so the model is fully convolutional and can train on crops),
a low-dimensional codebook lookup (``vq_embed_dim=8``: 1024 codes of dimension 8 behind 1x1
``quant_conv``/``post_quant_conv``), which keeps nearest-neighbour assignment well spread.

Training (CPU, wall-clock budgeted; phases are fractions of the budget):

1. ``ae_phase``: plain autoencoder on 32x32 crops (no quantisation), so the encoder's outputs mean
   something before the codebook is fitted to them.
2. k-means initialisation of the codebook on encoder outputs of fresh crops, then VQ training on
   32x32 crops: straight-through estimator, commitment loss ``beta * |z - sg(e)|^2``, codebook
   updated as an exponential moving average of assigned encoder outputs (the VQ-VAE-2 / SoundStream
   k-means-style update), and dead-code restarts: every ``restart_every`` steps each code whose
   EMA hit rate fell below ``dead_fraction`` of the uniform rate is moved onto an encoder output of
   the current batch, drawn with probability proportional to its quantisation error (so busy,
   badly-fitted clusters are split).
3. ``full_phase``: the same on whole 64x64 images (border statistics and GroupNorm statistics of
   the inference resolution).

Reconstruction loss: L1 + L2 + ``edge_weight`` * L1 of horizontal/vertical finite differences.
Data: a stream of fresh procedural scenes (1..``max_objects`` objects) and natural crops mixed
``scene_fraction`` : 1 - ``scene_fraction``; held-out metrics use disjoint seed streams.

The codebook stays a plain ``nn.Embedding`` inside ``VQModel.quantize``, so the saved model is a
standard diffusers VQModel and encoding uses diffusers' own nearest-code lookup.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import VQModel
from tqdm.auto import tqdm

from .. import hub
from ..data import LABEL_NAMES, image_to_tensor
from .common import (
    HELDOUT_CROP_SEED,
    HELDOUT_SCENE_SEED,
    TRAIN_CROP_SEED,
    TRAIN_SCENE_SEED,
    Budget,
    Checkpoint,
    cosine_lr,
    crop_batch,
    dir_size_bytes,
    label_tensors,
    plot_loss_curve,
    prefetch,
    psnr,
    save_fp16,
    scene_batch,
    seed_everything,
    setup_threads,
    write_json,
)


@dataclass
class VQRecipe:
    # architecture
    block_out_channels: tuple[int, ...] = (16, 32, 128)
    layers_per_block: int = 1
    latent_channels: int = 16
    vq_embed_dim: int = 8
    num_codes: int = 1024
    norm_num_groups: int = 8
    # data
    scene_fraction: float = 0.8
    max_objects: int = 3
    crop: int = 32
    batch_size: int = 16
    full_batch_size: int = 8
    # schedule (fractions of the budget)
    ae_phase: float = 0.05
    full_phase: float = 0.2
    lr: float = 2e-3
    warmup_steps: int = 50
    # quantiser
    beta: float = 0.25
    ema_decay: float = 0.99
    dead_fraction: float = 0.03
    restart_every: int = 20
    kmeans_crops: int = 256
    kmeans_iters: int = 20
    # loss
    edge_weight: float = 0.5
    #: reconstruct the scene's render without sensor noise (``Scene.clean``) from the noisy image (natural
    #: crops are reconstructed as they are). Tried (cards/vq.md): it does *not* make the codes noise-invariant
    denoise: bool = False
    #: train the decoder (and ``post_quant_conv``) only, from ``init_from``'s weights: the encoder, ``quant_conv``
    #: and the codebook stay bit for bit, so every image keeps its codes and the token models trained on them stay
    #: valid. Scenes decode to their noise-free render, from the codes of the noisy image or (every other scene) of
    #: the noise-free render itself (the codes the t2i models learn).
    decoder_only: bool = False
    #: extra weight of the pixels within ``object_halo`` radii of a scene object's centre (0: none)
    object_weight: float = 4.0
    object_halo: float = 1.3
    #: weight of a perceptual loss (LPIPS-style: channel-normalised activations of every trunk block of a frozen
    #: scene classifier, reconstruction against target), on whole-image steps only (the classifier reads 64x64
    #: images with their coordinates; see ``full_phase``). 0: off
    perceptual_weight: float = 0.0
    #: that classifier's folder: an auxiliary one, never the evaluation classifier (which would then grade the
    #: loss it was trained on)
    perceptual_from: str | None = None
    # evaluation
    eval_n: int = 256
    log_every_s: float = 30.0


def build_model(r: VQRecipe) -> VQModel:
    n = len(r.block_out_channels)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(r.block_out_channels),
        layers_per_block=r.layers_per_block,
        latent_channels=r.latent_channels,
        sample_size=64,
        num_vq_embeddings=r.num_codes,
        norm_num_groups=r.norm_num_groups,
        vq_embed_dim=r.vq_embed_dim,
        mid_block_add_attention=False,
    )


class EMACodebook:
    """Training-time state of the codebook ``weight`` ``[K, D]`` (updated in place, no gradient)."""

    def __init__(self, weight: torch.nn.Parameter, decay: float, eps: float = 1e-5):
        self.weight, self.decay, self.eps = weight, decay, eps
        k = weight.shape[0]
        self.cluster_size = torch.ones(k, device=weight.device)
        self.embed_sum = weight.detach().clone()

    def reset(self, codes: torch.Tensor, rates: torch.Tensor) -> None:
        """Set the codes and their EMA hit rates (hits per training step)."""
        self.weight.data.copy_(codes)
        self.cluster_size = rates.to(self.weight.device, torch.float32, copy=True)
        self.embed_sum = codes.clone() * self.cluster_size[:, None]

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        return nearest(z, self.weight.detach())

    @torch.no_grad()
    def update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        k, dim = self.weight.shape
        counts = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros(k, dim, device=z.device).index_add_(0, idx, z)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n
        self.weight.data.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor, err: torch.Tensor, threshold: float, gen: torch.Generator) -> int:
        dead = (self.cluster_size < threshold).nonzero()[:, 0]
        nd = int(dead.numel())
        if nd == 0:
            return 0
        # drawn with the (CPU) generator, so a run's restarts do not depend on the device
        pick = torch.multinomial(err.cpu() + 1e-12, nd, replacement=nd > z.shape[0], generator=gen)
        new = z[pick.to(z.device)] + 0.01 * z.std(0, keepdim=True) * torch.randn(nd, z.shape[1], generator=gen).to(z.device)
        rate = 2 * threshold
        self.weight.data[dead] = new
        self.cluster_size[dead] = rate
        self.embed_sum[dead] = new * rate
        return nd


def nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest row of ``c [K, D]`` for each row of ``x [N, D]`` (squared Euclidean;
    ``|x|^2`` is the same for every candidate and is left out)."""
    return torch.addmm((c * c).sum(1)[None], x, c.t(), alpha=-2.0).argmin(1)


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of ``x [N, D]`` from a random sample; empty clusters are reseeded.
    Returns the centroids ``[k, D]`` and their final cluster sizes ``[k]``."""
    c = x[torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)].clone()
    if c.shape[0] < k:  # fewer points than codes (tiny runs): pad with jittered copies
        extra = x[torch.randint(0, x.shape[0], (k - c.shape[0],), generator=gen).to(x.device)]
        c = torch.cat([c, extra + 0.01 * torch.randn(extra.shape, generator=gen).to(x.device)])
    for _ in range(iters):
        a = nearest(x, c)
        counts = torch.bincount(a, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, a, x)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            c[empty] = x[torch.randint(0, x.shape[0], (int(empty.sum()),), generator=gen).to(x.device)]
    return c, torch.bincount(nearest(x, c), minlength=k).float()


def _stream_batch(r: VQRecipe, n: int, i_scene: int, i_crop: int) -> torch.Tensor:
    """The ``n`` training images that start at scene ``i_scene`` and natural crop ``i_crop`` of the stream: inputs
    ``[n, 3, 64, 64]``, their reconstruction targets (3 channels: the noise-free render with ``denoise`` or
    ``decoder_only``, else the input) and loss weights (1 channel), as one ``[n, 7, 64, 64]``; with either option,
    every other scene's input is its noise-free render too (the codes the t2i models learn)."""
    ns = int(round(n * r.scene_fraction))
    nc = n - ns
    parts = []
    if ns:
        clean = r.denoise or r.decoder_only
        x, scenes = scene_batch(i_scene, ns, TRAIN_SCENE_SEED, r.max_objects, clean=clean)
        y = torch.stack([image_to_tensor(s.clean) for s in scenes]) if clean else x
        if clean:  # every other scene is coded from its noise-free render (the t2i models' codes)
            x = torch.where((torch.arange(ns) % 2 == 0).view(-1, 1, 1, 1), y, x)
        parts.append(torch.cat([x, y, object_weights(scenes, x.shape[-1], r.object_weight, r.object_halo)], 1))
    if nc:
        x = crop_batch(i_crop, nc, TRAIN_CROP_SEED)
        parts.append(torch.cat([x, x, torch.ones_like(x[:, :1])], 1))
    return torch.cat(parts)


def _nth_batch(r: VQRecipe, n: int, i_scene: int, i_crop: int, k: int) -> torch.Tensor:
    """Batch ``k`` of ``n`` images from the stream position ``(i_scene, i_crop)`` on (for :func:`common.prefetch`)."""
    ns = int(round(n * r.scene_fraction))
    return _stream_batch(r, n, i_scene + k * ns, i_crop + k * (n - ns))


class _Stream:
    """Fresh training images: scenes and natural crops, mixed per batch, from disjoint seed streams.

    ``workers > 0`` renders the batches in that many loader processes ahead of the step (for a GPU, where one
    core cannot render as fast as the step trains); the images are the same as without workers."""

    def __init__(self, r: VQRecipe, workers: int = 0, pin_memory: bool = False):
        self.r, self.workers, self.pin_memory = r, workers, pin_memory
        self.i_scene = 0
        self.i_crop = 0
        self._loader: Any = None
        self._n: int | None = None

    def batch(self, n: int, ahead: bool = True) -> torch.Tensor:
        """The next ``n`` images ``[n, 7, 64, 64]`` (see :func:`_stream_batch`). ``ahead=False`` (a one-off size,
        the k-means fit): rendered here; with workers it reads the images the loader serves next, without
        moving the stream."""
        ns = int(round(n * self.r.scene_fraction))
        if not self.workers or not ahead:
            x = _stream_batch(self.r, n, self.i_scene, self.i_crop)
            if self.workers:
                return x
        else:
            if self._n != n:  # a new batch size (the whole-image phase): a loader from the current position
                self._loader = prefetch(partial(_nth_batch, self.r, n, self.i_scene, self.i_crop), 0, 1, self.workers,
                                        self.pin_memory)
                self._n = n
            x = next(self._loader)
        self.i_scene += ns
        self.i_crop += n - ns
        return x


def object_weights(scenes: list[Any], size: int, weight: float, halo: float) -> torch.Tensor:
    """Per-pixel loss weights ``[n, 1, size, size]``: 1, plus ``weight`` within ``halo`` radii of
    each object's centre (objects are small, so an unweighted loss is dominated by background)."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    w = torch.ones(len(scenes), 1, size, size)
    if weight == 0:
        return w
    for i, sc in enumerate(scenes):
        for o in sc.attributes["objects"]:
            cx, cy = o["center"]
            m = (xx - cx) ** 2 + (yy - cy) ** 2 <= (halo * o["radius"]) ** 2
            w[i, 0][m] = 1.0 + weight
    return w


def _random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One ``size`` x ``size`` window per image at offsets that are multiples of 4 (the code grid)."""
    if size >= x.shape[-1]:
        return x
    n_off = (x.shape[-1] - size) // 4 + 1
    off = torch.randint(0, n_off, (x.shape[0], 2), generator=gen) * 4
    return torch.stack([im[:, oy : oy + size, ox : ox + size] for im, (oy, ox) in zip(x, off.tolist())])


def _edge_l1(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(y) - dx(x)).abs().mean() + (dy(y) - dy(x)).abs().mean()


def perceptual_net(folder: str | Path) -> Any:
    """The frozen auxiliary classifier of the perceptual loss. Refuses the bundled evaluation classifier (same
    weights): prompt adherence and the tokenizer's head accuracies are read with it."""
    clf = hub.load_classifier(folder).requires_grad_(False)
    ref = hub.load_classifier()
    a, b = clf.state_dict(), ref.state_dict()
    if a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a):
        raise ValueError(f"perceptual_from={str(folder)!r} is the evaluation classifier: train an auxiliary one "
                         "(another seed and width) so that the evaluation does not grade its own loss")
    return clf


def perceptual_loss(clf: Any, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LPIPS-style distance of ``y`` to ``target`` (both ``[B, 3, 64, 64]`` in [-1, 1]) through ``clf``'s trunk:
    per block, activations normalised to unit length over channels, squared difference summed over channels,
    averaged over positions and images; the mean over blocks. Differentiable in ``y``."""
    def acts(img: torch.Tensor) -> list[torch.Tensor]:
        b = img.shape[0]
        h = torch.cat([img, clf.edges(img), clf.coords.to(img.dtype).expand(b, -1, -1, -1)], dim=1)
        out = []
        for block in clf.trunk:
            h = block(h)
            out.append(h / h.norm(dim=1, keepdim=True).clamp_min(1e-6))
        return out

    with torch.no_grad():
        ref = acts(target)
    return torch.stack([(a - r).pow(2).sum(1).mean() for a, r in zip(acts(y), ref)]).mean()


def _encode(vq: VQModel, x: torch.Tensor) -> torch.Tensor:
    return vq.quant_conv(vq.encoder(x))


def object_colour_errors(x: torch.Tensor, y: torch.Tensor, scenes: list[Any]) -> list[float]:
    """Per object (rings excluded: their centre is background), the mean absolute error (uint8
    units, averaged over RGB) of the object's mean colour within 0.45 radii of its centre."""
    yy, xx = torch.meshgrid(torch.arange(x.shape[-2]) + 0.5, torch.arange(x.shape[-1]) + 0.5, indexing="ij")
    out = []
    for i, sc in enumerate(scenes):
        for o in sc.attributes["objects"]:
            if o["shape"] == "ring":
                continue
            cx, cy = o["center"]
            m = (xx - cx) ** 2 + (yy - cy) ** 2 <= (0.45 * o["radius"]) ** 2
            out.append(float((y[i][:, m].mean(1) - x[i][:, m].mean(1)).abs().mean()) * 127.5)
    return out


@torch.no_grad()
def evaluate(vq: VQModel, n: int, batch_size: int = 64) -> dict[str, Any]:
    """Held-out reconstruction and code statistics of ``vq`` (scenes as SceneDataset makes them,
    i.e. 1-2 objects, and natural crops), ``n`` images of each."""
    vq.eval()
    k = vq.config.num_vq_embeddings
    out: dict[str, Any] = {}
    all_tokens = []
    for name in ("scenes", "crops"):
        psnrs, l1s, tokens, stable, obj_err, psnr_clean = [], [], [], [], [], []
        for s in range(0, n, batch_size):
            m = min(batch_size, n - s)
            if name == "scenes":
                x, scenes = scene_batch(s, m, HELDOUT_SCENE_SEED, 2, clean=True)
                clean = torch.stack([image_to_tensor(sc.clean) for sc in scenes])
            else:
                x, scenes = crop_batch(s, m, HELDOUT_CROP_SEED), []
                clean = x
            t = hub.encode_images(vq, x)
            y = hub.decode_tokens(vq, t)
            t2 = hub.encode_images(vq, y)
            psnrs.append(psnr(y, x))
            psnr_clean.append(psnr(y, clean))
            l1s.append((y - x).abs().flatten(1).mean(1))
            tokens.append(t)
            stable.append((t2 == t).float().mean(1))
            obj_err += object_colour_errors(x, y, scenes)
        tok = torch.cat(tokens)
        all_tokens.append(tok)
        p = torch.cat(psnrs)
        out[name] = {
            "n_images": n,
            "psnr_db_mean": float(p.mean()),
            "psnr_db_p05": float(p.quantile(0.05)),
            **({"psnr_db_mean_vs_noise_free": float(torch.cat(psnr_clean).mean())} if name == "scenes" else {}),
            "l1_mean": float(torch.cat(l1s).mean()),
            "reencode_token_agreement": float(torch.cat(stable).mean()),
            **({"object_colour_abs_err_uint8": float(np.mean(obj_err))} if obj_err else {}),
            **{f"code_{kk}": v for kk, v in hub.code_statistics(tok, k).items()},
        }
    out["all"] = {f"code_{kk}": v for kk, v in hub.code_statistics(torch.cat(all_tokens), k).items()}
    out["classifier_on_reconstructions"] = classifier_accuracy(vq, n)
    return out


@torch.no_grad()
def classifier_accuracy(vq: VQModel, n: int, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Accuracy of the evaluation classifier (``hub.load_classifier()``) per head on held-out scenes
    (seed stream ``HELDOUT_SCENE_SEED + 1``) and on their reconstructions by ``vq``: one-object
    scenes, and two-object scenes read at the first object's cell (as prompt adherence reads them)."""
    clf = hub.load_classifier()
    res: dict[str, dict[str, float]] = {}
    for name, max_obj in (("one_object", 1), ("two_object", 2)):
        x, scenes = scene_batch(0, n, HELDOUT_SCENE_SEED + 1, max_obj)
        lab = label_tensors(scenes)
        pos = lab["position"] if max_obj > 1 else None
        y = torch.cat([hub.decode_tokens(vq, hub.encode_images(vq, x[i : i + batch_size])) for i in range(0, n, batch_size)])
        for tag, imgs in (("original", x), ("reconstruction", y)):
            pred = hub.classify(clf, imgs, positions=pos)
            res[f"{name}_{tag}"] = {h: float((pred[h] == lab[h]).float().mean()) for h in LABEL_NAMES}
    return res


def train(out: str | Path, minutes: float = 20.0, seed: int = 0, max_steps: int | None = None, recipe: VQRecipe | None = None, eval_n: int | None = None, threads: int = 2,
          ckpt: str | Path | None = None, ckpt_every_s: float = 300.0, init_from: str | Path | None = None,
          denoise: bool | None = None, decoder_only: bool | None = None, device: str = "cpu",
          workers: int = 0) -> dict[str, Any]:
    """Train the tokenizer for ``minutes`` of wall clock (or ``max_steps``), save it in fp16 to
    ``out`` and return the metrics (also written to ``out/metrics.json``), with a loss curve
    ``out/loss_curve.png``.

    ``ckpt``: a file that holds the full training state every ``ckpt_every_s`` seconds; if it
    exists when the run starts, the run resumes from it (same recipe; its time counts against
    ``minutes``), so a long run can be stopped and continued.

    ``init_from``: a saved tokenizer folder (same architecture) to start from instead of random
    weights; its codebook is the initial one (no autoencoder phase, no k-means), with equal hit rates,
    so dead-code restarts move the codes the new objective leaves unused. ``denoise``, ``decoder_only``: override
    :attr:`VQRecipe.denoise` / :attr:`VQRecipe.decoder_only` (the latter needs ``init_from``: only the decoder
    trains, every code stays).

    ``device``: where the model trains (``"cuda"`` on a GPU machine; the evaluation runs on the CPU, on the saved
    fp16 weights as they ship). ``workers``: loader processes that render the training images ahead of the step
    (0: rendered in the training process); a GPU needs them, and a larger :attr:`VQRecipe.batch_size`."""
    r = recipe or VQRecipe()
    if denoise is not None:
        r = replace(r, denoise=denoise)
    if decoder_only is not None:
        r = replace(r, decoder_only=decoder_only)
    if r.decoder_only and init_from is None:
        raise ValueError("decoder_only trains the decoder of an existing tokenizer: pass init_from")
    if eval_n is not None:
        r.eval_n = eval_n
    setup_threads(threads)
    gen = seed_everything(seed)
    out = Path(out)
    device = torch.device(device)
    vq = build_model(r).to(device)
    n_params = sum(p.numel() for p in vq.parameters())
    weight = vq.quantize.embedding.weight
    weight.requires_grad_(False)
    if r.decoder_only:
        for module in (vq.encoder, vq.quant_conv):
            module.requires_grad_(False)
    codebook = EMACodebook(weight, r.ema_decay)
    perceptual = None
    if r.perceptual_weight > 0:
        if r.perceptual_from is None:
            raise ValueError("perceptual_weight needs perceptual_from (an auxiliary scene classifier's folder)")
        perceptual = perceptual_net(r.perceptual_from).to(device)
    params = [p for p in vq.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=r.lr, betas=(0.9, 0.99))
    stream = _Stream(r, workers, pin_memory=device.type == "cuda")
    step, quantizing, restarts, images_seen, elapsed = 0, False, 0, 0, 0.0
    if init_from is not None:
        start = hub.load_vq(init_from)
        if tuple(start.config.block_out_channels) != tuple(vq.config.block_out_channels) or start.config.num_vq_embeddings != r.num_codes:
            raise ValueError(f"init_from={str(init_from)!r} has another architecture than the recipe")
        vq.load_state_dict(start.state_dict())
        tokens_per_step = r.batch_size * (r.crop // 4) ** 2
        codebook.reset(weight.detach().clone(), torch.full((r.num_codes,), tokens_per_step / r.num_codes))
        quantizing = True
        print(f"[vq] initialised from {init_from}", flush=True)
    ema: dict[str, float] = {}
    history: list[dict[str, float]] = []
    checkpoint = Checkpoint(ckpt, ckpt_every_s)
    state = checkpoint.resume(vq, opt, gen, recipe=asdict(r))
    if state is not None:
        codebook.cluster_size, codebook.embed_sum = state["cluster_size"].to(device), state["embed_sum"].to(device)
        stream.i_scene, stream.i_crop = state["stream"]
        torch.set_rng_state(state["torch_rng"])
        step, quantizing, restarts, images_seen, elapsed = (state[k] for k in ("step", "quantizing", "restarts", "images_seen", "elapsed"))
        ema, history = state["ema"], state["history"]
        print(f"[vq] resumed from {ckpt} at step {step} ({elapsed:.0f} s trained)", flush=True)
    budget = Budget(minutes, max_steps, elapsed_s=elapsed)
    print(f"[vq] {n_params / 1e6:.3f}M params, budget {minutes} min, max_steps={max_steps}, seed={seed}, device={device}, "
          f"batch {r.batch_size} crops / {r.full_batch_size} images, {workers} loader workers", flush=True)

    def snapshot() -> dict[str, Any]:
        return {"recipe": asdict(r), "model": vq.state_dict(), "opt": opt.state_dict(), "cluster_size": codebook.cluster_size,
                "embed_sum": codebook.embed_sum, "stream": (stream.i_scene, stream.i_crop), "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "step": step, "quantizing": quantizing, "restarts": restarts,
                "images_seen": images_seen, "elapsed": budget.elapsed(), "ema": ema, "history": history}

    last_log = time.perf_counter()
    bar = tqdm(desc="vq", unit="step", mininterval=5.0, file=sys.stderr)
    vq.train()
    while not budget.done(step):
        prog = budget.progress(step)
        full = prog >= 1.0 - r.full_phase
        if not quantizing and prog >= r.ae_phase:
            # fit the codebook to the encoder's current outputs
            with torch.no_grad():
                # a step-limited run needs no more data for the fit than it will train on
                n_fit = r.kmeans_crops if max_steps is None else min(r.kmeans_crops, max(16, max_steps * r.batch_size))
                xs = _random_crops(stream.batch(n_fit, ahead=False), r.crop, gen)[:, :3].to(device)
                z = torch.cat([_encode(vq, xs[i : i + 64]) for i in range(0, xs.shape[0], 64)])
                zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                centroids, sizes = kmeans(zf, r.num_codes, r.kmeans_iters, gen)
                # hit rates per training step, so codes k-means left (nearly) empty restart soon
                codebook.reset(centroids, sizes * (r.batch_size / xs.shape[0]))
            quantizing = True
            print(f"[vq] step {step}: codebook k-means initialised on {zf.shape[0]} encoder outputs", flush=True)
        x = stream.batch(r.full_batch_size if full else r.batch_size).to(device, non_blocking=True)
        images_seen += x.shape[0]
        if not full:
            x = _random_crops(x, r.crop, gen)
        x, target, wmap = x[:, :3], x[:, 3:6], x[:, 6:]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(r.lr, prog, step, r.warmup_steps)

        with torch.set_grad_enabled(not r.decoder_only):
            z = _encode(vq, x)
        b, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, d)
        if r.decoder_only:  # the codes as diffusers' lookup gives them; nothing upstream of them moves
            idx = codebook.lookup(zf)
            commit = torch.zeros((), device=device)
            zq = weight.detach()[idx].view(b, h, w, d).permute(0, 3, 1, 2)
        elif quantizing:
            idx = codebook.lookup(zf.detach())
            q = weight.detach()[idx]
            commit = F.mse_loss(zf, q)
            zq = (zf + (q - zf).detach()).view(b, h, w, d).permute(0, 3, 1, 2)
        else:
            commit = torch.zeros((), device=device)
            zq = z
        y = vq.decoder(vq.post_quant_conv(zq))
        wn = wmap / wmap.mean()
        l1 = (wn * (y - target).abs()).mean()
        l2 = (wn * (y - target) ** 2).mean()
        edge = _edge_l1(y, target)
        loss = l1 + l2 + r.edge_weight * edge + r.beta * commit
        if perceptual is not None and full:
            percep = perceptual_loss(perceptual, y, target)
            loss = loss + r.perceptual_weight * percep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

        stats = {k: v.item() for k, v in {"loss": loss, "l1": l1, "l2": l2, "edge": edge, "commit": commit}.items()}
        if perceptual is not None and full:
            stats["perceptual"] = percep.item()
        if quantizing and not r.decoder_only:
            zd = zf.detach()
            codebook.update(zd, idx)
            stats["batch_perplexity"] = hub.code_statistics(idx, r.num_codes)["perplexity"]
            if step % r.restart_every == 0:
                err = ((zd - weight.detach()[idx]) ** 2).sum(1)
                threshold = r.dead_fraction * zd.shape[0] / r.num_codes
                restarts += codebook.restart_dead(zd, err, threshold, gen)
        for kk, v in stats.items():
            ema[kk] = v if kk not in ema else 0.98 * ema[kk] + 0.02 * v
        step += 1
        bar.update(1)
        if time.perf_counter() - last_log >= r.log_every_s:
            last_log = time.perf_counter()
            live = float((codebook.cluster_size >= r.dead_fraction * zf.shape[0] / r.num_codes).float().mean()) if quantizing else 0.0
            bar.set_postfix(loss=f"{ema['loss']:.4f}", l1=f"{ema['l1']:.4f}", live=f"{live:.2f}")
            msg = " ".join(f"{kk}={v:.4f}" for kk, v in ema.items())
            print(f"[vq] step {step} t={budget.elapsed():.0f}s prog={prog:.2f} {'full' if full else 'crop'} lr={opt.param_groups[0]['lr']:.2e} {msg} live={live:.3f} restarts={restarts}", flush=True)
            history.append({"step": step, "seconds": budget.elapsed(), **ema})
        if checkpoint.due():
            checkpoint.save(snapshot())
    bar.close()
    history.append({"step": step, "seconds": budget.elapsed(), **ema})
    checkpoint.save(snapshot())  # a longer --minutes with the same checkpoint continues from here
    train_seconds = budget.elapsed()

    out.mkdir(parents=True, exist_ok=True)
    vq.eval()
    plot_loss_curve(history, out / "loss_curve.png", "vq", keys=("loss", "l1", "edge", "commit", "perceptual"))
    save_fp16(vq, out)
    shipped = hub.load_vq(out)  # evaluate what ships: fp16 weights, run in fp32
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {
        "model": "vq",
        "params": n_params,
        "seed": seed,
        "threads": threads,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "workers": workers,
        "minutes_budget": minutes,
        "max_steps": max_steps,
        "steps": step,
        "images_seen": images_seen,
        "train_seconds": round(train_seconds, 1),
        "final_train_losses_ema": {kk: round(v, 5) for kk, v in ema.items()},
        "dead_code_restarts": restarts,
        "init_from": None if init_from is None else Path(init_from).name,
        "heldout": evaluate(shipped, r.eval_n),
        "recipe": asdict(r),
    }
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 1)
    metrics["weights_bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    print(json.dumps({k: metrics[k] for k in ("params", "steps", "train_seconds", "heldout", "weights_bytes")}, indent=2), flush=True)
    return metrics


def reconstruction_grid(path: str | Path, tokenizers: dict[str, str | Path | None], n: int = 8, scale: int = 3) -> None:
    """The card's picture: ``n`` held-out scenes (1-2 objects, stream ``HELDOUT_SCENE_SEED``; top row) and their
    reconstruction by each tokenizer folder in ``tokenizers`` (one row each, in order; None = the bundled one),
    upscaled ``scale`` times, written as a PNG to ``path``. The row labels are printed, not drawn."""
    from torchvision.utils import save_image

    x, _ = scene_batch(0, n, HELDOUT_SCENE_SEED, 2)
    rows = [x]
    for name, folder in tokenizers.items():
        vq = hub.load_vq(folder)
        rows.append(hub.decode_tokens(vq, hub.encode_images(vq, x)))
        print(f"row {len(rows)}: {name}", flush=True)
    grid = (torch.cat(rows).clamp(-1, 1) + 1) / 2
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(F.interpolate(grid, scale_factor=scale, mode="nearest"), str(path), nrow=n, padding=2)
