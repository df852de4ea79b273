"""Recipe: the zoo's caption-conditional video token model (moving procedural scenes).

A transformers ``LlamaForCausalLM`` over a joint vocabulary ``[caption words | 1024 image codes | BOI, EOF,
EOI]`` learns ``[bos, caption..., BOI, frame_0, EOF, frame_1, EOF, ..., frame_{F-1}, EOF, EOI]`` where each
frame is the bundled VQ's code grid (row-major; 8x8 codes for the default 32x32-pixel frames) of one frame of a
moving scene (:func:`mmspec.zoo.data.make_moving_scene`: shapes moving at constant velocity over a static
background).
Captions name shape, colour, size, direction and background. They are dropped with probability
``caption_dropout`` so classifier-free guidance works with the empty prompt as the unconditional branch. The
loss covers codes, EOF and EOI.

The layout lives in ``config.video_layout`` (``frames, height, width, image_token_offset, codebook_size,
eof_token_id, eoi_token_id``) and the BOI id in ``config.boi_token_id``; see
:class:`mmspec.models.image_tokens.VideoLayout` and :func:`load_video_pipeline`.

Clips are generated on the fly from a seeded stream (no epoch, no repetition), encoded with the frozen VQ in
the same step::

    python -m mmspec.zoo.recipes.video --minutes 20 --threads 1 --out mmspec/zoo/weights/video
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import hub
from ..data import image_to_tensor, make_moving_scene, scene_seed
from .common import ResumableRun, adamw, codebook_id, dir_size_bytes, seed_everything, setup_threads, write_json
from .t2i import build_tokenizer

__all__ = ["VideoRecipe", "build_model", "make_batch", "evaluate", "train", "load_video_model",
           "load_video_pipeline", "VIDEO_TRAIN_SEED", "VIDEO_HELDOUT_SEED"]

#: Seed streams of the training and held-out clips (disjoint from the still-scene streams).
VIDEO_TRAIN_SEED = 20
VIDEO_HELDOUT_SEED = 10_020
#: the bundled tokenizer the shipped video model was trained on (retrain the video model when it changes)
VQ_NAME = "vq"
VQ_DOWNSAMPLE = 4  # the bundled VQ maps s x s pixels to (s/4) x (s/4) codes


@dataclass
class VideoRecipe:
    frames: int = 8
    frame_size: int = 32  # pixels: 8x8 codes per frame (64x64 frames, 16x16 codes, were too slow to train here)
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 344
    batch_size: int = 4
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    caption_dropout: float = 0.1
    max_objects: int = 2
    eval_n: int = 32


def build_model(r: VideoRecipe, n_text: int, codebook_size: int):
    """A randomly initialised video token model with ``config.video_layout`` and ``config.boi_token_id``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    grid = r.frame_size // VQ_DOWNSAMPLE
    offset = n_text
    boi, eof, eoi = (offset + codebook_size + i for i in range(3))
    span = r.frames * (grid * grid + 1) + 1
    cfg = LlamaConfig(
        vocab_size=eoi + 1, hidden_size=r.hidden, intermediate_size=r.intermediate, num_hidden_layers=r.layers,
        num_attention_heads=r.heads, num_key_value_heads=r.kv_heads, max_position_embeddings=span + 64,
        bos_token_id=1, eos_token_id=eoi, pad_token_id=0, tie_word_embeddings=False, rope_theta=10000.0,
    )
    cfg.video_layout = dict(frames=r.frames, height=grid, width=grid, image_token_offset=offset,
                            codebook_size=codebook_size, eol_token_id=None, eof_token_id=eof, eoi_token_id=eoi)
    cfg.boi_token_id = boi
    cfg.frame_size = r.frame_size
    return LlamaForCausalLM(cfg)


def clip_batch(start: int, n: int, seed: int, frames: int, size: int, max_objects: int):
    """Clips ``start .. start+n-1`` of stream ``seed``: frames ``[n, F, 3, size, size]`` in [-1, 1], captions."""
    clips = [make_moving_scene(scene_seed(seed, i), size, frames, max_objects) for i in range(start, start + n)]
    return torch.stack([image_to_tensor(c.frames) for c in clips]), [c.caption for c in clips]


def make_batch(tokenizer, vq, config, start: int, n: int, seed: int, max_objects: int, caption_dropout: float,
               gen: torch.Generator | None):
    """Sequences [n, L] (right padded), loss mask [n, L] (True where the token is predicted), captions."""
    spec = config.video_layout
    frames = spec["frames"]
    video, captions = clip_batch(start, n, seed, frames, config.frame_size, max_objects)
    codes = hub.encode_images(vq, video.flatten(0, 1)).view(n, frames, -1) + spec["image_token_offset"]
    codes = torch.cat([codes, codes.new_full((n, frames, 1), spec["eof_token_id"])], dim=2).flatten(1)
    drop = torch.rand(n, generator=gen) < caption_dropout if caption_dropout > 0 else torch.zeros(n, dtype=torch.bool)
    texts = ["" if d else c for c, d in zip(captions, drop.tolist())]
    prompts = tokenizer(texts, add_special_tokens=True)["input_ids"]
    rows = [p + [config.boi_token_id] + codes[i].tolist() + [spec["eoi_token_id"]] for i, p in enumerate(prompts)]
    L = max(len(r) for r in rows)
    ids = torch.zeros(n, L, dtype=torch.long)
    target = torch.zeros(n, L, dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, prompts)):
        ids[i, : len(r)] = torch.tensor(r)
        target[i, len(p) + 1 : len(r)] = True
    return ids, target, captions


def _logits(model, ids, target):
    return model(input_ids=ids, attention_mask=((ids != 0) | target).long()).logits[:, :-1].float()


@torch.no_grad()
def evaluate(model, tokenizer, vq, n: int, batch_size: int = 4) -> dict[str, float]:
    """Held-out loss and mean per-token entropy (nats) over codes/EOF/EOI (conditional, teacher forced), and
    the same two numbers for the codes of frames 1.. only (the part a temporal draft can predict)."""
    was_training = model.training
    model.eval()
    sums = dict(loss=0.0, ent=0.0, count=0, loss_later=0.0, ent_later=0.0, count_later=0)
    frame_tokens = model.config.video_layout["height"] * model.config.video_layout["width"] + 1
    for start in range(0, n, batch_size):
        ids, target, _ = make_batch(tokenizer, vq, model.config, start, min(batch_size, n - start),
                                    VIDEO_HELDOUT_SEED, 2, 0.0, None)
        logits = _logits(model, ids, target)
        tgt = target[:, 1:]
        logp = logits.log_softmax(-1)
        nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1))[..., 0]
        ent = -(logp.exp() * logp).sum(-1)
        first = tgt.long().cumsum(1)  # 1-based index of each predicted token within the span
        later = tgt & (first > frame_tokens)
        for key, mask in (("", tgt), ("_later", later)):
            sums["loss" + key] += float(nll[mask].sum())
            sums["ent" + key] += float(ent[mask].sum())
            sums["count" + key] += int(mask.sum())
    if was_training:
        model.train()
    return {"heldout_loss": sums["loss"] / sums["count"], "mean_token_entropy_nats": sums["ent"] / sums["count"],
            "heldout_loss_frames_1_on": sums["loss_later"] / sums["count_later"],
            "mean_token_entropy_frames_1_on": sums["ent_later"] / sums["count_later"]}


def train(out: str | Path, minutes: float = 20.0, seed: int = 0, max_steps: int | None = None, threads: int = 1,
          vq_path: str | None = None, recipe: VideoRecipe | None = None, ckpt: str | Path | None = None,
          ckpt_every_s: float = 300.0) -> dict[str, Any]:
    """Train the video model; save fp16 safetensors + tokenizer + ``metrics.json`` + ``loss_curve.png`` in ``out``.

    ``ckpt``: a training-state file written every ``ckpt_every_s`` seconds and resumed when present (same recipe
    and tokenizer codebook; its time counts against ``minutes``)."""
    r = recipe or VideoRecipe()
    setup_threads(threads)
    gen = seed_everything(seed)
    vq = hub.load_vq(vq_path or hub.weights_path(VQ_NAME))
    tokenizer = build_tokenizer()
    model = build_model(r, len(tokenizer), int(hub.codebook(vq).shape[0]))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = adamw(model, r.lr, r.weight_decay)
    run = ResumableRun("video", model, opt, gen, minutes, max_steps, ckpt, ckpt_every_s, recipe=asdict(r),
                       codebook=codebook_id(vq))
    while not run.done():
        run.lr(r.lr, r.warmup_steps)
        ids, target, _ = make_batch(tokenizer, vq, model.config, run.seen, r.batch_size, VIDEO_TRAIN_SEED + seed,
                                    r.max_objects, r.caption_dropout, gen)
        logits = _logits(model, ids, target)
        tgt = target[:, 1:]
        loss = F.cross_entropy(logits[tgt], ids[:, 1:][tgt])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run.record(loss.item(), r.batch_size, log_every=10)
    out = Path(out)
    train_seconds = run.finish(out / "loss_curve.png", "video (training loss)")
    metrics = {"steps": run.step, "clips_seen": run.seen, "train_seconds": round(train_seconds, 1), "params": n_params,
               "final_train_loss_ema": run.ema, "recipe": asdict(r), "seed": seed, "threads": threads}
    metrics.update(evaluate(model, tokenizer, vq, r.eval_n))
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics["bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    print({k: v for k, v in metrics.items() if k != "recipe"}, flush=True)
    return metrics


def load_video_model(path: str | Path | None = None, device="cpu", dtype=torch.float32):
    """The bundled video token model (stored in fp16) and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else hub.WEIGHTS_DIR / "video"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"video model is missing at {path}; train it with "
                                f"`python -m mmspec.zoo.recipes.video --minutes 20 --threads 1 --out {path}`")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_video_pipeline(path: str | Path | None = None, device="cpu", dtype=torch.float32):
    """The bundled caption-to-video pipeline (video token model + zoo VQ + word tokenizer)."""
    from ...pipelines.video import SpeculativeVideoPipeline

    model, tokenizer = load_video_model(path, device, dtype)
    return SpeculativeVideoPipeline(model=model, vq=hub.load_vq(hub.weights_path(VQ_NAME), device=device, dtype=dtype),
                                    tokenizer=tokenizer)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmspec.zoo.recipes.video", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, default=VideoRecipe.frames)
    ap.add_argument("--frame-size", type=int, default=VideoRecipe.frame_size, help="pixels per side (multiple of 4)")
    ap.add_argument("--vq", default=None, help="VQ tokenizer folder (default: the bundled one)")
    ap.add_argument("--ckpt", default=None, help="training-state file (saved every --ckpt-every s, resumed if present)")
    ap.add_argument("--ckpt-every", type=float, default=300.0)
    args = ap.parse_args(argv)
    if args.frames < 2:
        ap.error("--frames must be >= 2")
    if args.frame_size < 8 or args.frame_size % VQ_DOWNSAMPLE:
        ap.error(f"--frame-size must be a multiple of {VQ_DOWNSAMPLE}, at least 8")
    return train(args.out, args.minutes, args.seed, args.max_steps, args.threads, args.vq,
                 VideoRecipe(frames=args.frames, frame_size=args.frame_size), args.ckpt, args.ckpt_every)


if __name__ == "__main__":
    main()
