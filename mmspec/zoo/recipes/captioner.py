"""Zoo captioner: a tiny LLaVA (CLIP vision tower + Llama) that captions the procedural scenes, and its draft.

Both are ``LlavaForConditionalGeneration`` sharing one ``LlavaProcessor`` (a CLIP image processor at 64 x 64
and a word-level tokenizer over the scene vocabulary), so the draft is a small VLM that sees the image too.
The prompt is ``"<image> describe the image"``; the model learns ``caption <eos>`` after it.

    python -m mmspec.zoo.recipes.captioner target --minutes 15 --threads 1 --out mmspec/zoo/weights/captioner
    python -m mmspec.zoo.recipes.captioner draft --minutes 10 --threads 1 --out mmspec/zoo/weights/captioner_draft

Training scenes come from the stream ``TRAIN_SCENE_SEED`` (a pool that grows by a few fresh scenes every
step), evaluation from ``HELDOUT_SCENE_SEED``; ``metrics.json`` holds the final loss, greedy caption exact
match and word accuracy on held-out scenes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..data import SCENE_VOCAB, make_scene, parse_caption, scene_seed
from .common import (
    HELDOUT_SCENE_SEED,
    TRAIN_SCENE_SEED,
    Budget,
    Checkpoint,
    cosine_lr,
    dir_size_bytes,
    plot_loss_curve,
    save_fp16,
    seed_everything,
    setup_threads,
    write_json,
)

__all__ = ["CaptionerRecipe", "PRESETS", "PROMPT", "build_processor", "build_model", "train", "evaluate",
           "load_caption_pipeline", "WEIGHTS", "DRAFT_WEIGHTS"]

PROMPT = "describe the image"
OBJECT_FIELDS = ("shape", "colour", "size", "position")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 64
WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "captioner"
DRAFT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "captioner_draft"


@dataclass
class CaptionerRecipe:
    patch: int = 16  # 64 x 64 pixels -> 4 x 4 = 16 image tokens (the CLS feature is dropped)
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    lr: float = 3e-3
    batch_size: int = 32
    fresh_per_step: int = 6  # new scenes added to the training pool each step
    initial_pool: int = 1024
    max_objects: int = 2
    eval_n: int = 256


PRESETS = {
    "target": CaptionerRecipe(),
    "draft": CaptionerRecipe(vision_hidden=48, vision_layers=1, vision_heads=2, hidden=64, layers=1, heads=2,
                             kv_heads=1, intermediate=160, lr=3e-3),
}


def build_processor():
    """``LlavaProcessor``: CLIP image processing at 64 x 64 (mean = std = 0.5) and a word-level tokenizer
    (specials, ``<image>``, the scene vocabulary and the prompt words) that left-pads and prepends ``<bos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = SPECIALS + [IMAGE_TOKEN] + sorted(set(SCENE_VOCAB) | set(PROMPT.split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>", padding_side="left",
                                        model_max_length=256)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PRESETS["target"].patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN)


def build_model(r: CaptionerRecipe, processor):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=r.vision_hidden, intermediate_size=2 * r.vision_hidden,
                              num_hidden_layers=r.vision_layers, num_attention_heads=r.vision_heads,
                              image_size=IMAGE_SIZE, patch_size=r.patch, projection_dim=r.vision_hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=r.hidden, intermediate_size=r.intermediate,
                       num_hidden_layers=r.layers, num_attention_heads=r.heads, num_key_value_heads=r.kv_heads,
                       max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(config)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gc.max_new_tokens = 32
    return model


class ScenePool:
    """Training examples: pixel values [N, 3, 64, 64] and caption ids, growing by fresh scenes."""

    def __init__(self, processor, seed: int, max_objects: int):
        self.processor, self.seed, self.max_objects = processor, seed, max_objects
        self.pixels, self.captions, self.next = [], [], 0

    def grow(self, n: int) -> None:
        scenes = [make_scene(scene_seed(self.seed, self.next + i), IMAGE_SIZE, self.max_objects) for i in range(n)]
        self.next += n
        px = self.processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
        self.pixels.extend(px)
        tok = self.processor.tokenizer
        self.captions.extend(tok(s.caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in scenes)

    def batch(self, n: int, g: torch.Generator, prompt_ids: list[int]):
        """(input_ids [n, L], attention_mask, labels, pixel_values [n, 3, 64, 64]); captions right-padded."""
        idx = torch.randint(len(self.captions), (n,), generator=g).tolist()
        L = len(prompt_ids) + max(len(self.captions[i]) for i in idx)
        pad = self.processor.tokenizer.pad_token_id
        ids = torch.full((n, L), pad, dtype=torch.long)
        labels = torch.full((n, L), -100, dtype=torch.long)
        mask = torch.zeros((n, L), dtype=torch.long)
        P = len(prompt_ids)
        for row, i in enumerate(idx):
            c = self.captions[i]
            ids[row, :P] = torch.tensor(prompt_ids)
            ids[row, P : P + len(c)] = torch.tensor(c)
            labels[row, P : P + len(c)] = torch.tensor(c)
            mask[row, : P + len(c)] = 1
        return ids, mask, labels, torch.stack([self.pixels[i] for i in idx])


def prompt_ids(processor) -> list[int]:
    return processor(text=f"{IMAGE_TOKEN} {PROMPT}", images=[make_scene(0).image])["input_ids"][0]


def _loss(model, ids, mask, labels, pixels):
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


@torch.no_grad()
def evaluate(model, processor, n: int = 256, batch_size: int = 64, max_objects: int = 2) -> dict[str, float]:
    """Greedy captions of ``n`` held-out scenes: exact match, word accuracy (position-wise over the reference's
    words, a missing word counts wrong), the mean caption length, the share of well-formed captions
    (``parse_caption`` accepts them), how often the background kind, its colour and the object count are
    right, and how often each attribute of the scene's first object (shape, colour, size, position) is said of the
    caption's object at that position (its first object when none is there; a malformed caption counts wrong)."""
    from ...pipelines.caption import CaptionPipeline

    model.eval()
    pipe = CaptionPipeline(model, processor, decoding="ar", prompt=PROMPT)
    scenes = [make_scene(scene_seed(HELDOUT_SCENE_SEED, i), IMAGE_SIZE, max_objects) for i in range(n)]
    out = pipe([s.image for s in scenes], max_new_tokens=32, batch_size=batch_size, progress=False)
    exact = words_ok = words = parsed = 0
    fields = {"background": 0, "background_colour": 0, "objects": 0, **{f"object_{k}": 0 for k in OBJECT_FIELDS}}
    for s, cap in zip(scenes, out.captions):
        ref, hyp = s.caption.split(), cap.split()
        exact += ref == hyp
        words_ok += sum(a == b for a, b in zip(ref, hyp))
        words += len(ref)
        try:
            attrs = parse_caption(cap)
        except ValueError:
            continue
        parsed += 1
        truth = parse_caption(s.caption)
        fields["background"] += attrs["background"] == truth["background"]
        fields["background_colour"] += attrs["background_colour"] == truth["background_colour"]
        fields["objects"] += len(attrs["objects"]) == len(truth["objects"])
        first = truth["objects"][0]  # compared with the caption's object at its position (objects may come in
        said = next((o for o in attrs["objects"] if o["position"] == first["position"]), attrs["objects"][0])  # any order)
        for k in OBJECT_FIELDS:
            fields[f"object_{k}"] += said[k] == first[k]
    return {"exact_match": exact / n, "word_accuracy": words_ok / words,
            "mean_caption_words": sum(len(c.split()) for c in out.captions) / n, "well_formed": parsed / n,
            **{f"{k}_accuracy": v / n for k, v in fields.items()}}


def train(out: str | Path, role: str = "target", minutes: float = 15.0, seed: int = 0, max_steps: int | None = None,
          threads: int = 1, ckpt: str | Path | None = None, ckpt_every_s: float = 300.0,
          init_from: str | Path | None = None, lr: float | None = None) -> dict:
    """Train the captioner ``role`` ("target" or "draft") and save it (fp16 safetensors) with the processor,
    ``metrics.json`` and ``loss_curve.png``.

    ``ckpt``: training-state file written every ``ckpt_every_s`` seconds and resumed from when it exists (same
    role and recipe; its time counts against ``minutes``; the scene pool is rebuilt from its seed stream).
    ``init_from``: a saved captioner folder of the same role to start from (fresh optimiser and schedule).
    ``lr``: peak learning rate instead of the preset's."""
    if role not in PRESETS:
        raise ValueError(f"unknown role {role!r}; choose one of {sorted(PRESETS)}.")
    setup_threads(threads)
    r = PRESETS[role] if lr is None else replace(PRESETS[role], lr=lr)
    g = seed_everything(seed)
    processor = build_processor()
    model = build_model(r, processor)
    if init_from is not None:
        from transformers import AutoModelForImageTextToText

        start = AutoModelForImageTextToText.from_pretrained(init_from, dtype=torch.float32)
        if start.config.text_config.hidden_size != r.hidden or start.config.vision_config.hidden_size != r.vision_hidden:
            raise ValueError(f"init_from={str(init_from)!r} is not a captioner {role}")
        model.load_state_dict(start.state_dict())
        print(f"captioner {role}: initialised from {init_from}", flush=True)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"captioner {role}: {n_params / 1e6:.2f}M parameters", flush=True)
    pool = ScenePool(processor, TRAIN_SCENE_SEED, r.max_objects)
    prompt = prompt_ids(processor)
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step, ema, elapsed, history = 0, None, 0.0, []
    checkpoint = Checkpoint(ckpt, ckpt_every_s)
    state = checkpoint.resume(model, opt, g, role=role, recipe=asdict(r))
    if state is not None:
        step, ema, elapsed, history = (state[k] for k in ("step", "ema", "elapsed", "history"))
        print(f"captioner {role}: resumed from {ckpt} at step {step} ({elapsed:.0f} s trained)", flush=True)
    pool.grow(r.initial_pool + step * r.fresh_per_step)  # the pool as it stood (it grows by a fixed count per step)

    def snapshot():
        return {"role": role, "recipe": asdict(r), "model": model.state_dict(), "opt": opt.state_dict(),
                "gen": g.get_state(), "step": step, "ema": ema, "elapsed": budget.elapsed(), "history": history}

    budget = Budget(minutes, max_steps, elapsed_s=elapsed)
    t0 = time.perf_counter() - elapsed
    while not budget.done(step):
        lr = cosine_lr(r.lr, budget.progress(step), step, warmup_steps=100)
        for group in opt.param_groups:
            group["lr"] = lr
        pool.grow(r.fresh_per_step)
        loss = _loss(model, *pool.batch(r.batch_size, g, prompt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        step += 1
        if step % 50 == 0:
            history.append({"step": step, "seconds": budget.elapsed(), "loss": ema})
            print(f"step {step} loss {ema:.4f} lr {lr:.2e} pool {len(pool.captions)} "
                  f"{budget.elapsed() / 60:.1f} min", flush=True)
        if checkpoint.due():
            checkpoint.save(snapshot())
    train_minutes = (time.perf_counter() - t0) / 60
    history.append({"step": step, "seconds": budget.elapsed(), "loss": ema})
    checkpoint.save(snapshot())
    metrics = {"role": role, "steps": step, "train_minutes": round(train_minutes, 2), "final_loss_ema": ema,
               "parameters": n_params, "training_scenes_seen": step * r.batch_size,
               "distinct_training_scenes": len(pool.captions), "recipe": asdict(r), "threads": threads, "seed": seed,
               "init_from": None if init_from is None else Path(init_from).name}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_fp16(model, out)  # saved before the evaluation, so a failing evaluation loses no training
    processor.save_pretrained(out)
    plot_loss_curve(history, out / "loss_curve.png", f"captioner {role} (caption-token training loss)")
    metrics["size_bytes"] = dir_size_bytes(out)
    write_json(out / "metrics.json", metrics)
    model = model.float()  # evaluate the weights as shipped (fp16-rounded), in float32
    metrics.update({f"heldout_{k}": v for k, v in evaluate(model, processor, r.eval_n, max_objects=r.max_objects).items()})
    write_json(out / "metrics.json", metrics)
    print(metrics, flush=True)
    return metrics


def load_caption_pipeline(device="cpu", dtype=torch.float32, with_draft: bool = True, decoding: str = "lookup"):
    """The bundled captioner as a ``CaptionPipeline`` (its draft attached when ``with_draft``)."""
    from ...pipelines.caption import CaptionPipeline

    for path in (WEIGHTS,) + ((DRAFT_WEIGHTS,) if with_draft else ()):
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"bundled captioner weights are missing at {path}; train them with "
                f"`python -m mmspec.zoo.recipes.captioner {'draft' if path == DRAFT_WEIGHTS else 'target'} "
                f"--minutes 15 --threads 1 --out {path}`")
    draft = DRAFT_WEIGHTS if with_draft else None
    return CaptionPipeline.from_pretrained(WEIGHTS, draft=draft, device=device, dtype=dtype, decoding=decoding,
                                           prompt=PROMPT)


def evaluate_saved(path: str | Path, n: int = 256) -> dict:
    """Evaluate saved weights (as shipped, fp16 loaded in float32) and add the numbers to ``metrics.json``."""
    import json

    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    result = {f"heldout_{k}": v for k, v in evaluate(model, AutoProcessor.from_pretrained(path), n).items()}
    metrics_path = path / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.update(result, heldout_n=n, heldout_evaluated_on="the saved fp16 weights, loaded in float32")
    write_json(metrics_path, metrics)
    print(result, flush=True)
    return metrics


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mmspec.zoo.recipes.captioner", description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=sorted(PRESETS) + ["eval"], help="train the target or draft, or evaluate --out")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt", default=None, help="training-state file (saved every --ckpt-every s, resumed if present)")
    ap.add_argument("--ckpt-every", type=float, default=300.0)
    ap.add_argument("--init-from", default=None, help="a saved captioner folder of the same role to start from")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    args = ap.parse_args(argv)
    if args.role == "eval":
        return evaluate_saved(args.out)
    if not math.isfinite(args.minutes) or args.minutes <= 0:
        ap.error("--minutes must be > 0")
    return train(args.out, args.role, args.minutes, args.seed, args.max_steps, args.threads, args.ckpt,
                 args.ckpt_every, args.init_from, args.lr)


if __name__ == "__main__":
    main()
