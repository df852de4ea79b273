"""Recipe: the zoo's continuous-token models (a KL autoencoder, a MAR-style target and a smaller draft).

``python -m mmspec.zoo.recipes.mar vae|target|draft [--minutes M] --threads 1 --out DIR [--ckpt FILE]``

* ``vae``: a diffusers :class:`~diffusers.AutoencoderKL`, 32x32 RGB scenes <-> an 8x8 grid of 4-channel
  latents (64 continuous tokens per image). 32x32 rather than the zoo's 64x64 keeps CPU training to
  minutes; evaluation upsamples to 64x64 for the zoo classifier (real scenes go through the same resize).
  L1 + MSE reconstruction and a small KL term; after training ``config.scaling_factor`` is set to
  1 / (std of the latent means on held-out scenes), so scaled latents have unit variance, as Stable
  Diffusion and MAR do.
* ``target`` / ``draft``: :class:`mmspec.models.mar.ContinuousARModel` (causal transformer + MLP diffusion
  head) trained on scaled latent means of one-object scenes, class-conditioned on the background colour
  (``mmspec.zoo.data.COLOURS``, 9 classes: the background is what an 8x8 latent grid of a 32x32 scene and
  a minutes-long CPU run can follow, and what the zoo classifier's ``background_colour`` head scores).
  Labels are dropped with probability ``label_dropout`` (the null class) so classifier-free guidance works
  at sampling time, as in MAR. The diffusion loss can repeat each condition ``diffusion_batch_mul`` times
  with different noise levels (MAR's trick; 1 here, the head is not cheap next to the transformer on a CPU).
* ``draft --distill-from TARGET [--init-from DRAFT]``: the draft learns the target's *guided and conditional noise
  predictions* at the same noisy tokens and prefixes (:func:`distill_loss`) instead of the data's noise. With the
  trajectory noise shared, a drafted token is accepted with probability ``1 - TV`` of two Gaussians of the same
  scale ``s`` around the two heads' last means, so what pays is the two denoisers agreeing step for step, not the
  draft being a good model of the data on its own. :func:`expected_acceptance` measures it teacher forced.

Scenes come from seeded streams (``TRAIN_SCENE_SEED``, held-out ``HELDOUT_SCENE_SEED``); every run is seeded
and stops by wall clock. Weights are saved in fp16 with ``metrics.json`` beside them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import COLOURS, image_to_tensor, make_scene, scene_seed
from .common import (
    HELDOUT_SCENE_SEED,
    TRAIN_SCENE_SEED,
    ResumableRun,
    adamw,
    dir_size_bytes,
    psnr,
    save_fp16,
    seed_everything,
    setup_threads,
    write_json,
)

#: Scenes in this family have exactly one object; the background colour is the class label.
MAX_OBJECTS = 1
IMAGE_SIZE = 32
NUM_CLASSES = len(COLOURS)
ROLES = ("vae", "target", "draft")


def scene_batch(start: int, n: int, seed: int) -> tuple[torch.Tensor, list]:
    """One-object scenes ``start .. start+n-1`` of stream ``seed`` at 32x32: images [n, 3, 32, 32] in [-1, 1]."""
    scenes = [make_scene(scene_seed(seed, i), IMAGE_SIZE, MAX_OBJECTS) for i in range(start, start + n)]
    return torch.stack([image_to_tensor(s.image) for s in scenes]), scenes


def scene_classes(scenes) -> torch.Tensor:
    """LongTensor [n]: the class label (background colour index) of each scene."""
    return torch.tensor([COLOURS.index(s.attributes["background_colour"]) for s in scenes])


# --------------------------------------------------------------------------------------------
# KL autoencoder
# --------------------------------------------------------------------------------------------


@dataclass
class VAERecipe:
    block_out_channels: tuple = (16, 32, 64)
    latent_channels: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-4
    eval_n: int = 256


def build_vae(r: VAERecipe):
    from diffusers import AutoencoderKL

    n = len(r.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(r.block_out_channels),
        layers_per_block=1, latent_channels=r.latent_channels, norm_num_groups=16, sample_size=IMAGE_SIZE,
        scaling_factor=1.0, mid_block_add_attention=False,
    )


@torch.no_grad()
def evaluate_vae(vae, n: int, batch_size: int = 64) -> dict[str, float]:
    """Held-out PSNR (dB) of mean-latent reconstructions and the std of the latent means."""
    vae.eval()
    psnrs, latents = [], []
    for start in range(0, n, batch_size):
        images, _ = scene_batch(start, min(batch_size, n - start), HELDOUT_SCENE_SEED)
        mean = vae.encode(images).latent_dist.mean
        latents.append(mean)
        psnrs.append(psnr(vae.decode(mean).sample, images))
    vae.train()
    lat = torch.cat(latents)
    return {"heldout_psnr_db": float(torch.cat(psnrs).mean()), "latent_std": float(lat.std()),
            "latent_mean": float(lat.mean())}


def train_vae(out, minutes: float, seed: int = 0, max_steps: int | None = None, threads: int = 1,
              ckpt: str | None = None, ckpt_every_s: float = 300.0) -> dict[str, Any]:
    r = VAERecipe()
    setup_threads(threads)
    gen = seed_everything(seed)
    vae = build_vae(r).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=r.lr, weight_decay=0.0)
    run = ResumableRun("mar-vae", vae, opt, gen, minutes, max_steps, ckpt, ckpt_every_s, role="vae", recipe=asdict(r))
    while not run.done():
        run.lr(r.lr, r.warmup_steps)
        images, _ = scene_batch(run.seen, r.batch_size, TRAIN_SCENE_SEED + seed)
        dist = vae.encode(images).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        kl = dist.kl().mean() / images[0].numel()
        loss = rec + r.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        run.record(loss.item(), r.batch_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_seconds = run.finish(out / "loss_curve.png", "mar_vae (training loss)")
    step, seen, ema = run.step, run.seen, run.ema
    metrics = {"role": "vae", "steps": step, "images_seen": seen, "train_seconds": round(train_seconds, 1),
               "params": sum(p.numel() for p in vae.parameters()), "final_train_loss_ema": ema,
               "recipe": asdict(r), "seed": seed}
    metrics.update(evaluate_vae(vae, r.eval_n))
    vae.register_to_config(scaling_factor=1.0 / metrics["latent_std"])
    save_fp16(vae, out)
    metrics["bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    print({k: v for k, v in metrics.items() if k != "recipe"}, flush=True)
    return metrics


# --------------------------------------------------------------------------------------------
# Continuous autoregressive models
# --------------------------------------------------------------------------------------------


@dataclass
class MARRecipe:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    head_width: int = 192
    head_depth: int = 3
    batch_size: int = 32
    diffusion_batch_mul: int = 1
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.02
    label_dropout: float = 0.1
    train_images: int = 16384
    eval_n: int = 256


PRESETS = {
    "target": MARRecipe(),
    "draft": MARRecipe(hidden=64, layers=2, heads=2, head_width=96, head_depth=2, lr=2e-3),
}


@torch.no_grad()
def encode_scenes(vae, start: int, n: int, seed: int, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latent means [n, h*w, C] (row-major tokens) and class labels [n] of scenes of stream ``seed``."""
    from ...models.mar import latents_to_tokens

    tokens, labels = [], []
    for i in range(start, start + n, batch_size):
        images, scenes = scene_batch(i, min(batch_size, start + n - i), seed)
        mean = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        tokens.append(latents_to_tokens(mean))
        labels.append(scene_classes(scenes))
    return torch.cat(tokens), torch.cat(labels)


@torch.no_grad()
def evaluate_mar(model, tokens, labels, gen, batch_size: int = 64) -> dict[str, float]:
    """Held-out diffusion loss (noise-prediction MSE per dimension, over fixed random noise levels)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        x, y = tokens[i : i + batch_size], labels[i : i + batch_size]
        total += float(model.diffusion_loss(x, y, generator=gen, batch_mul=4)) * x.shape[0]
        count += x.shape[0]
    model.train()
    return {"heldout_diffusion_loss": total / count}


def _eps_pair(model, tokens, labels, x_t, t, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided and conditional noise predictions [B * N, C] of ``model`` at noisy tokens ``x_t`` [B * N, C] and
    timesteps ``t`` [B * N], teacher forced on clean ``tokens`` [B, N, C] with class ``labels`` [B]."""
    B = tokens.shape[0]
    z = model.conditions(torch.cat([labels, torch.full_like(labels, model.null_class)]), tokens.repeat(2, 1, 1))
    z = z.reshape(2, -1, z.shape[-1])  # [2 (cond, uncond), B * N, D]
    e = model.head(x_t.repeat(2, 1), t.repeat(2), z.reshape(-1, z.shape[-1])).view(2, B * tokens.shape[1], -1)
    return e[1] + guidance * (e[0] - e[1]), e[0]


def distill_loss(student, teacher, tokens, labels, generator=None, guidance: float = 3.0) -> torch.Tensor:
    """Draft distillation for continuous speculative decoding: MSE between the student's and the teacher's noise
    predictions, guided (what both sample with) plus conditional, at the same random timesteps and noisy tokens.

    Args:
        tokens: [B, N, C] clean tokens (the prefixes both models condition on); labels: LongTensor [B].
    """
    x0 = tokens.reshape(-1, tokens.shape[-1])
    sched = teacher.scheduler()
    t = torch.randint(0, teacher.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=generator).to(x0), t)
    with torch.no_grad():
        tg, tc = _eps_pair(teacher, tokens, labels, x_t, t, guidance)
    sg, sc = _eps_pair(student, tokens, labels, x_t, t, guidance)
    return F.mse_loss(sg, tg) + F.mse_loss(sc, tc)


@torch.no_grad()
def expected_acceptance(draft, target, tokens, labels, guidance: float = 3.0, steps: int = 10, seed: int = 0,
                        batch_size: int = 32) -> float:
    """Mean probability that a token drafted by ``draft`` is accepted by ``target`` (exact continuous acceptance
    with shared trajectory noise, as the pipeline decodes), teacher forced on held-out prefixes.

    Both heads run the same DDPM trajectory noise; the token densities are ``N(m_d, s^2 I)`` and
    ``N(m_t, s^2 I)``, and ``min(1, p/q)`` accepts with probability ``1 - TV = erfc(|m_d - m_t| / (2 sqrt(2) s))``.

    Args:
        tokens: [n, N, C] held-out clean tokens; labels: LongTensor [n]. ``steps``: the heads' inference steps.
    """
    from ...models.mar import DDPMTrajectory

    traj = DDPMTrajectory(target.scheduler(), steps)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        x, y = tokens[i : i + batch_size], labels[i : i + batch_size]
        both = torch.cat([y, torch.full_like(y, target.null_class)])
        noise = torch.randn(x.shape[0] * x.shape[1], traj.num_steps + 1, x.shape[-1], generator=gen)
        means = []
        for model in (draft, target):
            z = model.conditions(both, x.repeat(2, 1, 1)).reshape(2, -1, model.config.hidden_size).transpose(0, 1)
            means.append(traj.last_mean(lambda xt, t, m=model, z=z: m.eps(xt, t, z, guidance), noise))
        dist = (means[0] - means[1]).norm(dim=-1)
        total += float(torch.special.erfc(dist / (2 * 2 ** 0.5 * traj.last_scale)).sum())
        count += dist.numel()
    return total / count


@torch.no_grad()
def teacher_samples(teacher, vae, n: int, guidance: float = 3.0, steps: int = 25, seed: int = 0,
                    batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` AR samples of ``teacher`` (the tokens a draft meets as prefixes when decoding), classes cycling:
    tokens [n, N, C] and labels [n]. Exact AR sampling through the library's pipeline, seed ``seed``."""
    from ...pipelines.continuous import SpeculativeContinuousPipeline

    pipe = SpeculativeContinuousPipeline(model=teacher, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(n) % teacher.config.num_classes
    gen = torch.Generator().manual_seed(seed)
    tokens = [pipe(class_labels=labels[i : i + batch_size], guidance_scale=guidance, generator=gen,
                   num_inference_steps=steps, output_type="latent", decoding="ar").tokens.float()
              for i in range(0, n, batch_size)]
    return torch.cat(tokens), labels


def _acceptances(draft, target, tokens, labels, policy, guidance) -> dict[str, float]:
    """Expected acceptance at 10 and 25 head steps, teacher forced on 64 held-out data images and on 64 of the
    target's own samples (``policy``: tokens, labels)."""
    return {f"{name}_steps{steps}": round(expected_acceptance(draft, target, x[:64], y[:64], guidance, steps), 4)
            for name, (x, y) in (("data", (tokens, labels)), ("on_policy", policy)) for steps in (10, 25)}


def train_mar(out, role: str, minutes: float, seed: int = 0, max_steps: int | None = None, threads: int = 1,
              vae_path: str | None = None, ckpt: str | None = None, ckpt_every_s: float = 300.0,
              init_from: str | None = None, distill_from: str | None = None, guidance: float = 3.0,
              lr: float | None = None, on_policy: int = 0) -> dict[str, Any]:
    """Train a target or draft (see the module docstring). ``init_from``: start from this saved model (same
    architecture); ``distill_from``: a saved target whose noise predictions the model learns (:func:`distill_loss`
    at ``guidance``); ``on_policy``: with ``distill_from``, sample this many images from the target first
    (:func:`teacher_samples`) and make half of every batch their tokens; ``lr``: the peak learning rate (default:
    the preset's)."""
    from dataclasses import replace

    from diffusers import AutoencoderKL

    from ...models.mar import ContinuousARModel

    r = PRESETS[role] if lr is None else replace(PRESETS[role], lr=lr)
    setup_threads(threads)
    gen = seed_everything(seed)
    vae_dir = Path(vae_path) if vae_path else Path(__file__).resolve().parents[1] / "weights" / "mar_vae"
    vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=torch.float32).eval()
    t0 = time.perf_counter()
    train_tokens, train_labels = encode_scenes(vae, 0, r.train_images, TRAIN_SCENE_SEED + seed)
    eval_tokens, eval_labels = encode_scenes(vae, 0, r.eval_n, HELDOUT_SCENE_SEED)
    encode_seconds = time.perf_counter() - t0
    print(f"[mar-{role}] encoded {r.train_images} scenes in {encode_seconds:.0f}s", flush=True)
    n_tokens, token_dim = train_tokens.shape[1:]
    grid = int(vae.config.sample_size) // 2 ** (len(vae.config.block_out_channels) - 1)
    if init_from is not None:
        model = ContinuousARModel.from_pretrained(init_from, torch_dtype=torch.float32).train()
        print(f"[mar-{role}] initialised from {init_from}", flush=True)
    else:
        model = ContinuousARModel(
            token_dim=token_dim, grid_size=grid, num_classes=NUM_CLASSES, hidden_size=r.hidden, num_layers=r.layers,
            num_heads=r.heads, head_width=r.head_width, head_depth=r.head_depth,
        ).train()
    if grid * grid != n_tokens or model.num_tokens != n_tokens or model.config.token_dim != token_dim:
        raise ValueError(f"the autoencoder gives {n_tokens} tokens of {token_dim} channels; the model takes "
                         f"{model.num_tokens} of {model.config.token_dim}")
    if on_policy and distill_from is None:
        raise ValueError("on_policy needs distill_from (the target whose samples make half of every batch)")
    teacher, distill, policy = None, None, None
    if distill_from is not None:
        teacher = ContinuousARModel.from_pretrained(distill_from, torch_dtype=torch.float32).eval().requires_grad_(False)
        if teacher.config.token_dim != token_dim or teacher.num_tokens != n_tokens:
            raise ValueError(f"distill_from={str(distill_from)!r} does not model this autoencoder's tokens")
        t0 = time.perf_counter()
        # the held-out on-policy set comes from its own seed; the training pool's from the run's seed
        policy_eval = teacher_samples(teacher, vae, 64, guidance, seed=10_000 + seed)
        policy = teacher_samples(teacher, vae, on_policy, guidance, seed=seed) if on_policy else None
        print(f"[mar-{role}] sampled {on_policy} + 64 teacher images in {time.perf_counter() - t0:.0f}s", flush=True)
        model.eval()
        distill = {"from": Path(distill_from).name, "guidance": guidance, "on_policy": on_policy,
                   "expected_acceptance_before": _acceptances(model, teacher, eval_tokens, eval_labels, policy_eval,
                                                              guidance)}
        model.train()
        print(f"[mar-{role}] distilling {distill_from}; expected acceptance before: "
              f"{distill['expected_acceptance_before']}", flush=True)
    opt = adamw(model, r.lr, r.weight_decay)
    run = ResumableRun(f"mar-{role}", model, opt, gen, minutes, max_steps, ckpt, ckpt_every_s, role=role,
                       recipe=asdict(r), **({} if distill is None else {"distill": distill["from"], "on_policy": on_policy}))
    while not run.done():
        run.lr(r.lr, r.warmup_steps)
        # epoch e visits the images in a permutation seeded by (seed, e): a resumed run continues where it stopped
        epoch, offset = divmod(run.seen, r.train_images)
        perm = torch.randperm(r.train_images, generator=torch.Generator().manual_seed(1000 * seed + epoch))
        idx = perm[offset : offset + r.batch_size]
        labels = train_labels[idx].clone()
        if teacher is not None:  # both branches are distilled on every example: no label dropout
            tokens = train_tokens[idx]
            if policy is not None:  # half the batch: the teacher's own samples (cycling through the pool)
                k = len(idx) // 2
                j = (torch.arange(k) + run.step * k) % on_policy
                tokens, labels = torch.cat([tokens[k:], policy[0][j]]), torch.cat([labels[k:], policy[1][j]])
            loss = distill_loss(model, teacher, tokens, labels, gen, guidance)
        else:
            drop = torch.rand(len(idx), generator=gen) < r.label_dropout
            labels[drop] = model.null_class
            loss = model.diffusion_loss(train_tokens[idx], labels, generator=gen, batch_mul=r.diffusion_batch_mul)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run.record(loss.item(), len(idx), log_every=100)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"mar_{role} (diffusion loss)" if teacher is None else f"mar_{role} (distillation loss, guidance {guidance:g})"
    train_seconds = run.finish(out / "loss_curve.png", title)
    step, ema = run.step, run.ema
    metrics = {"role": role, "steps": step, "epochs": run.seen / r.train_images,
               "train_seconds": round(train_seconds, 1), "encode_seconds": encode_seconds,
               "params": sum(p.numel() for p in model.parameters()), "final_train_loss_ema": ema,
               "recipe": asdict(r), "seed": seed}
    metrics.update(evaluate_mar(model, eval_tokens, eval_labels, torch.Generator().manual_seed(1)))
    if teacher is not None:
        model.eval()
        distill["expected_acceptance"] = _acceptances(model, teacher, eval_tokens, eval_labels, policy_eval, guidance)
        metrics["distill"] = distill
    if init_from is not None:
        metrics["init_from"] = str(init_from)
    save_fp16(model, out)
    metrics["bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    print({k: v for k, v in metrics.items() if k != "recipe"}, flush=True)
    return metrics


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmspec.zoo.recipes.mar", description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=ROLES)
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-clock training budget (default: 20 / 30 / 14 for vae / target / draft)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae", default=None, help="target/draft: autoencoder folder (default: the bundled mar_vae)")
    ap.add_argument("--ckpt", default=None, help="training-state file, saved every --ckpt-every seconds; an existing "
                    "one is resumed (same role and recipe; its time counts against --minutes)")
    ap.add_argument("--ckpt-every", type=float, default=300.0)
    ap.add_argument("--init-from", default=None, help="target/draft: start from this saved model (same architecture)")
    ap.add_argument("--distill-from", default=None, metavar="TARGET",
                    help="draft: learn this saved target's guided and conditional noise predictions")
    ap.add_argument("--guidance", type=float, default=3.0, help="with --distill-from: the guidance scale distilled at")
    ap.add_argument("--on-policy", type=int, default=0, metavar="N",
                    help="with --distill-from: sample N images from the target first; half of every batch is theirs")
    ap.add_argument("--lr", type=float, default=None, help="target/draft: peak learning rate (default: the preset's)")
    args = ap.parse_args(argv)
    if args.distill_from and args.role != "draft":
        ap.error("--distill-from trains a draft")
    if args.on_policy < 0 or (args.on_policy and not args.distill_from):
        ap.error("--on-policy N needs --distill-from and N >= 0")
    if args.role == "vae" and (args.init_from or args.lr):
        ap.error("--init-from and --lr are for target/draft")
    if args.minutes is None:
        args.minutes = {"vae": 20.0, "target": 30.0, "draft": 14.0}[args.role]
    resume = dict(ckpt=args.ckpt, ckpt_every_s=args.ckpt_every)
    if args.role == "vae":
        return train_vae(args.out, args.minutes, args.seed, args.max_steps, args.threads, **resume)
    return train_mar(args.out, args.role, args.minutes, args.seed, args.max_steps, args.threads, args.vae,
                     init_from=args.init_from, distill_from=args.distill_from, guidance=args.guidance, lr=args.lr,
                     on_policy=args.on_policy, **resume)


if __name__ == "__main__":
    main()
