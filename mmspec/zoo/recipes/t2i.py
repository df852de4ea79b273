"""Recipe: the zoo's text-to-image token models (a target and a smaller draft).

A transformers ``LlamaForCausalLM`` over a joint vocabulary ``[caption words | 1024 image codes | BOI,
EOI]`` learns ``[bos, caption..., BOI, 256 codes (16x16, row-major), EOI]`` on procedural scenes encoded
by the bundled VQ tokenizer. Captions are dropped with probability ``caption_dropout`` (the sequence is
then ``[bos, BOI, codes, EOI]``), so classifier-free guidance works at sampling time with the empty prompt
as the unconditional branch (``JointVocabFamily``). The loss covers image codes and EOI only.

Scenes are generated on the fly from a seeded stream (no epoch, no repetition), encoded with the frozen
VQ in the same step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import hub
from ..data import SCENE_VOCAB, image_to_tensor
from .common import (
    HELDOUT_SCENE_SEED,
    TRAIN_SCENE_SEED,
    ResumableRun,
    adamw,
    copy_weights,
    dir_size_bytes,
    pair_codes,
    prefetch,
    remap_code_rows,
    scene_batch,
    seed_everything,
    setup_threads,
    write_json,
)
from .vq import object_weights

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
GRID = 16


@dataclass
class T2IRecipe:
    hidden: int = 192
    layers: int = 4
    heads: int = 6
    kv_heads: int = 2
    intermediate: int = 512
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    caption_dropout: float = 0.1
    max_objects: int = 2
    #: extra loss weight of the codes whose 4x4 patch centre lies within ``object_halo`` radii of an
    #: object's centre (the caption is about the objects, which cover ~10% of the codes); 0: none
    object_weight: float = 2.0
    object_halo: float = 1.3
    #: learn the codes of each scene's noise-free render (``Scene.clean``) instead of the noisy image's: about
    #: 60% of the bundled tokenizer's codes change between two draws of the sensor noise, which a token model
    #: cannot predict from the caption; textures, shading, colour jitter and illumination stay (the shipped
    #: pair; ``--no-noise-free`` gives the noisy-image codes of the first pairs)
    noise_free: bool = True
    eval_n: int = 256
    #: one matrix for the token embedding and the LM head (the draft: over 4,096 codes its two vocabulary matrices
    #: alone would be a quarter of the target; tied, the draft is about a fifth of it)
    tie_embeddings: bool = False


PRESETS = {
    "target": T2IRecipe(),
    "draft": T2IRecipe(hidden=96, layers=2, heads=3, kv_heads=1, intermediate=256, lr=3e-3, tie_embeddings=True),
}


#: recipe fields added after training states were saved, with the value that reproduces those states' runs
_ADDED_FIELDS = {"tie_embeddings": False}


def _identity(r: T2IRecipe) -> dict[str, Any]:
    """The recipe as a training state records it: fields added later are left out at their earlier behaviour, so a
    state saved before they existed still resumes."""
    return {k: v for k, v in asdict(r).items() if not (k in _ADDED_FIELDS and v == _ADDED_FIELDS[k])}


def build_tokenizer():
    """Word-level tokenizer over the scene-caption vocabulary; prepends ``<bos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + list(SCENE_VOCAB)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", model_max_length=64)


def build_model(r: T2IRecipe, n_text: int, codebook_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    offset = n_text
    boi, eoi = offset + codebook_size, offset + codebook_size + 1
    cfg = LlamaConfig(
        vocab_size=eoi + 1, hidden_size=r.hidden, intermediate_size=r.intermediate, num_hidden_layers=r.layers,
        num_attention_heads=r.heads, num_key_value_heads=r.kv_heads, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=eoi, pad_token_id=0, tie_word_embeddings=r.tie_embeddings, rope_theta=10000.0,
    )
    cfg.image_layout = dict(height=GRID, width=GRID, image_token_offset=offset, codebook_size=codebook_size,
                            eoi_token_id=eoi, eol_token_id=None)
    cfg.boi_token_id = boi
    return LlamaForCausalLM(cfg)


def code_map(new_vq, old_vq, n: int = 1024, seed: int = TRAIN_SCENE_SEED, smoothing: float = 1e-3) -> torch.Tensor:
    """How the codes of ``new_vq`` stand for those of ``old_vq`` on the noise-free renders of ``n`` scenes:
    ``p(old | new)`` ``[K_new, K_old]`` (:func:`~mmspec.zoo.recipes.common.pair_codes`)."""
    batches = (render_batch(i, min(64, n - i), seed, 2, noise_free=True)[0] for i in range(0, n, 64))
    return pair_codes(new_vq, old_vq, batches, smoothing)


def transfer_to_new_codes(model, old_model, mapping: torch.Tensor) -> None:
    """Start ``model`` (over a new tokenizer's codes) from ``old_model`` (the same architecture over another
    tokenizer's codes): every transformer weight is copied; in the token embedding and the LM head the caption
    words, BOI and EOI keep their rows, and new code ``c``'s row is the ``mapping[c]``-weighted mean of the old
    codes' rows (``mapping = p(old | new)`` from :func:`code_map`). On the bundled pair this starts the 4,096-code
    target at 4.97 nats a code on held-out scenes against 8.37 for a fresh one (the old target: 2.10 on its own
    codes). A ``model`` with tied embeddings from an untied ``old_model`` takes the LM head's rows (what the draft
    predicts with). Raises ``ValueError`` when shapes or words do not line up."""
    nl, ol = model.config.image_layout, old_model.config.image_layout
    off = nl["image_token_offset"]
    if off != ol["image_token_offset"] or mapping.shape != (nl["codebook_size"], ol["codebook_size"]):
        raise ValueError("the old model has other caption words, or the mapping is not new codes x old codes")
    src = old_model.state_dict()
    ends = [old_model.config.boi_token_id, ol["eoi_token_id"]]
    if model.config.tie_word_embeddings and not old_model.config.tie_word_embeddings:
        src = {k: v for k, v in src.items() if k != "model.embed_tokens.weight"}  # the shared matrix is the head's
    rows = lambda value: remap_code_rows(value, off, mapping, ends)  # noqa: E731
    copy_weights(model, src, {"model.embed_tokens.weight": rows, "lm_head.weight": rows})


def render_batch(start: int, n: int, seed: int, max_objects: int, noise_free: bool = False,
                 object_weight: float | None = None, object_halo: float = 1.3):
    """The scenes ``start .. start+n-1`` of stream ``seed``: images ``[n, 3, 64, 64]`` (their noise-free renders with
    ``noise_free``), captions, and with ``object_weight`` each code's loss weight ``[n, 256]`` (the pixel weight of
    :func:`mmspec.zoo.recipes.vq.object_weights` at its patch centre; else None). A pure function of its arguments,
    so loader processes can render batches ahead of the step."""
    images, scenes = scene_batch(start, n, seed, max_objects, clean=noise_free)
    if noise_free:
        images = torch.stack([image_to_tensor(s.clean) for s in scenes])
    wc = None
    if object_weight is not None:
        wc = object_weights(scenes, images.shape[-1], object_weight, object_halo)[:, 0, 2::4, 2::4].reshape(n, -1)
    return images, [s.caption for s in scenes], wc


def assemble_batch(tokenizer, vq, model_config, images: torch.Tensor, captions: list[str], wc: torch.Tensor | None,
                   caption_dropout: float, gen: torch.Generator | None):
    """Sequences from rendered scenes (:func:`render_batch`): the images are coded by ``vq`` (on its device), the
    captions dropped with probability ``caption_dropout`` (drawn from ``gen``). Returns what :func:`make_batch`
    does, on the CPU."""
    n = images.shape[0]
    with torch.no_grad():
        codes = hub.encode_images(vq, images).cpu()  # [n, 256]
    layout = model_config.image_layout
    offset, boi, eoi = layout["image_token_offset"], model_config.boi_token_id, layout["eoi_token_id"]
    drop = torch.rand(n, generator=gen) < caption_dropout if caption_dropout > 0 else torch.zeros(n, dtype=torch.bool)
    texts = ["" if d else c for c, d in zip(captions, drop.tolist())]
    prompts = tokenizer(texts, add_special_tokens=True)["input_ids"]
    rows = [p + [boi] + (codes[i] + offset).tolist() + [eoi] for i, p in enumerate(prompts)]
    L = max(len(r) for r in rows)
    ids = torch.zeros(n, L, dtype=torch.long)
    target = torch.zeros(n, L, dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, prompts)):
        ids[i, : len(r)] = torch.tensor(r)
        target[i, len(p) + 1 : len(r)] = True  # codes and EOI are predicted
    if wc is None:
        return ids, target, captions
    weights = torch.ones(n, L)
    for i, p in enumerate(prompts):
        weights[i, len(p) + 1 : len(p) + 1 + wc.shape[1]] = wc[i]
    return ids, target, captions, weights


def make_batch(tokenizer, vq, model_config, start: int, n: int, seed: int, max_objects: int,
               caption_dropout: float, gen: torch.Generator | None, object_weight: float | None = None,
               object_halo: float = 1.3, noise_free: bool = False):
    """Sequences [n, L] (right padded), loss mask [n, L] (True where the next token is a target) and the
    captions; with ``object_weight`` also per-token loss weights [n, L] (1, or ``1 + object_weight`` on
    the codes near an object; see :func:`mmspec.zoo.recipes.vq.object_weights`). ``noise_free``: the codes
    are those of the scenes' renders without sensor noise."""
    images, captions, wc = render_batch(start, n, seed, max_objects, noise_free, object_weight, object_halo)
    return assemble_batch(tokenizer, vq, model_config, images, captions, wc, caption_dropout, gen)


def _loss(model, ids, target, weights=None):
    """Mean cross-entropy of the target tokens (weighted by ``weights`` [n, L] when given)."""
    logits = model(input_ids=ids, attention_mask=(ids != 0) | target).logits[:, :-1]
    tgt = target[:, 1:]
    if weights is None:
        return F.cross_entropy(logits[tgt].float(), ids[:, 1:][tgt])
    w = weights[:, 1:][tgt]
    return (F.cross_entropy(logits[tgt].float(), ids[:, 1:][tgt], reduction="none") * w).sum() / w.sum()


def _uncond_rows(ids: torch.Tensor, target: torch.Tensor, boi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a batch with their captions dropped, ``[bos, BOI, codes, EOI]`` (right padded): the
    unconditional branch of guidance. ``ids``, ``target``: [n, L] from :func:`make_batch`."""
    starts = (ids == boi).long().argmax(1).tolist()
    L = ids.shape[1] - min(starts) + 1
    ids_u = torch.zeros(len(starts), L, dtype=ids.dtype)
    target_u = torch.zeros(len(starts), L, dtype=torch.bool)
    for i, s in enumerate(starts):
        ids_u[i, 0] = 1
        ids_u[i, 1 : 1 + ids.shape[1] - s] = ids[i, s:]
        target_u[i, 1 : 1 + ids.shape[1] - s] = target[i, s:]
    return ids_u, target_u


def _code_logits(model, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Raw logits [n, 256, codebook] of the image codes (teacher forced; the EOI prediction left out)."""
    layout = model.config.image_layout
    offset, k = layout["image_token_offset"], layout["codebook_size"]
    logits = model(input_ids=ids, attention_mask=(ids != 0) | target).logits[:, :-1][target[:, 1:]]
    return logits.view(ids.shape[0], -1, logits.shape[-1])[:, : GRID * GRID, offset : offset + k].float()


def _guided_pairs(student, teacher, ids, target, guidance: float):
    """(teacher, student) raw code logits, each [2, n, 256, codebook]: guided (``u + s (c - u)``, what the image
    pipeline samples from) and conditional."""
    ids_u, target_u = _uncond_rows(ids, target, teacher.config.boi_token_id)
    with torch.no_grad():
        tc, tu = _code_logits(teacher, ids, target), _code_logits(teacher, ids_u, target_u)
    sc, su = _code_logits(student, ids, target), _code_logits(student, ids_u, target_u)
    return (torch.stack([tu + guidance * (tc - tu), tc]), torch.stack([su + guidance * (sc - su), sc]))


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from raw logits [..., V] -> [...]."""
    logp = p_logits.log_softmax(-1)
    return (logp.exp() * (logp - q_logits.log_softmax(-1))).sum(-1)


def _tv(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Total-variation distance per position, from raw logits [..., V] -> [...]."""
    return 0.5 * (p_logits.softmax(-1) - q_logits.softmax(-1)).abs().sum(-1)


DIVERGENCES = {"kl": _kl, "tv": _tv}


def distill_loss(student, teacher, ids, target, guidance: float = 3.0, divergence: str = "kl") -> torch.Tensor:
    """Knowledge distillation of a draft for speculative decoding (DistillSpec): the mean over the image codes of
    a divergence between teacher and student on the guided distributions at ``guidance`` (what both sample from
    when decoding) plus the same on the conditional ones; teacher forced on the batch's codes. ``divergence``:
    ``"kl"`` (forward KL(teacher || student)) or ``"tv"`` (total variation: ``1 - TV`` is the probability that
    exact acceptance keeps a sampled draft token, so this is the rejection rate itself)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    t, s = _guided_pairs(student, teacher, ids, target, guidance)
    return DIVERGENCES[divergence](t, s).mean(dim=(1, 2)).sum()


@torch.no_grad()
def teacher_codes(ids: torch.Tensor, captions: list[str], teacher, tokenizer, vq, rows: int, guidance: float,
                  gen: torch.Generator | None) -> torch.Tensor:
    """``ids`` [n, L] from :func:`make_batch` with the codes of its first ``rows`` rows replaced by the teacher's own
    samples for the same prompts (plain AR, guidance ``guidance``, the image pipeline's default sampling: what a
    draft sees as its prefix when decoding, "on-policy" data for distillation). Rows whose caption was dropped are
    sampled from the empty prompt. Returns a new tensor; the sequences' layout is unchanged."""
    if rows <= 0:
        return ids
    from ...pipelines import SpeculativeImagePipeline

    layout = teacher.config.image_layout
    starts = (ids[:rows] == teacher.config.boi_token_id).long().argmax(1)  # the BOI column of each row
    empty = len(tokenizer("", add_special_tokens=True)["input_ids"])  # where BOI stands when the caption was dropped
    texts = ["" if b == empty else c for b, c in zip(starts.tolist(), captions)]
    pipe = SpeculativeImagePipeline(model=teacher, vq=vq, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    codes = pipe(texts, guidance_scale=guidance, output_type="latent", generator=gen, decoding="ar").images
    cols = starts[:, None] + 1 + torch.arange(GRID * GRID)
    out = ids.clone()
    out[:rows] = out[:rows].scatter(1, cols, codes.reshape(rows, -1).to(ids.dtype) + layout["image_token_offset"])
    return out


@torch.no_grad()
def agreement(student, teacher, tokenizer, vq, n: int = 128, guidance: float = 3.0, batch_size: int = 32,
              noise_free: bool = True, on_policy: bool = False, seed: int = 0) -> dict[str, float]:
    """How well ``student`` drafts for ``teacher`` on held-out scenes, teacher forced, at guidance ``guidance``:
    the mean total-variation distance of their guided code distributions (``1 - TV`` is the probability that
    exact acceptance keeps a draft token sampled from the student) and the mean guided KL(teacher || student).
    ``on_policy``: along the teacher's own samples for the held-out captions (:func:`teacher_codes`, ``seed``)
    instead of the data's codes: the prefixes a draft meets when decoding."""
    tv = kl = count = 0.0
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        ids, target, captions = make_batch(tokenizer, vq, teacher.config, start, min(batch_size, n - start),
                                           HELDOUT_SCENE_SEED, 2, 0.0, None, noise_free=noise_free)
        if on_policy:
            ids = teacher_codes(ids, captions, teacher, tokenizer, vq, len(captions), guidance, gen)
        t, s = _guided_pairs(student, teacher, ids, target, guidance)
        tv += float(_tv(t[0], s[0]).sum())
        kl += float(_kl(t[0], s[0]).sum())
        count += t[0].shape[0] * t[0].shape[1]
    return {"guidance": guidance, "n_scenes": n, **({"on_policy": True} if on_policy else {}),
            "mean_tv_guided": tv / count, "expected_acceptance": 1 - tv / count, "mean_kl_guided": kl / count}


@torch.no_grad()
def evaluate(model, tokenizer, vq, n: int, batch_size: int = 64, noise_free: bool = False) -> dict[str, float]:
    """Held-out loss and mean per-token entropy (nats) of the image-code predictions (conditional), on the
    codes of the noisy scenes or (``noise_free``) of their noise-free renders."""
    model.eval()
    losses, entropies = [], []
    for start in range(0, n, batch_size):
        ids, target, _ = make_batch(tokenizer, vq, model.config, start, min(batch_size, n - start),
                                    HELDOUT_SCENE_SEED, 2, 0.0, None, noise_free=noise_free)
        logits = model(input_ids=ids, attention_mask=(ids != 0) | target).logits[:, :-1].float()
        tgt = target[:, 1:]
        losses.append(F.cross_entropy(logits[tgt], ids[:, 1:][tgt], reduction="sum"))
        logp = logits[tgt].log_softmax(-1)
        entropies.append(-(logp.exp() * logp).sum(-1).sum())
        count = int(tgt.sum())
        losses[-1] = (losses[-1], count)
        entropies[-1] = (entropies[-1], count)
    total = sum(c for _, c in losses)
    model.train()
    return {"heldout_loss": float(sum(v for v, _ in losses) / total),
            "mean_token_entropy_nats": float(sum(v for v, _ in entropies) / total)}


def train(out: str | Path, role: str = "target", minutes: float = 30.0, seed: int = 0, max_steps: int | None = None,
          threads: int = 2, vq_path: str | None = None, ckpt: str | Path | None = None,
          ckpt_every_s: float = 300.0, init_from: str | Path | None = None, lr: float | None = None,
          noise_free: bool | None = None, distill_from: str | Path | None = None,
          guidance: float = 3.0, divergence: str = "kl", on_policy: float = 0.0, device: str = "cpu",
          workers: int = 0, batch_size: int | None = None, init_vq: str | None = None) -> dict[str, Any]:
    """Train the ``role`` ("target" or "draft") model; save fp16 safetensors + tokenizer + metrics + a loss
    curve (``loss_curve.png``). ``ckpt``: training-state file written every ``ckpt_every_s`` seconds and
    resumed from when it exists (same role and recipe; its time counts against ``minutes``).

    ``init_from``: a saved model folder of the same role and vocabulary size to start from (fresh
    optimiser and schedule; a checkpoint, when present, still wins); or one over another tokenizer's codes, given
    as ``init_vq`` (None: the one its config names, :func:`~mmspec.zoo.hub.load_vq_for`), whose codes are then
    mapped onto this tokenizer's
    (:func:`code_map`, :func:`transfer_to_new_codes`). ``lr``: peak learning rate instead
    of the preset's (a warm start wants a smaller one). ``noise_free``: override the preset's
    :attr:`T2IRecipe.noise_free`.

    ``distill_from``: a saved target folder to distil (draft role): the loss is :func:`distill_loss` against it at
    ``guidance`` with ``divergence`` instead of the cross-entropy of the data's codes (the batches' codes still
    come from the data); the metrics then hold :func:`agreement` before and after, on the data's codes and on the
    teacher's samples. ``on_policy``: the share of each batch whose codes are the teacher's own guided samples for
    the batch's captions (:func:`teacher_codes`; the prefixes the draft meets when decoding) instead of the data's.

    ``device``: where the model trains and the tokenizer codes the images (``"cuda"`` on a GPU machine; the
    evaluation runs on the CPU). ``workers``: loader processes that render the scenes ahead of the step (0: in the
    training process; the batches are the same either way). ``batch_size``: sequences per step instead of the
    preset's (a GPU wants several hundred)."""
    if not 0.0 <= on_policy <= 1.0:
        raise ValueError(f"on_policy must be a share in [0, 1], got {on_policy}")
    if on_policy and distill_from is None:
        raise ValueError("on_policy needs distill_from (the teacher whose samples are the data)")
    r = PRESETS[role] if lr is None else replace(PRESETS[role], lr=lr)
    if noise_free is not None:
        r = replace(r, noise_free=noise_free)
    if batch_size is not None:
        r = replace(r, batch_size=batch_size)
    device = torch.device(device)
    if device.type != "cpu" and distill_from is not None:
        raise ValueError("distillation trains on the CPU only (the teacher's sampling pipeline is not moved)")
    setup_threads(threads)
    gen = seed_everything(seed)
    vq = hub.load_vq(vq_path)
    codebook_size = int(hub.codebook(vq).shape[0])
    tokenizer = build_tokenizer()
    model = build_model(r, len(tokenizer), codebook_size)
    hub.tag_vq(model.config, vq, vq_path)
    if init_from is not None:
        from transformers import AutoModelForCausalLM

        start = AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)
        old_vq = hub.load_vq(init_vq) if init_vq is not None else hub.load_vq_for(start.config)
        if int(hub.codebook(old_vq).shape[0]) != start.config.image_layout["codebook_size"]:
            raise ValueError(f"init_from={str(init_from)!r} was not trained on init_vq={init_vq!r}: pass the "
                             "tokenizer whose codes it generates")
        if hub.codebook_id(old_vq) != hub.codebook_id(vq):
            transfer_to_new_codes(model, start, code_map(vq, old_vq))
            start = model
            print(f"[t2i-{role}] codes mapped from codebook {hub.codebook_id(old_vq)} onto {hub.codebook_id(vq)}",
                  flush=True)
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "image_layout", "boi_token_id")
        if any(getattr(start.config, k, None) != getattr(model.config, k) for k in keys):
            raise ValueError(f"init_from={str(init_from)!r} is not a {role} model over this vocabulary")
        model.load_state_dict(start.state_dict())
        print(f"[t2i-{role}] initialised from {init_from}", flush=True)
    teacher = None
    if distill_from is not None:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(distill_from, dtype=torch.float32).eval().requires_grad_(False)
        if teacher.config.vocab_size != model.config.vocab_size or teacher.config.image_layout != model.config.image_layout:
            raise ValueError(f"distill_from={str(distill_from)!r} is not a target over this vocabulary and layout")
        before = {"data": agreement(model, teacher, tokenizer, vq, guidance=guidance, noise_free=r.noise_free),
                  "on_policy": agreement(model, teacher, tokenizer, vq, guidance=guidance, noise_free=r.noise_free,
                                         on_policy=True)}
        print(f"[t2i-{role}] distilling {distill_from}; agreement before: {before}", flush=True)
    model.to(device).train()
    vq.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = adamw(model, r.lr, r.weight_decay)
    distill = None if teacher is None else {"from": Path(distill_from).name, "guidance": guidance,
                                            **({} if divergence == "kl" else {"divergence": divergence}),
                                            **({"on_policy": on_policy} if on_policy else {})}
    run = ResumableRun(f"t2i-{role}", model, opt, gen, minutes, max_steps, ckpt, ckpt_every_s, role=role,
                       recipe=_identity(r), **({} if distill is None else {"distill": distill}))
    bar = tqdm(desc=f"t2i-{role}", unit="step", mininterval=10.0, initial=run.step)
    render = partial(render_batch, n=r.batch_size, seed=TRAIN_SCENE_SEED + seed, max_objects=r.max_objects,
                     noise_free=r.noise_free, object_weight=r.object_weight, object_halo=r.object_halo)
    scenes = prefetch(render, run.seen, r.batch_size, workers, pin_memory=device.type == "cuda")
    while not run.done():
        run.lr(r.lr, r.warmup_steps)
        images, captions, wc = next(scenes)
        ids, target, captions, weights = assemble_batch(tokenizer, vq, model.config, images, captions, wc,
                                                        r.caption_dropout, gen)
        ids, target, weights = ids.to(device), target.to(device), weights.to(device)
        if on_policy:
            ids = teacher_codes(ids, captions, teacher, tokenizer, vq, round(on_policy * r.batch_size), guidance, gen)
        if teacher is None:
            loss = _loss(model, ids, target, weights if r.object_weight else None)
        else:
            loss = distill_loss(model, teacher, ids, target, guidance, divergence)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run.record(loss.item(), r.batch_size, log_every=25)
        bar.update(1)
    bar.close()
    model.to("cpu")  # the evaluation and the saved weights are the CPU's
    vq.to("cpu")
    out = Path(out)
    train_seconds = run.finish(out / "loss_curve.png", f"t2i_{role} (object-weighted training loss)" if teacher is None
                               else f"t2i_{role} (distillation loss: guided + conditional {divergence.upper()})")
    metrics = {"role": role, "steps": run.step, "images_seen": run.seen, "train_seconds": round(train_seconds, 1),
               "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
               "workers": workers, "params": n_params, "final_train_loss_ema": run.ema, "recipe": asdict(r), "seed": seed,
               "init_from": None if init_from is None else Path(init_from).name}
    metrics.update(evaluate(model, tokenizer, vq, r.eval_n, noise_free=r.noise_free))
    if teacher is not None:
        model.eval()
        metrics["distill"] = {**distill, "agreement_before": before,
                              "agreement": {"data": agreement(model, teacher, tokenizer, vq, guidance=guidance,
                                                              noise_free=r.noise_free),
                                            "on_policy": agreement(model, teacher, tokenizer, vq, guidance=guidance,
                                                                   noise_free=r.noise_free, on_policy=True)}}
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics["bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    print({k: v for k, v in metrics.items() if k != "recipe"}, flush=True)
    return metrics


#: Held-out caption stream of the adherence evaluation (the one ``mmspec bench image`` draws from).
ADHERENCE_SEED = HELDOUT_SCENE_SEED + 7


@torch.no_grad()
def adherence(folder: str | Path, vq_path: str | None = None, n: int = 64, guidance: float = 3.0, seed: int = 0,
              batch_size: int = 32) -> dict[str, Any]:
    """Prompt adherence of the model saved in ``folder`` under plain AR sampling at ``guidance``: the
    evaluation classifier reads each image at the cell its caption names; accuracy per head, their mean,
    and the target's mean per-token entropy (nats, guided) along the sampled tokens. ``n`` held-out captions
    (stream ``ADHERENCE_SEED``), image ``i`` drawn with seed ``seed + i``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...bench.image import run
    from ...pipelines import SpeculativeImagePipeline
    from ..data import make_scene, scene_seed

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vq = hub.load_vq(vq_path) if vq_path is not None else hub.load_vq_for(model.config)
    pipe = SpeculativeImagePipeline(model=model, vq=vq, tokenizer=AutoTokenizer.from_pretrained(folder))
    pipe.set_progress_bar_config(disable=True)
    prompts = [make_scene(scene_seed(ADHERENCE_SEED, i)).caption for i in range(n)]
    clf = hub.load_classifier()
    real = hub.features(clf, scene_batch(0, max(n, 64), HELDOUT_SCENE_SEED + 8, 2)[0])
    row = run(pipe, None, prompts, ["AR"], guidance=guidance, seed=seed, clf=clf, real_feats=real, batch_size=batch_size)[0]
    return {"n_captions": n, "guidance": guidance, "decoding": "ar", "adherence_mean": row["adherence"] / 100,
            "adherence_heads": row["adherence_heads"], "frechet": row["frechet"],
            "mean_token_entropy_nats_guided": row["entropy"], "seconds": round(row["median_s"], 1)}


@torch.no_grad()
def sample_grid(folder: str | Path, path: str | Path, n: int = 6, guidance: float = 3.0, vq_path: str | None = None,
                seed: int = 0) -> Path:
    """The card's picture: for the first ``n`` held-out captions of the adherence stream, the real scene, its
    tokenizer reconstruction and the model's AR sample (guidance ``guidance``, image ``i`` with seed ``seed + i``),
    one row each, captions above; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...pipelines import SpeculativeImagePipeline
    from ..data import make_scene, scene_seed

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vq = hub.load_vq(vq_path) if vq_path is not None else hub.load_vq_for(model.config)
    pipe = SpeculativeImagePipeline(model=model, vq=vq, tokenizer=AutoTokenizer.from_pretrained(folder))
    pipe.set_progress_bar_config(disable=True)
    scenes = [make_scene(scene_seed(ADHERENCE_SEED, i)) for i in range(n)]
    real = torch.stack([image_to_tensor(sc.image) for sc in scenes])  # [n, 3, 64, 64] in [-1, 1]
    recon = hub.decode_tokens(vq, hub.encode_images(vq, real))
    out = pipe([sc.caption for sc in scenes], guidance_scale=guidance, decoding="ar", output_type="pt",
               generator=[torch.Generator().manual_seed(seed + i) for i in range(n)])
    samples = out.images * 2 - 1
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.3 * n))
    for i, sc in enumerate(scenes):
        for j, (img, title) in enumerate(((real[i], "real"), (recon[i], "reconstruction"), (samples[i], "AR sample"))):
            ax = axes[i, j]
            ax.imshow(((img.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
        axes[i, 0].set_ylabel("\n".join(_wrap(sc.caption, 28)), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmspec.zoo.recipes.t2i", description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=sorted(PRESETS))
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vq", default=None, help="VQ tokenizer folder (default: the bundled one)")
    ap.add_argument("--ckpt", default=None, help="training-state file (saved every --ckpt-every s, resumed if present)")
    ap.add_argument("--ckpt-every", type=float, default=300.0)
    ap.add_argument("--init-from", default=None, help="start from this saved model folder (same role)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    ap.add_argument("--noise-free", action=argparse.BooleanOptionalAction, default=None,
                    help="learn the codes of the noise-free renders (default: the preset's)")
    ap.add_argument("--distill-from", default=None, metavar="TARGET",
                    help="distil this saved target (draft role): KL to its guided and conditional code distributions")
    ap.add_argument("--guidance", type=float, default=3.0, help="the guidance scale distilled at (with --distill-from)")
    ap.add_argument("--divergence", choices=["kl", "tv"], default="kl", help="what --distill-from minimises")
    ap.add_argument("--on-policy", type=float, default=0.0, metavar="SHARE",
                    help="with --distill-from: this share of each batch is the target's own samples (0-1)")
    ap.add_argument("--adherence", type=int, default=0, metavar="N",
                    help="do not train: write the AR prompt adherence of the model in --out on N held-out captions "
                         "to --out/adherence.json")
    ap.add_argument("--samples", default=None, metavar="PNG",
                    help="do not train: write the card's sample grid (real | reconstruction | AR sample of six held-out "
                         "captions) of the model in --out to this PNG")
    args = ap.parse_args(argv)
    if args.samples:
        setup_threads(args.threads)
        return sample_grid(args.out, args.samples, vq_path=args.vq, seed=args.seed)
    if args.adherence:
        setup_threads(args.threads)
        res = adherence(args.out, args.vq, args.adherence, seed=args.seed)
        write_json(Path(args.out) / "adherence.json", res)
        print(res, flush=True)
        return res
    return train(args.out, args.role, args.minutes, args.seed, args.max_steps, args.threads, args.vq, args.ckpt,
                 args.ckpt_every, args.init_from, args.lr, args.noise_free, args.distill_from, args.guidance,
                 args.divergence, args.on_policy)


if __name__ == "__main__":
    main()
