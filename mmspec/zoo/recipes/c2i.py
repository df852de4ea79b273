"""Recipe: the zoo's class-conditional LlamaGen model on natural-image crops.

A :class:`mmspec.models.llamagen.LlamaGenGPT` (LlamaGen's own architecture: label embedding with class
dropout as the null class, 2-D rotary positions, SwiGLU blocks) learns the bundled VQ tokenizer's 16x16
codes of 64x64 crops from the photographs that scikit-image and scikit-learn ship, one class per source
photograph (:data:`mmspec.zoo.data.NATURAL_CLASSES`). Crops come from a seeded stream with flips and
scales, so the model sees natural-image statistics (texture, smooth gradients) rather than flat shapes.

    python -m mmspec.zoo.train c2i --minutes 20 --threads 1 --out mmspec/zoo/weights/c2i
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import hub
from ..data import NATURAL_CLASSES, NaturalCropDataset
from ..hub import codebook_id
from .common import (
    HELDOUT_CROP_SEED,
    TRAIN_CROP_SEED,
    ResumableRun,
    adamw,
    copy_weights,
    crop_batch,
    dir_size_bytes,
    pair_codes,
    remap_code_rows,
    seed_everything,
    setup_threads,
    write_json,
)


@dataclass
class C2IRecipe:
    dim: int = 192
    n_layer: int = 4
    n_head: int = 6
    n_kv_head: int = 2
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    class_dropout_prob: float = 0.1
    eval_n: int = 256


def build_model(r: C2IRecipe, codebook_size: int):
    from ...models.llamagen import LlamaGenConfig, LlamaGenGPT

    cfg = LlamaGenConfig(dim=r.dim, n_layer=r.n_layer, n_head=r.n_head, n_kv_head=r.n_kv_head, multiple_of=64,
                         vocab_size=codebook_size, block_size=256, cls_token_num=1, model_type="c2i",
                         num_classes=len(NATURAL_CLASSES), class_dropout_prob=r.class_dropout_prob,
                         token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    return LlamaGenGPT(cfg)


def crop_codes(vq, start: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops ``start .. start+n-1`` of stream ``seed`` as VQ codes [n, 256] and labels [n]."""
    ds = NaturalCropDataset(start + n, 64, seed)
    items = [ds[i] for i in range(start, start + n)]
    images = torch.stack([it["image"] for it in items])
    with torch.no_grad():
        codes = hub.encode_images(vq, images)
    return codes, torch.tensor([it["label"] for it in items])


def code_map(new_vq, old_vq, n: int = 1024, seed: int = TRAIN_CROP_SEED) -> torch.Tensor:
    """How the codes of ``new_vq`` stand for those of ``old_vq`` on ``n`` training crops: ``p(old | new)``
    ``[K_new, K_old]`` (:func:`~mmspec.zoo.recipes.common.pair_codes`)."""
    return pair_codes(new_vq, old_vq, (crop_batch(i, min(64, n - i), seed) for i in range(0, n, 64)))


def transfer_to_new_codes(model, old_model, mapping: torch.Tensor) -> None:
    """Start ``model`` (over a new tokenizer's codes) from ``old_model`` (the same architecture over another
    tokenizer's codes): every weight is copied; new code ``c``'s rows in the token embedding and the output head
    are the ``mapping[c]``-weighted mean of the old codes' rows (``mapping = p(old | new)``, :func:`code_map`).
    Raises ``ValueError`` when the architectures or the mapping do not line up."""
    if mapping.shape != (model.vocab_size, old_model.vocab_size):
        raise ValueError("the mapping is not new codes x old codes")
    rows = lambda value: remap_code_rows(value, 0, mapping, [])  # noqa: E731
    copy_weights(model, old_model.state_dict(), {"tok_embeddings.weight": rows, "output.weight": rows})


def _logits(model, codes, labels, drop):
    """Logits [n, 256, V] predicting each code from the class token and the codes before it."""
    return model(input_ids=codes[:, :-1], cond=labels, cond_drop=drop, use_cache=False).logits


@torch.no_grad()
def evaluate(model, vq, n: int, batch_size: int = 64) -> dict[str, float]:
    """Held-out loss and mean per-token entropy (nats), conditional."""
    model.eval()
    loss = ent = 0.0
    count = 0
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        codes, labels = crop_codes(vq, start, m, HELDOUT_CROP_SEED)
        logits = _logits(model, codes, labels, torch.zeros(m, dtype=torch.bool)).float()
        loss += float(F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="sum"))
        logp = logits.log_softmax(-1)
        ent += float(-(logp.exp() * logp).sum(-1).sum())
        count += codes.numel()
    model.train()
    return {"heldout_loss": loss / count, "mean_token_entropy_nats": ent / count}


def train(out: str | Path, minutes: float = 20.0, seed: int = 0, max_steps: int | None = None, threads: int = 1,
          vq_path: str | None = None, init_from: str | None = None, ckpt: str | Path | None = None,
          ckpt_every_s: float = 300.0, eval_n: int | None = None, lr: float | None = None) -> dict[str, Any]:
    """Train the class-conditional model; save fp16 safetensors + config + metrics + loss curve in ``out``.

    ``init_from``: continue from an earlier run's folder (a second budget; the schedule restarts). ``ckpt``: a
    training-state file written every ``ckpt_every_s`` seconds and resumed when present (its time counts against
    ``minutes``, so a stopped run continues where it was with the same schedule); it is tied to the tokenizer's
    codebook. ``eval_n``: held-out crops for the final evaluation (default: the recipe's). ``lr``: the peak learning
    rate (default: the recipe's; a lower one suits a continued run)."""
    r = C2IRecipe() if lr is None else C2IRecipe(lr=lr)
    setup_threads(threads)
    gen = seed_everything(seed)
    if vq_path is None:  # the tokenizer the starting model names, else the default one
        vq_path = str(hub.weights_path(hub.vq_tag(init_from)["name"] if init_from else hub.DEFAULT_VQ))
    vq = hub.load_vq(vq_path)
    if init_from:
        from ...models.llamagen import LlamaGenGPT

        model = LlamaGenGPT.from_pretrained(init_from, torch_dtype=torch.float32)
        old_vq = hub.load_vq_for(init_from)
        if codebook_id(old_vq) != codebook_id(vq):  # the start's code rows mapped onto a fresh model's
            start, model = model, build_model(r, int(hub.codebook(vq).shape[0]))
            transfer_to_new_codes(model, start, code_map(vq, old_vq))
            print(f"[c2i] codes mapped from codebook {codebook_id(old_vq)} onto {codebook_id(vq)}", flush=True)
    else:
        model = build_model(r, int(hub.codebook(vq).shape[0]))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = adamw(model, r.lr, r.weight_decay)
    run = ResumableRun("c2i", model, opt, gen, minutes, max_steps, ckpt, ckpt_every_s, recipe=asdict(r),
                       codebook=codebook_id(vq))
    bar = tqdm(desc="c2i", unit="step", mininterval=10, initial=run.step)
    while not run.done():
        run.lr(r.lr, r.warmup_steps)
        codes, labels = crop_codes(vq, run.seen, r.batch_size, TRAIN_CROP_SEED + seed)
        drop = torch.rand(r.batch_size, generator=gen) < r.class_dropout_prob
        logits = _logits(model, codes, labels, drop)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run.record(loss.item(), r.batch_size)
        bar.update(1)
    bar.close()
    out = Path(out)
    train_seconds = run.finish(out / "loss_curve.png", "c2i (training loss)")
    metrics = {"steps": run.step, "images_seen": run.seen, "train_seconds": round(train_seconds, 1), "params": n_params,
               "final_train_loss_ema": run.ema, "recipe": asdict(r), "seed": seed, "init_from": init_from, "classes": list(NATURAL_CLASSES)}
    metrics.update(evaluate(model, vq, r.eval_n if eval_n is None else eval_n))
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    hub.tag_vq_folder(out, vq, vq_path)
    metrics["bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    print({k: v for k, v in metrics.items() if k not in ("recipe", "classes")}, flush=True)
    return metrics


@torch.no_grad()
def sample_grid(path: str | Path, classes: tuple[int, ...] = (0, 2, 5, 9, 12, 16), guidance: float = 3.0,
                seed: int = 0) -> Path:
    """The card's picture: for each class in ``classes`` (indices into ``NATURAL_CLASSES``), a held-out crop of its
    photograph, that crop's tokenizer reconstruction and two AR samples of the bundled model (guidance ``guidance``,
    seeds ``seed + 2 i`` and ``seed + 2 i + 1``), one row each; written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..models import load_c2i_pipeline

    pipe = load_c2i_pipeline()
    pipe.set_progress_bar_config(disable=True)
    crops = NaturalCropDataset(len(NATURAL_CLASSES), 64, HELDOUT_CROP_SEED)
    real = torch.stack([crops[c]["image"] for c in classes])  # item c has label c
    recon = hub.decode_tokens(pipe.vq, hub.encode_images(pipe.vq, real))
    labels = [c for c in classes for _ in range(2)]
    out = pipe(class_labels=labels, guidance_scale=guidance, decoding="ar", output_type="pt",
               generator=[torch.Generator().manual_seed(seed + i) for i in range(len(labels))])
    samples = (out.images * 2 - 1).view(len(classes), 2, *out.images.shape[1:])
    fig, axes = plt.subplots(len(classes), 4, figsize=(8.2, 2.1 * len(classes)))
    for i, c in enumerate(classes):
        row = ((real[i], "held-out crop"), (recon[i], "reconstruction"), (samples[i, 0], "AR sample"),
               (samples[i, 1], "AR sample"))
        for j, (img, title) in enumerate(row):
            ax = axes[i, j]
            ax.imshow(((img.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
        axes[i, 0].set_ylabel(NATURAL_CLASSES[c], fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
