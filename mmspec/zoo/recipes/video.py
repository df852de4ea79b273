"""Recipe: the zoo's caption-conditional video token model (moving procedural scenes).

A transformers ``LlamaForCausalLM`` over a joint vocabulary ``[caption words | image codes | BOI, EOF, EOI]``
learns ``[bos, caption..., BOI, frame_0, EOF, frame_1, EOF, ..., frame_{F-1}, EOF, EOI]`` where each
frame is a VQ's code grid (row-major; 16x16 codes for the recipe's 64x64-pixel frames) of one frame of a
moving scene (:func:`mmspec.zoo.data.make_moving_scene`: shapes moving at constant velocity over a static
background).
Captions name shape, colour, size, direction and background; with ``caption_positions`` also the cell of the 3x3
grid where each object starts ("a small red circle at the top left moving right on ..."), the words the text-to-image
target places its objects by. They are dropped with probability
``caption_dropout`` so classifier-free guidance works with the empty prompt as the unconditional branch. The
loss covers codes, EOF and EOI, the object's codes weighted more (``object_weight``, and ``first_move_weight`` in
frame 1, the one frame where only the caption's direction word tells the motion); ``cell_motion`` makes objects move
whole codes a frame; ``input_noise`` trains on inputs with stray codes (:func:`corrupt_codes`, targets true).
:func:`word_use` measures whether a model uses the direction and start-cell words; :func:`carry_on` how well it
carries an object on from a true first frame.

The layout lives in ``config.video_layout`` (``frames, height, width, image_token_offset, codebook_size,
eof_token_id, eoi_token_id``) and the BOI id in ``config.boi_token_id``; see
:class:`mmspec.models.image_tokens.VideoLayout` and :func:`load_video_pipeline`.

Clips are generated on the fly from a seeded stream (no epoch, no repetition), encoded with the frozen VQ in
the same step. The bundled model (4 frames of 64x64 over ``vq4096``, from the t2i target; ``cards/video.md``)::

    python -m mmspec.zoo.train video --frames 4 --frame-size 64 --minutes 128 --threads 1 --seed 5 --lr 1e-3 \
        --init-from mmspec/zoo/weights/t2i_target --out outputs/video64 --ckpt outputs/ckpt/video64.pt
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import hub
from ..data import image_to_tensor, make_moving_scene, scene_seed
from ..hub import codebook_id
from .common import (
    ResumableRun,
    adamw,
    copy_weights,
    dir_size_bytes,
    pair_codes,
    prefetch,
    remap_code_rows,
    seed_everything,
    setup_threads,
    write_json,
)
from .t2i import build_tokenizer

__all__ = ["VideoRecipe", "build_model", "make_batch", "evaluate", "train", "load_video_model",
           "load_video_pipeline", "transfer_from_image_model", "code_map", "transfer_to_new_codes", "motion_direction", "reader_speed", "read_clips", "word_use", "swap_word", "caption_targets", "adherence", "DIRECTION_READER", "VIDEO_TRAIN_SEED",
           "VIDEO_HELDOUT_SEED", "ADHERENCE_SEED", "VIDEO_HEADS"]

#: Seed streams of the training and held-out clips (disjoint from the still-scene streams).
VIDEO_TRAIN_SEED = 20
VIDEO_HELDOUT_SEED = 10_020
#: Held-out one-object clips whose captions the adherence evaluation asks for.
ADHERENCE_SEED = VIDEO_HELDOUT_SEED + 11
#: What :func:`read_clips` reads in a clip (the first five with the evaluation classifier).
VIDEO_HEADS = ("shape", "colour", "size", "background", "background_colour", "direction")
#: Which :func:`motion_direction` read an adherence run's direction head, recorded as ``reader`` (runs without it
#: were read by the first, 1). Runs read by different readers are not compared.
DIRECTION_READER = 2
VQ_DOWNSAMPLE = 4  # the bundled VQ maps s x s pixels to (s/4) x (s/4) codes


@dataclass
class VideoRecipe:
    frames: int = 4  # the bundled model's layout (before session 23 the defaults were 8 frames of 32x32 pixels)
    frame_size: int = 64  # pixels: 16x16 codes per frame
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
    #: learn the codes of the clips' noise-free renders (sensor noise gives a frame other codes at many places that
    #: no caption can predict; the t2i models learn noise-free codes for the same reason). The first two video
    #: models learned the noisy frames' codes.
    noise_free: bool = True
    #: extra loss weight of the codes whose patch centre lies within ``object_halo`` radii of an object in that
    #: frame (objects cover a few codes of a frame; unweighted, the static background dominates the loss)
    object_weight: float = 2.0
    object_halo: float = 1.3
    #: captions also name the cell each object starts in (:func:`mmspec.zoo.data.make_moving_scene` ``positions``);
    #: saved as ``config.caption_positions``. The t2i target draws what captions name given that cell (0.91) and
    #: not without it (shape 0.25 on captions without it), so a video model started from it keeps more of it.
    caption_positions: bool = False
    #: pixels each object moves per frame along each axis it moves on (:func:`mmspec.zoo.data.make_moving_scene`
    #: ``cell_motion``; 4 = one code per frame), 0: 1.2-2.6 pixels per frame, the first models' clips, where an object
    #: moves 4-8 pixels in a 4-frame clip and 95% of the codes near it change to codes that are no copy of the previous
    #: frame's. Saved as ``config.cell_motion``.
    cell_motion: int = 0
    #: extra loss weight, on top of ``object_weight``, of the object's codes in frame 1: taught with the true earlier
    #: frames in view, a model can read the motion of frames 2.. off frames 0 and 1, so the caption's direction word
    #: is the only clue to the motion in frame 1 alone, a few codes a clip
    first_move_weight: float = 0.0
    #: fraction of the input codes replaced, in training only, by the code up to ``input_noise_reach`` cells away in
    #: the same frame (:func:`corrupt_codes`; the targets stay the true codes): sampled clips carry their own stray
    #: codes from frame to frame, a model taught only on true frames copies them on
    input_noise: float = 0.0
    input_noise_reach: int = 2


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
    cfg.caption_positions = r.caption_positions
    cfg.cell_motion = r.cell_motion
    return LlamaForCausalLM(cfg)


def transfer_from_image_model(model, image_model) -> None:
    """Start the video ``model`` from a text-to-image token model of the same shape over the same caption words
    and codes (``config.image_layout``): every transformer weight is copied; in the token embedding and the LM
    head, the words, the codes and BOI keep their rows, and the video's EOF and EOI both start from the image
    model's EOI (an image ends where a frame does). Raises ``ValueError`` when shapes or ids do not line up."""
    vl, il = model.config.video_layout, image_model.config.image_layout
    if (il["image_token_offset"] != vl["image_token_offset"] or il["codebook_size"] != vl["codebook_size"]
            or image_model.config.boi_token_id != model.config.boi_token_id):
        raise ValueError("the image model has other caption words or codes than the video model")
    src = image_model.state_dict()
    dst = model.state_dict()
    if set(src) != set(dst):
        raise ValueError("the image model has another architecture than the video model")
    keep = model.config.boi_token_id + 1  # words, codes, BOI
    rows = torch.tensor(list(range(keep)) + [il["eoi_token_id"]] * (model.config.vocab_size - keep))
    with torch.no_grad():
        for name, value in src.items():
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                value = value[rows]
            if value.shape != dst[name].shape:
                raise ValueError(f"the image model's {name} has shape {tuple(value.shape)}, not {tuple(dst[name].shape)}")
            dst[name].copy_(value)


def code_map(new_vq, old_vq, size: int, n: int = 256, seed: int = VIDEO_TRAIN_SEED) -> torch.Tensor:
    """How the codes of ``new_vq`` stand for those of ``old_vq`` on the noise-free frames (``size`` pixels a side)
    of ``n`` training clips: ``p(old | new)`` ``[K_new, K_old]`` (:func:`~mmspec.zoo.recipes.common.pair_codes`)."""
    def frames(i):
        clips = _clips(i, min(32, n - i), seed, VideoRecipe.frames, size, VideoRecipe.max_objects, True)
        return torch.stack([image_to_tensor(c.clean) for c in clips]).flatten(0, 1)

    return pair_codes(new_vq, old_vq, (frames(i) for i in range(0, n, 32)))


def transfer_to_new_codes(model, old_model, mapping: torch.Tensor) -> None:
    """Start the video ``model`` (over a new tokenizer's codes) from ``old_model`` (a video model of the same
    architecture over another tokenizer's codes): every transformer weight is copied; in the token embedding and
    the LM head the words, BOI, EOF and EOI keep their rows and new code ``c``'s row is the ``mapping[c]``-weighted
    mean of the old codes' rows (``mapping = p(old | new)``, :func:`code_map`). Raises ``ValueError`` when shapes
    or words do not line up."""
    nl, ol = model.config.video_layout, old_model.config.video_layout
    off = nl["image_token_offset"]
    if off != ol["image_token_offset"] or mapping.shape != (nl["codebook_size"], ol["codebook_size"]):
        raise ValueError("the old model has other caption words, or the mapping is not new codes x old codes")
    tail = [old_model.config.boi_token_id, ol["eof_token_id"], ol["eoi_token_id"]]
    rows = lambda value: remap_code_rows(value, off, mapping, tail)  # noqa: E731
    copy_weights(model, old_model.state_dict(), {"model.embed_tokens.weight": rows, "lm_head.weight": rows})


def _clips(start: int, n: int, seed: int, frames: int, size: int, max_objects: int, noise_free: bool,
           positions: bool = False, cell_motion: int = 0) -> list[Any]:
    return [make_moving_scene(scene_seed(seed, i), size, frames, max_objects, clean=noise_free, positions=positions,
                              cell_motion=cell_motion) for i in range(start, start + n)]


def caption_positions(config) -> bool:
    """Whether the video model with this config was trained on captions naming where each object starts."""
    return bool(getattr(config, "caption_positions", False))


def cell_motion(config) -> int:
    """Pixels per frame the objects of this video model's training clips move along each axis (0: 1.2-2.6)."""
    return int(getattr(config, "cell_motion", 0) or 0)


def frame_size(config) -> int:
    """Pixels per frame side of the video model with this ``config`` (``config.frame_size``; older models: the code
    grid times the tokenizer's 4)."""
    return int(getattr(config, "frame_size", VQ_DOWNSAMPLE * config.video_layout["height"]))


def held_out_clips(config, n: int, clean: bool = False) -> list[Any]:
    """The first ``n`` clips of the adherence stream (:data:`ADHERENCE_SEED`, one object each) in the layout and
    caption style and motion of the video model with this ``config``: what adherence, the card's samples and the
    benchmark ask."""
    return _clips(0, n, ADHERENCE_SEED, config.video_layout["frames"], frame_size(config), 1, clean,
                  caption_positions(config), cell_motion(config))


def code_weights(clips: list[Any], size: int, weight: float, halo: float, first_move: float = 0.0) -> torch.Tensor:
    """Per-code loss weights ``[n, F, (size/4)^2]``: 1, plus ``weight`` where the code's 4x4 patch centre lies
    within ``halo`` radii of an object's centre in that frame, plus ``first_move`` there in frame 1."""
    grid = size // VQ_DOWNSAMPLE
    c = torch.arange(grid, dtype=torch.float32) * VQ_DOWNSAMPLE + VQ_DOWNSAMPLE / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    frames = clips[0].frames.shape[0]
    w = torch.ones(len(clips), frames, grid, grid)
    t = torch.arange(frames, dtype=torch.float32).view(-1, 1, 1)
    for i, clip in enumerate(clips):
        for o in clip.attributes["objects"]:
            cx, cy = o["start"][0] + o["velocity"][0] * t, o["start"][1] + o["velocity"][1] * t
            near = (xx - cx) ** 2 + (yy - cy) ** 2 <= (halo * o["radius"]) ** 2  # [F, grid, grid]
            w[i][near] = 1.0 + weight
            w[i, 1][near[1]] += first_move
    return w.flatten(2)


def make_batch(tokenizer, vq, config, start: int, n: int, seed: int, max_objects: int, caption_dropout: float,
               gen: torch.Generator | None, noise_free: bool = False, object_weight: float = 0.0,
               object_halo: float = 1.3, clips: list[Any] | None = None, first_move_weight: float = 0.0):
    """Sequences [n, L] (right padded, on the CPU), loss mask [n, L] (True where the token is predicted), captions,
    and per-token loss weights [n, L] (:func:`code_weights` on the codes with ``object_weight``, else 1); the codes
    (by ``vq``, on its device) are those of the noise-free renders with ``noise_free``. ``clips``: the clips
    ``start .. start + n - 1`` of stream ``seed`` when already rendered (e.g. by a loader process), else rendered
    here."""
    spec = config.video_layout
    frames = spec["frames"]
    if clips is None:
        clips = _clips(start, n, seed, frames, config.frame_size, max_objects, noise_free, caption_positions(config),
                       cell_motion(config))
    video = torch.stack([image_to_tensor(c.clean if noise_free else c.frames) for c in clips])
    captions = [c.caption for c in clips]
    codes = hub.encode_images(vq, video.flatten(0, 1)).view(n, frames, -1) + spec["image_token_offset"]
    codes = torch.cat([codes, codes.new_full((n, frames, 1), spec["eof_token_id"])], dim=2).flatten(1)
    drop = torch.rand(n, generator=gen) < caption_dropout if caption_dropout > 0 else torch.zeros(n, dtype=torch.bool)
    texts = ["" if d else c for c, d in zip(captions, drop.tolist())]
    prompts = tokenizer(texts, add_special_tokens=True)["input_ids"]
    rows = [p + [config.boi_token_id] + codes[i].tolist() + [spec["eoi_token_id"]] for i, p in enumerate(prompts)]
    L = max(len(r) for r in rows)
    ids = torch.zeros(n, L, dtype=torch.long)
    target = torch.zeros(n, L, dtype=torch.bool)
    weights = torch.ones(n, L)
    wc = (code_weights(clips, config.frame_size, object_weight, object_halo, first_move_weight)
          if object_weight or first_move_weight else None)
    for i, (r, p) in enumerate(zip(rows, prompts)):
        ids[i, : len(r)] = torch.tensor(r)
        target[i, len(p) + 1 : len(r)] = True
        if wc is not None:  # codes of frame f sit after BOI and f earlier frames (each with its EOF)
            span = torch.ones(frames, wc.shape[-1] + 1)
            span[:, :-1] = wc[i]
            weights[i, len(p) + 1 : len(p) + 1 + span.numel()] = span.flatten()
    return ids, target, captions, weights


def _logits(model, ids, target, inputs=None):
    """Next-token logits [n, L - 1, V] of the sequences ``ids`` [n, L] (``inputs``: what the model reads instead,
    e.g. :func:`corrupt_codes`; same shape, same padding)."""
    inputs = ids if inputs is None else inputs
    return model(input_ids=inputs, attention_mask=((ids != 0) | target).long()).logits[:, :-1].float()


def corrupt_codes(ids: torch.Tensor, target: torch.Tensor, config, rate: float, gen: torch.Generator | None = None,
                  reach: int = 2) -> torch.LongTensor:
    """Training inputs against exposure bias: a copy of the sequences ``ids`` [n, L] (:func:`make_batch`) where each
    code token, with probability ``rate``, is replaced by the code at a uniform offset of up to ``reach`` cells along
    each axis in the same frame (clamped to the frame): stray and displaced fragments like those a sampled frame
    carries. EOF, EOI and the caption are kept. Trained to predict the true codes after such inputs, a model learns
    to draw the next frame clean rather than copy the previous frame's debris on."""
    spec = config.video_layout
    H, W = spec["height"], spec["width"]
    span = H * W + 1  # a frame's codes and its EOF
    n = ids.shape[0]
    k = torch.arange(spec["frames"] * span)
    f, j = k // span, k % span
    y, x = j // W, j % W
    start = target.long().argmax(1, keepdim=True)  # [n, 1]: the first predicted token, frame 0's first code
    pos = start + k  # [n, F * span]
    dy = torch.randint(-reach, reach + 1, pos.shape, generator=gen)
    dx = torch.randint(-reach, reach + 1, pos.shape, generator=gen)
    src = start + f * span + (y + dy).clamp(0, H - 1) * W + (x + dx).clamp(0, W - 1)
    hit = (j < H * W) & (torch.rand(pos.shape, generator=gen) < rate)
    out = ids.clone()
    rows = torch.arange(n).unsqueeze(1).expand_as(pos)
    out[rows[hit], pos[hit]] = ids[rows[hit], src[hit]]
    return out


@torch.no_grad()
def evaluate(model, tokenizer, vq, n: int, batch_size: int = 4, noise_free: bool = False) -> dict[str, float]:
    """Held-out loss and mean per-token entropy (nats) over codes/EOF/EOI (conditional, teacher forced), and
    the same two numbers for the codes of frames 1.. only (the part a temporal draft can predict); on the codes
    of the noise-free renders with ``noise_free``."""
    was_training = model.training
    model.eval()
    sums = dict(loss=0.0, ent=0.0, count=0, loss_later=0.0, ent_later=0.0, count_later=0)
    frame_tokens = model.config.video_layout["height"] * model.config.video_layout["width"] + 1
    for start in range(0, n, batch_size):
        ids, target, _, _ = make_batch(tokenizer, vq, model.config, start, min(batch_size, n - start),
                                    VIDEO_HELDOUT_SEED, 2, 0.0, None, noise_free)
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


@torch.no_grad()
def carry_on(folder: str | Path | None = None, n: int = 32, guidance: float = 3.0, seed: int = 0, batch_size: int = 16,
             state: str | Path | None = None) -> dict[str, Any]:
    """How well the video model in ``folder`` carries a given object on: ``n`` held-out one-object clips (the
    adherence stream, :func:`held_out_clips`), each started from the **true** codes of its first frame (noise-free
    render), frames 1.. sampled by AR at ``guidance`` (temperature 1; batch ``s`` with a generator seeded ``seed +
    s``), then each frame read alone (:func:`read_frames`) and the direction by :func:`motion_direction`.
    ``frame_heads``: per head, the accuracy of each frame (frame 0 is the real one: the reader's ceiling); what is
    lost after it is the model's carrying on, apart from how well it draws a first frame. ``state`` as in
    :func:`load_video_pipeline`."""
    from transformers import DynamicCache

    from ...models.compat import cache_keyword

    pipe = load_video_pipeline(folder, state=state)
    model, vq, tokenizer, cfg = pipe.model, pipe.vq, pipe.tokenizer, pipe.model.config
    spec = cfg.video_layout
    frames, hw = spec["frames"], spec["height"] * spec["width"]
    lo, hi = spec["image_token_offset"], spec["image_token_offset"] + spec["codebook_size"]
    clips = held_out_clips(cfg, n, clean=True)
    captions = [c.caption for c in clips]
    real = torch.stack([image_to_tensor(c.clean) for c in clips])  # [n, F, 3, s, s]
    made = []
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        first = hub.encode_images(vq, real[s : s + b, 0]).view(b, hw) + lo
        rows = [p + [cfg.boi_token_id] + first[i % b].tolist() + [spec["eof_token_id"]]
                for i, p in enumerate(tokenizer(captions[s : s + b] + [""] * b, add_special_tokens=True)["input_ids"])]
        width = max(len(r) for r in rows)
        ids = torch.zeros(2 * b, width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padded: conditional rows, then the unconditional ones
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        gen = torch.Generator().manual_seed(seed + s)
        cache, new = {cache_keyword(model): DynamicCache()}, []
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache).logits[:, -1]
        for t in range((frames - 1) * (hw + 1)):
            if t % (hw + 1) == hw:  # the end of a frame
                token = torch.full((b,), spec["eof_token_id"])
            else:
                cond, unc = logits[:b, lo:hi].float(), logits[b:, lo:hi].float()
                token = torch.multinomial((unc + guidance * (cond - unc)).softmax(-1), 1, generator=gen)[:, 0] + lo
                new.append(token)
            mask = torch.cat([mask, mask.new_ones(2 * b, 1)], 1)
            positions = positions[:, -1:] + 1
            logits = model(input_ids=token.repeat(2).unsqueeze(1), attention_mask=mask, position_ids=positions,
                           **cache).logits[:, -1]
        codes = torch.cat([first.unsqueeze(1), torch.stack(new, 1).view(b, frames - 1, hw)], 1) - lo
        made.append(hub.decode_tokens(vq, codes.flatten(0, 1), (spec["height"], spec["width"])).float()
                    .view_as(real[s : s + b]))
    made = torch.cat(made)
    target = caption_targets(captions)
    per_frame = read_frames(hub.load_classifier(), made)
    frame_heads = {h: (labels == target[h].unsqueeze(1)).float().mean(0).tolist() for h, labels in per_frame.items()}
    direction = motion_direction(made, max_speed=reader_speed(cfg))
    return {"n_clips": n, "guidance": guidance, "seed": seed, "captions": captions, "frame_heads": frame_heads,
            "direction": float((direction == target["direction"]).float().mean())}


def swap_word(clip, word: str) -> str:
    """``clip``'s caption with its first object's ``word`` (``"direction"`` or ``"position"``) swapped for a wrong one:
    the opposite direction, or the start cell four places on in :data:`POSITIONS` (never the same cell)."""
    from ..data import DIRECTIONS, POSITIONS

    o = clip.attributes["objects"][0]
    if word == "direction":
        back = tuple(-u for u in DIRECTIONS[o["direction"]])
        other = next(k for k, v in DIRECTIONS.items() if v == back)
        return clip.caption.replace(f" moving {o['direction']} ", f" moving {other} ", 1)
    if word == "position":
        other = POSITIONS[(POSITIONS.index(o["position"]) + 4) % len(POSITIONS)]
        return clip.caption.replace(f" at the {o['position']} ", f" at the {other} ", 1)
    raise ValueError(f"word must be 'direction' or 'position', got {word!r}")


@torch.no_grad()
def word_use(folder: str | Path | None = None, n: int = 48, batch_size: int = 8, state: str | Path | None = None,
             halo: float = 1.3) -> dict[str, Any]:
    """Whether the video model in ``folder`` uses the caption's direction (and, for a model of start-cell captions,
    position) word: teacher forced on ``n`` held-out one-object clips (stream :data:`VIDEO_HELDOUT_SEED`, noise-free
    codes), the mean NLL (nats) of the codes within ``halo`` radii of the object, frame by frame, given the true caption
    and given the caption with that word swapped (:func:`swap_word`). ``gap`` (swapped - true, a list of F) is what
    the word is worth to the model: about 0 where it ignores the word. Much cheaper than :func:`adherence` (no
    sampling), so a training state can be followed with it (``state``, as in :func:`load_video_pipeline`).

    Returns ``{word: {"true": [F], "swapped": [F], "gap": [F]}, "n_clips": n}``."""
    pipe = load_video_pipeline(folder, state=state)
    model, cfg = pipe.model.eval(), pipe.model.config
    frames = cfg.video_layout["frames"]
    clips = _clips(0, n, VIDEO_HELDOUT_SEED, frames, frame_size(cfg), 1, True, caption_positions(cfg), cell_motion(cfg))
    out: dict[str, Any] = {"n_clips": n}
    for word in ("direction", "position") if caption_positions(cfg) else ("direction",):
        sums = {k: torch.zeros(frames, dtype=torch.float64) for k in ("true", "swapped")}
        count = torch.zeros(frames, dtype=torch.float64)
        for s in range(0, n, batch_size):
            part = clips[s : s + batch_size]
            for key, batch in (("true", part), ("swapped", [c._replace(caption=swap_word(c, word)) for c in part])):
                ids, target, _, w = make_batch(pipe.tokenizer, pipe.vq, cfg, 0, len(batch), 0, 1, 0.0, None, True,
                                               1.0, halo, clips=batch)
                nll = -_logits(model, ids, target).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].double()
                tgt, near = target[:, 1:], w[:, 1:] > 1  # the object's codes (EOF/EOI weigh 1)
                frame = (tgt.long().cumsum(1) - 1) // (cfg.video_layout["height"] * cfg.video_layout["width"] + 1)
                for f in range(frames):
                    m = tgt & near & (frame == f)
                    sums[key][f] += nll[m].sum()
                    if key == "true":
                        count[f] += m.sum()
        mean = {k: (v / count.clamp_min(1)).tolist() for k, v in sums.items()}
        out[word] = {**mean, "gap": [b - a for a, b in zip(mean["true"], mean["swapped"])]}
    return out


def train(out: str | Path, minutes: float = 20.0, seed: int = 0, max_steps: int | None = None, threads: int = 1,
          vq_path: str | None = None, recipe: VideoRecipe | None = None, ckpt: str | Path | None = None,
          ckpt_every_s: float = 300.0, init_from: str | Path | None = None, lr: float | None = None,
          device: str = "cpu", workers: int = 0, batch_size: int | None = None) -> dict[str, Any]:
    """Train the video model; save fp16 safetensors + tokenizer + ``metrics.json`` + ``loss_curve.png`` in ``out``.

    ``ckpt``: a training-state file written every ``ckpt_every_s`` seconds and resumed when present (same recipe
    and tokenizer codebook; its time counts against ``minutes``). ``init_from``: a saved video model folder of the
    same architecture and layout to continue from (fresh optimiser and schedule; a checkpoint, when present, still
    wins); pair it with a new ``seed`` (another clip stream) and usually a smaller ``lr``. When it generates another
    tokenizer's codes than ``vq_path``'s, its code rows are mapped onto the new codes (:func:`transfer_to_new_codes`). It may
    also be a text-to-image token model over the same words and codes (``weights/t2i_target``, whose config has an
    ``image_layout``): the video model then takes its architecture and starts from its weights
    (:func:`transfer_from_image_model`), i.e. from a model that already draws what captions name. ``vq_path``: the
    tokenizer (default: the one ``init_from``'s config names, else the first one); the saved config names it.

    ``device``: where the model trains and the tokenizer codes the clips (``"cuda"`` on a GPU machine; the held-out
    evaluation and the saved weights are the CPU's). ``workers``: loader processes rendering the clips ahead of the
    step (0: in the training process; the clips are the same either way). ``batch_size``: clips per step instead of
    the recipe's (a GPU wants dozens)."""
    r = recipe or VideoRecipe()
    if lr is not None:
        r = replace(r, lr=lr)
    if batch_size is not None:
        r = replace(r, batch_size=batch_size)
    device = torch.device(device)
    setup_threads(threads)
    gen = seed_everything(seed)
    tokenizer = build_tokenizer()
    start = None
    if init_from is not None:
        from transformers import AutoModelForCausalLM

        start = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
        c = start.config  # a text-to-image or a video model: the video model takes its shape
        r = replace(r, hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
                    kv_heads=c.num_key_value_heads, intermediate=c.intermediate_size)
    if vq_path is None:  # the tokenizer the starting model names, else the default one
        vq_path = str(hub.weights_path(hub.vq_tag(start.config)["name"] if start is not None else hub.DEFAULT_VQ))
    vq = hub.load_vq(vq_path)
    model = build_model(r, len(tokenizer), int(hub.codebook(vq).shape[0]))
    if start is not None:
        if getattr(start.config, "image_layout", None) is not None:
            transfer_from_image_model(model, start)
        else:
            keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "video_layout", "boi_token_id", "frame_size")
            old_vq = hub.load_vq_for(start.config)
            if codebook_id(old_vq) != codebook_id(vq) and start.config.frame_size == model.config.frame_size:
                transfer_to_new_codes(model, start, code_map(vq, old_vq, model.config.frame_size))
                print(f"[video] codes mapped from codebook {codebook_id(old_vq)} onto {codebook_id(vq)}", flush=True)
            elif any(getattr(start.config, k, None) != getattr(model.config, k) for k in keys):
                raise ValueError(f"init_from={str(init_from)!r} is not a video model of this recipe and tokenizer")
            else:
                model.load_state_dict(start.state_dict())
                if caption_positions(start.config) != r.caption_positions:  # a change of caption style is allowed
                    print(f"[video] {init_from} was trained on captions that "
                          f"{'name' if caption_positions(start.config) else 'do not name'} where objects start; "
                          f"these {'do' if r.caption_positions else 'do not'}", flush=True)
        print(f"[video] initialised from {init_from}", flush=True)
    model.to(device).train()
    vq.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = adamw(model, r.lr, r.weight_decay)
    # fields added in session 24 stay out of a state's identity at their defaults, so the states saved before resume
    identity = {k: v for k, v in asdict(r).items()
                if not (k in ("cell_motion", "first_move_weight", "input_noise") and not v)
                and not (k == "input_noise_reach" and not r.input_noise)}
    run = ResumableRun("video", model, opt, gen, minutes, max_steps, ckpt, ckpt_every_s, recipe=identity,
                       codebook=codebook_id(vq))
    stream = VIDEO_TRAIN_SEED + seed
    render = partial(_clips, n=r.batch_size, seed=stream, frames=r.frames, size=r.frame_size, max_objects=r.max_objects,
                     noise_free=r.noise_free, positions=r.caption_positions, cell_motion=r.cell_motion)
    clip_batches = prefetch(render, run.seen, r.batch_size, workers)
    while not run.done():
        run.lr(r.lr, r.warmup_steps)
        ids, target, _, weights = make_batch(tokenizer, vq, model.config, run.seen, r.batch_size, stream,
                                             r.max_objects, r.caption_dropout, gen, r.noise_free, r.object_weight,
                                             r.object_halo, clips=next(clip_batches),
                                             first_move_weight=r.first_move_weight)
        inputs = corrupt_codes(ids, target, model.config, r.input_noise, gen, r.input_noise_reach) if r.input_noise else ids
        ids, target, weights, inputs = ids.to(device), target.to(device), weights.to(device), inputs.to(device)
        logits = _logits(model, ids, target, inputs)
        tgt = target[:, 1:]
        w = weights[:, 1:][tgt]
        loss = (F.cross_entropy(logits[tgt], ids[:, 1:][tgt], reduction="none") * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run.record(loss.item(), r.batch_size, log_every=10)
    model.to("cpu")
    vq.to("cpu")
    out = Path(out)
    train_seconds = run.finish(out / "loss_curve.png", "video (training loss)")
    metrics = {"steps": run.step, "clips_seen": run.seen, "train_seconds": round(train_seconds, 1), "params": n_params,
               "final_train_loss_ema": run.ema, "recipe": asdict(r), "seed": seed, "threads": threads,
               "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device), "workers": workers,
               "init_from": None if init_from is None else Path(init_from).name}
    metrics.update(evaluate(model, tokenizer, vq, r.eval_n, noise_free=r.noise_free))
    out.mkdir(parents=True, exist_ok=True)
    hub.tag_vq(model.config, vq, vq_path)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics["bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    print({k: v for k, v in metrics.items() if k != "recipe"}, flush=True)
    return metrics


def motion_direction(frames: torch.Tensor, min_shift: float = 0.02, max_speed: float = 0.045) -> torch.LongTensor:
    """The direction a clip's object moves in, by block matching its first frame against its last.

    ``frames [B, F, 3, s, s]`` in [-1, 1] -> ``LongTensor [B]``: an index into ``list(DIRECTIONS)``, or -1 where
    nothing moves by ``min_shift`` of the frame side. Where the last frame differs from the first by more than half
    the clip's largest difference (the object's leading and trailing edges), the integer shift ``d`` with
    ``|d_x|, |d_y| <= max_speed * (F - 1) * s`` that best explains the last frame as the first moved by ``d``
    (least mean absolute difference there) is the object's displacement; the direction is the nearest of the 8 to
    it. ``max_speed`` bounds the motion a frame as a fraction of the side (the scene generator's fastest is 2.6
    pixels a frame at 64, 0.041).

    Reader of record since session 22 (:data:`DIRECTION_READER` 2): the earlier one (the shift of the centroid of
    the pixels that differ from the per-pixel median, first half of the clip to second) read 46% of the real
    4-frame, 64-pixel clips right, where an object moves 4-8 pixels and mostly overlaps itself; this one 98%."""
    from ..data import DIRECTIONS

    x = frames.float()
    b, f, _, hgt, wid = x.shape
    reach = max(1, math.ceil(max_speed * (f - 1) * max(hgt, wid)))
    first, last = x[:, 0], x[:, -1]  # [B, 3, s, s]
    diff = (last - first).abs().sum(1)  # [B, s, s]
    where = (diff > 0.5 * diff.amax((1, 2), keepdim=True).clamp_min(1e-6)).to(x.dtype)
    area = where.sum((1, 2)).clamp_min(1.0)
    padded = F.pad(first, (reach,) * 4, mode="replicate")
    best = torch.full((b,), float("inf"), device=x.device)
    shift = torch.zeros(b, 2, device=x.device)
    steps = range(-reach, reach + 1)
    for dx, dy in sorted(((dx, dy) for dy in steps for dx in steps), key=lambda d: d[0] ** 2 + d[1] ** 2):
        moved = padded[:, :, reach - dy : reach - dy + hgt, reach - dx : reach - dx + wid]  # first(p - d)
        err = ((last - moved).abs().sum(1) * where).sum((1, 2)) / area
        better = err < best  # ties keep the shorter shift (a still clip: none)
        best = torch.where(better, err, best)
        shift[better] = torch.tensor([dx, dy], dtype=shift.dtype, device=x.device)
    units = torch.tensor(list(DIRECTIONS.values()), dtype=shift.dtype, device=x.device)
    units = units / units.norm(dim=1, keepdim=True)
    nearest = (shift @ units.T).argmax(1)
    moved = shift.norm(dim=1) >= min_shift * max(hgt, wid)
    return torch.where(moved, nearest, torch.full_like(nearest, -1))


def reader_speed(config) -> float:
    """The fastest motion a frame, as a fraction of the side, :func:`motion_direction` looks for in clips of the video
    model with this ``config``: the scene generator's 0.045, or one pixel more than its ``cell_motion``."""
    return max(0.045, (cell_motion(config) + 1) / frame_size(config))


@torch.no_grad()
def read_clips(clf, frames: torch.Tensor, start_position: bool = False, max_speed: float = 0.045,
               per_frame: dict[str, torch.LongTensor] | None = None) -> dict[str, torch.LongTensor]:
    """What a clip shows, head by head (:data:`VIDEO_HEADS`): ``frames [B, F, 3, s, s]`` in [-1, 1] ->
    ``dict[head, LongTensor [B]]`` (indices into ``LABEL_NAMES[head]``, ``list(DIRECTIONS)`` for direction).

    Every frame is upsampled to 64 x 64 and read by the evaluation classifier ``clf`` (object heads at the most
    confidently occupied cell, i.e. one-object clips); a head's label is its most frequent one over the frames. The
    direction comes from :func:`motion_direction` (``max_speed``: :func:`reader_speed`). With ``start_position``, also
    ``position``: the cell (index into ``POSITIONS``) the classifier finds the object in, in the first frame.
    ``per_frame``: :func:`read_frames` of these frames when already read (not read again)."""
    per_frame = read_frames(clf, frames, start_position) if per_frame is None else per_frame
    out = {h: labels.mode(1).values for h, labels in per_frame.items() if h != "position"}
    out["direction"] = motion_direction(frames, max_speed=max_speed)
    if start_position:
        out["position"] = per_frame["position"][:, 0]
    return out


@torch.no_grad()
def read_frames(clf, frames: torch.Tensor, position: bool = False) -> dict[str, torch.LongTensor]:
    """What each frame shows, for every head but direction (and ``position``, the object's cell, with
    ``position``): ``frames [B, F, 3, s, s]`` in [-1, 1] -> ``dict[head, LongTensor [B, F]]``, each frame upsampled
    to 64 x 64 and read as in :func:`read_clips`."""
    b, f = frames.shape[:2]
    x = frames.flatten(0, 1).float()
    if x.shape[-2:] != (64, 64):
        x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    pred = hub.classify(clf, x.clamp(-1, 1))
    return {h: pred[h].view(b, f) for h in VIDEO_HEADS[:-1] + (("position",) if position else ())}


def caption_targets(captions: list[str]) -> dict[str, torch.LongTensor]:
    """What a video following each caption shows (its first object), head by head as :func:`read_clips` reads it;
    ``position`` (where it starts) too when every caption names it."""
    from ..data import DIRECTIONS, labels_from_attributes, parse_caption

    parsed = [parse_caption(c) for c in captions]
    rows = [labels_from_attributes(a) for a in parsed]
    out = {h: torch.tensor([r[h] for r in rows]) for h in VIDEO_HEADS[:-1]}
    out["direction"] = torch.tensor([list(DIRECTIONS).index(a["objects"][0]["direction"]) for a in parsed])
    if rows and all(r["position"] >= 0 for r in rows):
        out["position"] = torch.tensor([r["position"] for r in rows])
    return out


@torch.no_grad()
def adherence(folder: str | Path | None = None, n: int = 64, guidance: float = 3.0, seed: int = 0,
              batch_size: int = 16, decoding: str = "ar", state: str | Path | None = None,
              **pipe_kwargs: Any) -> dict[str, Any]:
    """Prompt adherence of the video model in ``folder`` (default: the bundled one): ``n`` held-out one-object
    captions (stream :data:`ADHERENCE_SEED`), video ``i`` sampled with seed ``seed + i`` at ``guidance`` by
    ``decoding``, read by :func:`read_clips`; accuracy per head and their mean. The same reader on the real clips of
    those captions is the ceiling (``real_heads``): what it misses there is the reader's error, not the model's;
    ``recon_heads`` reads the noise-free clips through the model's tokenizer, the ceiling its codes allow.
    ``pipe_kwargs`` go to the pipeline call (e.g. ``window``, ``init``, ``coupled`` for Jacobi decoding).
    ``adherence_per_video``: each video's fraction of heads right (their mean is ``adherence_mean``);
    ``adherence_ci``: its 95% bootstrap interval over the captions; :func:`paired_difference` compares two runs.
    ``frame_heads``: per head (all but direction), the accuracy of each frame read alone (a list of F).
    A model trained on captions naming where the object starts (``config.caption_positions``) is asked such captions
    and read on one more head, ``position`` (the object's cell in the first frame, in ``adherence_heads``); the means
    and ``adherence_per_video`` stay over :data:`VIDEO_HEADS`, so that runs with and without it compare (the
    classifier places a moving clip's start in its caption's cell only ~80% of the time on real clips).
    ``state``: read the weights of this training state instead (:func:`load_video_pipeline`)."""
    pipe = load_video_pipeline(folder, state=state)
    pipe.set_progress_bar_config(disable=True)
    layout = pipe.family.layout()
    size = int(pipe.model.config.frame_size)
    clips = held_out_clips(pipe.model.config, n, clean=True)
    captions = [c.caption for c in clips]
    target = caption_targets(captions)
    heads = tuple(target)  # VIDEO_HEADS, then position where the captions name where the object starts
    positions = "position" in target
    clf = hub.load_classifier()
    made, stats = [], []
    for s in range(0, n, batch_size):
        out = pipe(captions[s : s + batch_size], guidance_scale=guidance, decoding=decoding, output_type="pt", **pipe_kwargs,
                   generator=[torch.Generator().manual_seed(seed + i) for i in range(s, min(s + batch_size, n))])
        made.append(out.frames * 2 - 1)
        stats.append(out.stats)
    real = torch.stack([image_to_tensor(c.frames) for c in clips])
    # the tokenizer's ceiling: the noise-free clips (what the model learns) through the model's tokenizer
    clean = torch.stack([image_to_tensor(c.clean) for c in clips]).flatten(0, 1)  # [n * F, 3, s, s]
    grid = (size // VQ_DOWNSAMPLE, size // VQ_DOWNSAMPLE)
    vq = pipe.vq
    recon = hub.decode_tokens(vq, hub.encode_images(vq, clean.to(vq.device, vq.dtype)), grid).float().cpu()

    def correct(frames: torch.Tensor, per_frame=None) -> torch.Tensor:  # [n, heads]: 1 where the video shows the ask
        pred = read_clips(clf, frames, positions, reader_speed(pipe.model.config), per_frame)
        return torch.stack([(pred[h] == target[h]).float() for h in heads], 1)

    def score(frames: torch.Tensor) -> dict[str, float]:
        return dict(zip(heads, correct(frames).mean(0).tolist()))

    from ...bench.image import bootstrap_mean_ci

    made = torch.cat(made)
    per_frame = read_frames(clf, made, positions)
    made_correct = correct(made, per_frame)
    # where the heads go wrong: each frame read alone (frame 0 is drawn from the caption, later ones carry it on)
    frame_heads = {h: (labels == target[h].unsqueeze(1)).float().mean(0).tolist()
                   for h, labels in per_frame.items() if h != "position"}
    per_video = made_correct[:, : len(VIDEO_HEADS)].mean(1)  # the heads every caption names; not the start cell
    got = dict(zip(heads, made_correct.mean(0).tolist()))
    real_heads, recon_heads = score(real), score(recon.view_as(real))
    mean = lambda d: sum(d[h] for h in VIDEO_HEADS) / len(VIDEO_HEADS)  # noqa: E731
    return {"n_captions": n, "guidance": guidance, "decoding": decoding, **pipe_kwargs, "seed": seed,
            "frames": layout.frames, "frame_size": size, "captions": captions, "reader": DIRECTION_READER,
            "caption_positions": positions, "adherence_mean": mean(got),
            "adherence_ci": bootstrap_mean_ci(per_video, 2000, seed), "adherence_heads": got,
            "adherence_per_video": per_video.tolist(), "frame_heads": frame_heads, "real_mean": mean(real_heads),
            "real_heads": real_heads, "recon_mean": mean(recon_heads), "recon_heads": recon_heads,
            "tokenizer": getattr(pipe.model.config, "zoo_vq", {"name": hub.DEFAULT_VQ})["name"],
            "step_compression": sum(st.step_compression for st in stats) / len(stats)}


def paired_difference(new: dict[str, Any], old: dict[str, Any], reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``new``'s adherence minus ``old``'s (two :func:`adherence` results on the same captions and seeds, e.g. two
    models) with a paired 95% bootstrap interval: the captions are resampled together, so their own difficulty
    drops out of the interval. Returns ``delta`` and ``delta_ci`` (fractions of the heads), ``p`` (two-sided,
    the bootstrap's normal approximation) and ``paired: True``.

    The caption stream depends on the clip layout (a 64-pixel, 4-frame model is asked other captions than a
    32-pixel, 8-frame one): runs whose recorded ``captions`` differ raise; :func:`adherence_difference` falls back
    to :func:`unpaired_difference` for them."""
    _same_reader(new, old)
    a, b = (torch.as_tensor(r["adherence_per_video"], dtype=torch.float64) for r in (new, old))
    if a.shape != b.shape or new.get("seed") != old.get("seed") or not _same_captions(new, old):
        raise ValueError("paired_difference needs two adherence runs over the same captions and seeds")
    from ...bench.image import paired_bootstrap

    idx = torch.randint(0, a.shape[0], (reps, a.shape[0]), generator=torch.Generator().manual_seed(seed))
    delta, ci, p = paired_bootstrap(a - b, idx)
    return {"delta": delta, "delta_ci": ci, "p": p, "n_captions": int(a.shape[0]), "paired": True}


def unpaired_difference(new: dict[str, Any], old: dict[str, Any], reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``new``'s adherence minus ``old``'s over different captions (two independent samples): each run's videos
    are resampled on their own, the interval is the percentile interval of the resampled means' difference and
    ``p`` its normal approximation. Wider than :func:`paired_difference`'s, which it replaces where the captions
    differ (``paired: False``)."""
    _same_reader(new, old)
    a, b = (torch.as_tensor(r["adherence_per_video"], dtype=torch.float64) for r in (new, old))
    from ...bench.image import bootstrap_summary

    g = torch.Generator().manual_seed(seed)
    boot = (a[torch.randint(0, a.shape[0], (reps, a.shape[0]), generator=g)].mean(1)
            - b[torch.randint(0, b.shape[0], (reps, b.shape[0]), generator=g)].mean(1))
    delta, ci, p = bootstrap_summary(float(a.mean() - b.mean()), boot)
    return {"delta": delta, "delta_ci": ci, "p": p, "n_captions": [int(a.shape[0]), int(b.shape[0])], "paired": False}


def adherence_difference(new: dict[str, Any], old: dict[str, Any], reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """:func:`paired_difference` where the two runs asked the same captions with the same seeds, else
    :func:`unpaired_difference` (``paired`` in the result says which)."""
    same = (len(new["adherence_per_video"]) == len(old["adherence_per_video"]) and new.get("seed") == old.get("seed")
            and _same_captions(new, old))
    return (paired_difference if same else unpaired_difference)(new, old, reps, seed)


def _same_reader(new: dict[str, Any], old: dict[str, Any]) -> None:
    """Raise unless two adherence runs' direction heads were read by the same :func:`motion_direction`."""
    readers = new.get("reader", 1), old.get("reader", 1)
    if readers[0] != readers[1]:
        raise ValueError(f"the two adherence runs were read by direction readers {readers[0]} and {readers[1]}: "
                         "run `--adherence` again on the older one to compare them")


def _same_captions(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two adherence runs asked the same captions: their recorded lists, else (runs from before they were
    recorded: 32-pixel, 8-frame clips) their layouts."""
    if "captions" in a and "captions" in b:
        return a["captions"] == b["captions"]
    layout = lambda r: (r.get("frames", 8), r.get("frame_size", 32))  # noqa: E731
    return layout(a) == layout(b)


@torch.no_grad()
def sample_grid(folder: str | Path | None, path: str | Path, n: int = 4, guidance: float = 3.0, seed: int = 0,
                state: str | Path | None = None) -> Path:
    """The card's picture: for the first ``n`` captions of the adherence stream, the real clip (top row) and the
    model's AR sample (guidance ``guidance``, video ``i`` with seed ``seed + i``; bottom row), frame by frame,
    caption on the left; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .t2i import _wrap

    pipe = load_video_pipeline(folder, state=state)
    pipe.set_progress_bar_config(disable=True)
    layout = pipe.family.layout()
    clips = held_out_clips(pipe.model.config, n)
    out = pipe([c.caption for c in clips], guidance_scale=guidance, decoding="ar", output_type="pt",
               generator=[torch.Generator().manual_seed(seed + i) for i in range(n)])
    f = layout.frames
    fig, axes = plt.subplots(2 * n, f, figsize=(1.0 * f + 1.6, 2.1 * n))
    for i, clip in enumerate(clips):
        real = torch.from_numpy(clip.frames).float() / 255  # [F, s, s, 3]
        for j in range(f):
            for k, img in enumerate((real[j], out.frames[i, j].permute(1, 2, 0))):
                ax = axes[2 * i + k, j]
                ax.imshow(img.clamp(0, 1).numpy(), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0 and k == 0:
                    ax.set_title(f"frame {j}", fontsize=8)
        axes[2 * i, 0].set_ylabel("\n".join(_wrap(clip.caption, 24)) + "\n(real)", fontsize=6.5, rotation=0,
                                  ha="right", va="center")
        axes[2 * i + 1, 0].set_ylabel("AR sample", fontsize=6.5, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def load_video_model(path: str | Path | None = None, device="cpu", dtype=torch.float32):
    """The bundled video token model (stored in fp16) and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else hub.WEIGHTS_DIR / "video"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"video model is missing at {path}; train it with `python -m mmspec.zoo.train video "
                                "--frames 4 --frame-size 64 --lr 1e-3 --init-from mmspec/zoo/weights/t2i_target "
                                f"--minutes 20 --threads 1 --out {path}` (the bundled one: cards/video.md)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_video_pipeline(path: str | Path | None = None, device="cpu", dtype=torch.float32,
                        state: str | Path | None = None):
    """The bundled caption-to-video pipeline (video token model + the zoo tokenizer its config names + word
    tokenizer). ``state``: a training-state file (``train(ckpt=...)``) of a model of ``path``'s layout whose weights
    replace the saved ones (a run's progress, read before it ends)."""
    from ...pipelines.video import SpeculativeVideoPipeline

    model, tokenizer = load_video_model(path, device, dtype)
    if state is not None:
        weights = torch.load(state, map_location="cpu", weights_only=False)["model"]
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise ValueError(f"the training state {str(state)!r} is not of a model like {str(path)!r}: {e}") from None
    return SpeculativeVideoPipeline(model=model, vq=hub.load_vq_for(model.config, device=device, dtype=dtype),
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
    ap.add_argument("--init-from", default=None, help="continue training this saved video model (fresh schedule)")
    ap.add_argument("--noise-free", action=argparse.BooleanOptionalAction, default=VideoRecipe.noise_free,
                    help="learn the codes of the clips' noise-free renders")
    ap.add_argument("--caption-positions", action=argparse.BooleanOptionalAction, default=VideoRecipe.caption_positions,
                    help="captions also name the cell each object starts in ('... at the top left moving right ...')")
    ap.add_argument("--cell-motion", type=int, default=VideoRecipe.cell_motion, metavar="PX",
                    help="objects move PX pixels per frame along each axis they move on (4: one code per frame; "
                         "default 0: 1.2-2.6 pixels per frame)")
    ap.add_argument("--first-move-weight", type=float, default=VideoRecipe.first_move_weight, metavar="W",
                    help="extra loss weight of the object's codes in frame 1, where only the caption tells the motion")
    ap.add_argument("--input-noise", type=float, default=VideoRecipe.input_noise, metavar="P",
                    help="replace a fraction P of the input codes by nearby codes of the same frame (the targets stay "
                         "true): teaches the model to clean up its own stray codes")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    ap.add_argument("--device", default="cpu", help="where the model trains (cuda on a GPU machine)")
    ap.add_argument("--workers", type=int, default=0, help="loader processes rendering the clips ahead of the step")
    ap.add_argument("--batch-size", type=int, default=None, help="clips per step (default: the recipe's, 4)")
    ap.add_argument("--adherence", type=int, default=0, metavar="N",
                    help="do not train: write the AR prompt adherence of the model in --out on N held-out one-object "
                         "captions to --out/adherence.json")
    ap.add_argument("--against", default=None, metavar="JSON",
                    help="with --adherence: another model's adherence.json (same N and --seed); adds the paired "
                         "difference and its 95%% interval (paired where both runs asked the same captions)")
    ap.add_argument("--state", default=None, metavar="CKPT",
                    help="with --adherence or --samples: the weights of this training state (a --ckpt file of a model "
                         "like --out's) instead of --out's; the adherence goes to CKPT's name + .adherence.json")
    ap.add_argument("--word-use", type=int, default=0, metavar="N",
                    help="do not train: whether the model in --out uses the caption's direction (and start-cell) word, "
                         "teacher forced on N held-out clips; written to --out/word_use.json (CKPT.word_use.json with "
                         "--state)")
    ap.add_argument("--carry-on", type=int, default=0, metavar="N",
                    help="do not train: sample frames 1.. of N held-out clips after their true first frame and read "
                         "each frame (how well the model carries an object on); written to --out/carry_on.json "
                         "(CKPT.carry_on.json with --state)")
    ap.add_argument("--samples", default=None, metavar="PNG",
                    help="do not train: draw the card's picture (real clips and AR samples) of the model in --out")
    args = ap.parse_args(argv)
    if args.samples:
        setup_threads(args.threads)
        return sample_grid(args.out, args.samples, seed=args.seed, state=args.state)
    if args.carry_on:
        setup_threads(args.threads)
        res = {**carry_on(args.out, args.carry_on, seed=args.seed, state=args.state),
               **({"state": str(args.state)} if args.state else {})}
        write_json(Path(args.out) / "carry_on.json" if args.state is None else Path(f"{args.state}.carry_on.json"), res)
        print({k: v for k, v in res.items() if k != "captions"}, flush=True)
        return res
    if args.word_use:
        setup_threads(args.threads)
        res = {**word_use(args.out, args.word_use, state=args.state), **({"state": str(args.state)} if args.state else {})}
        write_json(Path(args.out) / "word_use.json" if args.state is None else Path(f"{args.state}.word_use.json"), res)
        print(res, flush=True)
        return res
    if args.adherence:
        setup_threads(args.threads)
        res = adherence(args.out, args.adherence, seed=args.seed, state=args.state)
        if args.against:
            res["against"] = {"file": args.against, **adherence_difference(res, json.loads(Path(args.against).read_text()))}
        if args.state:
            res["state"] = str(args.state)
        dst = Path(args.out) / "adherence.json" if args.state is None else Path(f"{args.state}.adherence.json")
        write_json(dst, res)
        print(res, flush=True)
        return res
    if args.frames < 2:
        ap.error("--frames must be >= 2")
    if args.frame_size < 8 or args.frame_size % VQ_DOWNSAMPLE:
        ap.error(f"--frame-size must be a multiple of {VQ_DOWNSAMPLE}, at least 8")
    return train(args.out, args.minutes, args.seed, args.max_steps, args.threads, args.vq,
                 VideoRecipe(frames=args.frames, frame_size=args.frame_size, noise_free=args.noise_free,
                             caption_positions=args.caption_positions, cell_motion=args.cell_motion,
                             first_move_weight=args.first_move_weight, input_noise=args.input_noise), args.ckpt,
                 args.ckpt_every, args.init_from, args.lr, args.device, args.workers, args.batch_size)


if __name__ == "__main__":
    main()
