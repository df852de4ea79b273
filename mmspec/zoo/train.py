"""Train a bundled zoo model on the CPU: ``python -m mmspec.zoo.train NAME``.

Each run is seeded and stops by wall clock (``--minutes``) or step count (``--max-steps``); it saves fp16
safetensors and a JSON config with ``save_pretrained`` in ``--out`` and writes the final metrics to
``--out/metrics.json``. The bundled weights were made with the commands in each model card
(``mmspec/zoo/cards/``), for example::

    python -m mmspec.zoo.train vq --minutes 35 --threads 1 --out mmspec/zoo/weights/vq --ckpt outputs/ckpt/vq.pt
    python -m mmspec.zoo.train text_target --minutes 15 --threads 1 --out mmspec/zoo/weights/text_target

``--threads 1`` because two OpenMP threads ran 2-15x slower than one on a two-core machine shared with
other jobs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: name -> (recipe module, role or None, default minutes, what it is)
MODELS = {
    "vq": ("vq", None, 35.0, "image tokenizer (diffusers VQModel, 64x64 <-> 16x16 codes)"),
    "classifier": ("classifier", None, 25.0, "evaluation classifier of the procedural scenes"),
    "t2i_target": ("t2i", "target", 50.0, "text-to-image token model (Llama, joint vocabulary)"),
    "t2i_draft": ("t2i", "draft", 12.0, "its draft"),
    "text_target": ("text_lm", "target", 110.0, "text LM on the Python standard library's source (12 layers, early exits)"),
    "text_draft": ("text_lm", "draft", 10.0, "its draft (shares the target's tokenizer)"),
    "c2i": ("c2i", None, 20.0, "class-conditional LlamaGen GPT on natural-image crops"),
    "captioner": ("captioner", "target", 15.0, "LLaVA-architecture captioner of the scenes"),
    "captioner_draft": ("captioner", "draft", 12.0, "its draft (a smaller LLaVA, same processor)"),
    "mar_vae": ("mar", "vae", 20.0, "diffusers AutoencoderKL for the continuous-token models"),
    "mar_target": ("mar", "target", 30.0, "MAR-style continuous AR model with a diffusion head"),
    "mar_draft": ("mar", "draft", 14.0, "its draft"),
    "video": ("video", None, 20.0, "caption-to-video token model (4 frames of 16x16 codes)"),
}

#: recipes with their own command line: train.py forwards the common flags to ``recipes.NAME.main``
_OWN_CLI = {"captioner", "mar", "video"}


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m mmspec.zoo.train", description=__doc__.split("\n\n")[0],
                                 epilog="models:\n" + "\n".join(f"  {k:12s} {v[3]}" for k, v in MODELS.items()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=MODELS, help="which zoo model to train")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock training budget (default: per model)")
    ap.add_argument("--max-steps", type=int, default=None, help="also stop after this many optimiser steps")
    ap.add_argument("--out", default=None, help="output directory (default: outputs/zoo/MODEL)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--eval-n", type=int, default=None, help="vq/classifier/c2i: held-out images per evaluation set")
    ap.add_argument("--vq", default=None, help="classifier/t2i/c2i: tokenizer folder (default: the bundled one)")
    ap.add_argument("--tokenizer", default=None, help="text_draft: the target's folder, whose tokenizer it shares")
    ap.add_argument("--ckpt", default=None, help="vq/t2i/c2i/video/captioner/text_*: training-state file, saved every --ckpt-every seconds; "
                    "an existing one is resumed (same recipe; its time counts against --minutes)")
    ap.add_argument("--ckpt-every", type=float, default=300.0, help="seconds between checkpoints (default 300)")
    ap.add_argument("--init-from", default=None, help="vq/t2i_*/text_*/c2i/captioner*/mar_target/mar_draft/video: continue training from this earlier run's folder")
    ap.add_argument("--denoise", action="store_true", default=None,
                    help="vq: reconstruct the scenes' noise-free renders (see cards/vq.md)")
    ap.add_argument("--decoder-only", action="store_true", default=None,
                    help="vq: train only the decoder of --init-from (every image keeps its codes, so the token models "
                         "trained on them stay valid)")
    ap.add_argument("--perceptual-from", default=None, metavar="CLASSIFIER",
                    help="vq: add a perceptual loss through this auxiliary scene classifier's trunk (not the "
                         "evaluation classifier); every step then trains on whole images")
    ap.add_argument("--perceptual-weight", type=float, default=1.0, help="vq with --perceptual-from: its weight")
    ap.add_argument("--num-codes", type=int, default=None, help="vq: codebook size (default: the recipe's, 1024)")
    ap.add_argument("--code-dim", type=int, default=None, help="vq: dimension of the code vectors (default: 8)")
    ap.add_argument("--init-vq", default=None, metavar="TOKENIZER",
                    help="t2i_* with --init-from over another tokenizer's codes: that tokenizer (default: the one "
                         "its config names); its codes are mapped onto --vq's")
    ap.add_argument("--device", default="cpu", help="vq, t2i_*, video: where the model trains (cuda on a GPU machine)")
    ap.add_argument("--workers", type=int, default=0,
                    help="vq, t2i_*, video: loader processes rendering the training images ahead of the step (a GPU needs them)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="vq: crops per step (default 16; whole-image steps take half as many); t2i_*: sequences per "
                         "step (default 32); video: clips per step (default 4)")
    ap.add_argument("--frames", type=int, default=None, help="video: frames per clip (default: the recipe's, 4)")
    ap.add_argument("--frame-size", type=int, default=None,
                    help="video: pixels per frame side, a multiple of 4 (default: the recipe's, 64: 16x16 codes)")
    ap.add_argument("--caption-positions", action="store_true",
                    help="video: captions also name the cell each object starts in ('... at the top left moving right ...')")
    ap.add_argument("--cell-motion", type=int, default=None, metavar="PX",
                    help="video: objects move PX pixels per frame along each axis they move on (4: one code per frame; "
                         "default: the recipe's 0, 1.2-2.6 pixels per frame)")
    ap.add_argument("--first-move-weight", type=float, default=None, metavar="W",
                    help="video: extra loss weight of the object's codes in frame 1 (default: the recipe's 0)")
    ap.add_argument("--input-noise", type=float, default=None, metavar="P",
                    help="video: replace a fraction P of the input codes by nearby codes of the same frame, targets "
                         "kept (default: the recipe's 0)")
    ap.add_argument("--lr", type=float, default=None, help="vq, t2i_*, c2i, captioner*, mar_target/draft, video: peak learning rate (default: the recipe's)")
    ap.add_argument("--noise-free", action=argparse.BooleanOptionalAction, default=None,
                    help="t2i_*: learn the codes of the scenes' noise-free renders (default: the recipe's)")
    ap.add_argument("--distill-from", default=None, metavar="TARGET",
                    help="t2i_draft: distil this saved target (KL to its guided and conditional code distributions) "
                         "instead of learning the data's codes; mar_draft: learn its guided and conditional noise predictions")
    ap.add_argument("--guidance", type=float, default=3.0, help="t2i_draft/mar_draft with --distill-from: the guidance scale distilled at")
    ap.add_argument("--divergence", choices=["kl", "tv"], default="kl",
                    help="t2i_draft with --distill-from: forward KL or total variation (the rejection rate)")
    ap.add_argument("--on-policy", type=float, default=0.0, metavar="SHARE",
                    help="t2i_draft with --distill-from: this share of each batch is the target's own guided samples; "
                         "mar_draft: this many target samples make half of every batch")
    args = ap.parse_args(argv)
    module_name, role, default_minutes, _ = MODELS[args.model]
    minutes = default_minutes if args.minutes is None else args.minutes
    if minutes <= 0:
        ap.error("--minutes must be > 0")
    out = args.out or os.path.join("outputs", "zoo", args.model)
    recipe = importlib.import_module(f".recipes.{module_name}", __package__)
    if module_name not in ("vq", "t2i", "video") and (args.device != "cpu" or args.workers or args.batch_size):
        ap.error("--device, --workers and --batch-size apply to vq, t2i_* and video only")
    if module_name != "video" and (args.frames is not None or args.frame_size is not None or args.caption_positions
                                   or args.cell_motion is not None or args.first_move_weight is not None
                                   or args.input_noise is not None):
        ap.error("--frames, --frame-size, --caption-positions, --cell-motion, --first-move-weight and --input-noise "
                 "apply to video only")
    if module_name in _OWN_CLI:
        forwarded = ([role] if role else []) + ["--minutes", str(minutes), "--out", out, "--seed", str(args.seed),
                                                "--threads", str(args.threads)]
        if args.max_steps:
            forwarded += ["--max-steps", str(args.max_steps)]
        if module_name == "video":
            for flag, value in (("--vq", args.vq), ("--frames", args.frames), ("--frame-size", args.frame_size),
                                ("--device", args.device), ("--workers", args.workers), ("--batch-size", args.batch_size),
                                ("--cell-motion", args.cell_motion), ("--first-move-weight", args.first_move_weight),
                                ("--input-noise", args.input_noise)):
                if value is not None:
                    forwarded += [flag, str(value)]
            if args.caption_positions:
                forwarded += ["--caption-positions"]
        if module_name in ("captioner", "video", "mar"):  # resumable, and each can continue a saved model
            flags = (("--ckpt", args.ckpt), ("--init-from", args.init_from), ("--lr", args.lr))
            if module_name == "mar" and args.on_policy != int(args.on_policy):
                ap.error("--on-policy counts target samples for mar_draft (an integer)")
            if module_name == "mar" and (args.distill_from is not None or args.on_policy):
                flags += (("--distill-from", args.distill_from), ("--guidance", args.guidance),
                          ("--on-policy", int(args.on_policy)))
            for flag, value in flags:
                if value is not None:
                    forwarded += [flag, str(value)]
            forwarded += ["--ckpt-every", str(args.ckpt_every)]
        return recipe.main(forwarded)
    common = dict(minutes=minutes, seed=args.seed, max_steps=args.max_steps, threads=args.threads)
    if module_name in ("vq",):
        kw = {k: v for k, v in (("lr", args.lr), ("num_codes", args.num_codes), ("vq_embed_dim", args.code_dim),
                                ("batch_size", args.batch_size)) if v is not None}
        if args.batch_size:
            kw["full_batch_size"] = max(1, args.batch_size // 2)
        if args.num_codes and args.num_codes > 1024:  # about 16 encoder outputs per code for the k-means fit
            kw["kmeans_crops"] = args.num_codes // 4
        if args.perceptual_from:
            kw.update(perceptual_from=args.perceptual_from, perceptual_weight=args.perceptual_weight, full_phase=1.0)
        vq_recipe = recipe.VQRecipe(**kw) if kw else None
        return recipe.train(out, eval_n=args.eval_n, ckpt=args.ckpt, ckpt_every_s=args.ckpt_every, init_from=args.init_from,
                            denoise=args.denoise, decoder_only=args.decoder_only, recipe=vq_recipe,
                            device=args.device, workers=args.workers, **common)
    if module_name == "classifier":
        return recipe.train(out, eval_n=args.eval_n, vq_path=args.vq, **common)
    if module_name == "t2i":
        return recipe.train(out, role, vq_path=args.vq, ckpt=args.ckpt, ckpt_every_s=args.ckpt_every, init_from=args.init_from,
                            lr=args.lr, noise_free=args.noise_free, distill_from=args.distill_from,
                            guidance=args.guidance, divergence=args.divergence, on_policy=args.on_policy,
                            device=args.device, workers=args.workers, batch_size=args.batch_size,
                            init_vq=args.init_vq, **common)
    if module_name == "text_lm":
        return recipe.train(out, role, tokenizer_path=args.tokenizer, init_from=args.init_from, ckpt=args.ckpt,
                            ckpt_every_s=args.ckpt_every, **common)
    if module_name == "c2i":
        return recipe.train(out, vq_path=args.vq, init_from=args.init_from, ckpt=args.ckpt,
                            ckpt_every_s=args.ckpt_every, eval_n=args.eval_n, lr=args.lr, **common)
    return recipe.train(out, vq_path=args.vq, init_from=args.init_from, **common)


if __name__ == "__main__":
    main(sys.argv[1:])
