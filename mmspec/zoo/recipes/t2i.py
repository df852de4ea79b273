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

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import hub
from ..data import SCENE_VOCAB
from .common import (
    adamw,
    HELDOUT_SCENE_SEED,
    TRAIN_SCENE_SEED,
    Budget,
    cosine_lr,
    dir_size_bytes,
    scene_batch,
    seed_everything,
    setup_threads,
    write_json,
)

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
    eval_n: int = 256


PRESETS = {
    "target": T2IRecipe(),
    "draft": T2IRecipe(hidden=96, layers=2, heads=3, kv_heads=1, intermediate=256, lr=3e-3),
}


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
        bos_token_id=1, eos_token_id=eoi, pad_token_id=0, tie_word_embeddings=False, rope_theta=10000.0,
    )
    cfg.image_layout = dict(height=GRID, width=GRID, image_token_offset=offset, codebook_size=codebook_size,
                            eoi_token_id=eoi, eol_token_id=None)
    cfg.boi_token_id = boi
    return LlamaForCausalLM(cfg)


def make_batch(tokenizer, vq, model_config, start: int, n: int, seed: int, max_objects: int,
               caption_dropout: float, gen: torch.Generator | None):
    """Sequences [n, L] (right padded), loss mask [n, L] (True where the next token is a target)."""
    images, scenes = scene_batch(start, n, seed, max_objects)
    with torch.no_grad():
        codes = hub.encode_images(vq, images)  # [n, 256]
    layout = model_config.image_layout
    offset, boi, eoi = layout["image_token_offset"], model_config.boi_token_id, layout["eoi_token_id"]
    captions = [s.caption for s in scenes]
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
    return ids, target, captions


def _loss(model, ids, target):
    logits = model(input_ids=ids, attention_mask=(ids != 0) | target).logits[:, :-1]
    tgt = target[:, 1:]
    return F.cross_entropy(logits[tgt].float(), ids[:, 1:][tgt])


@torch.no_grad()
def evaluate(model, tokenizer, vq, n: int, batch_size: int = 64) -> dict[str, float]:
    """Held-out loss and mean per-token entropy (nats) of the image-code predictions (conditional)."""
    model.eval()
    losses, entropies = [], []
    for start in range(0, n, batch_size):
        ids, target, _ = make_batch(tokenizer, vq, model.config, start, min(batch_size, n - start),
                                    HELDOUT_SCENE_SEED, 2, 0.0, None)
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
          threads: int = 2, vq_path: str | None = None) -> dict[str, Any]:
    """Train the ``role`` ("target" or "draft") model; save fp16 safetensors + tokenizer + metrics."""
    r = PRESETS[role]
    setup_threads(threads)
    gen = seed_everything(seed)
    vq = hub.load_vq(vq_path)
    codebook_size = int(hub.codebook(vq).shape[0])
    tokenizer = build_tokenizer()
    model = build_model(r, len(tokenizer), codebook_size)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = adamw(model, r.lr, r.weight_decay)
    budget = Budget(minutes, max_steps)
    step, seen, t0 = 0, 0, time.perf_counter()
    bar = tqdm(desc=f"t2i-{role}", unit="step")
    ema = None
    while not budget.done(step):
        lr = cosine_lr(r.lr, budget.progress(step), step, r.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, target, _ = make_batch(tokenizer, vq, model.config, seen, r.batch_size, TRAIN_SCENE_SEED + seed,
                                    r.max_objects, r.caption_dropout, gen)
        seen += r.batch_size
        loss = _loss(model, ids, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        value = loss.item()
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}")
        if step % 100 == 0:
            print(f"[t2i-{role}] step {step} t={budget.elapsed():.0f}s loss={ema:.4f} lr={lr:.2e}", flush=True)
    bar.close()
    metrics = {"role": role, "steps": step, "images_seen": seen, "train_seconds": time.perf_counter() - t0,
               "params": n_params, "final_train_loss_ema": ema, "recipe": asdict(r), "seed": seed}
    metrics.update(evaluate(model, tokenizer, vq, r.eval_n))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics["bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    print({k: v for k, v in metrics.items() if k != "recipe"}, flush=True)
    return metrics


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
    args = ap.parse_args(argv)
    return train(args.out, args.role, args.minutes, args.seed, args.max_steps, args.threads, args.vq)


if __name__ == "__main__":
    main()
