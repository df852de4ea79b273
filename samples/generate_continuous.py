"""Generate images with a continuous-token (MAR-style) model, decoded with lossless draft-verify or plain AR.

    python samples/generate_continuous.py --model zoo --prompt red --prompt blue --num-images 2
    python samples/generate_continuous.py --model zoo --class-label 0 --decoding ar --steps 50
    python samples/generate_continuous.py --model PIPELINE_DIR --class-label 3 --draft DRAFT_DIR --window 4

``--model`` is a folder written by ``SpeculativeContinuousPipeline.save_pretrained`` or ``zoo`` for the bundled
models (classes are the scene's background colour; ``--draft zoo`` is the bundled draft, the default with ``zoo``).
Writes ``image_XXX.png``, ``grid.png`` and ``stats.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pipeline folder (save_pretrained) or 'zoo'")
    p.add_argument("--prompt", action="append", help="a class name, e.g. a colour for the zoo model (repeatable)")
    p.add_argument("--class-label", action="append", type=int, help="class id (repeatable)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt / class")
    p.add_argument("--decoding", choices=["draft", "ar"], default="draft")
    p.add_argument("--draft", default=None, help="draft model folder (a ContinuousARModel save_pretrained); 'zoo'")
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--steps", type=int, default=25, help="DDPM inference steps of the heads")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-align", action="store_true", help="independent draft noise (lower acceptance, still exact)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--out", default="outputs/continuous")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores free now, at most 4; see `mmspec image --help`)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    from mmspec.bench.common import default_threads

    torch.set_num_threads(args.threads or default_threads())
    import torch
    from torchvision.utils import make_grid, save_image

    from mmspec.models.mar import ContinuousARModel
    from mmspec.pipelines import SpeculativeContinuousPipeline

    draft = None
    if args.model == "zoo":
        pipe, zoo_draft = SpeculativeContinuousPipeline.from_zoo(with_draft=args.decoding == "draft")
        if args.decoding == "draft" and args.draft in (None, "zoo"):
            draft = zoo_draft
    else:
        pipe = SpeculativeContinuousPipeline.from_pretrained(args.model)
    if args.decoding == "draft" and draft is None:
        if args.draft is None:
            raise SystemExit("--decoding draft needs --draft (a ContinuousARModel folder, or 'zoo').")
        draft = ContinuousARModel.from_pretrained(args.draft).eval()
    if (args.prompt is None) == (args.class_label is None):
        raise SystemExit("pass --prompt or --class-label (one kind).")
    n = len(args.prompt or args.class_label) * args.num_images
    gens = [torch.Generator().manual_seed(args.seed + i) for i in range(n)]
    out = pipe(args.prompt, class_labels=args.class_label, num_images_per_prompt=args.num_images, generator=gens,
               guidance_scale=args.guidance, temperature=args.temperature, num_inference_steps=args.steps,
               decoding=args.decoding, draft_model=draft, window=args.window, align=not args.no_align,
               output_type="pt")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(out.images):
        save_image(img, folder / f"image_{i:03d}.png")
    save_image(make_grid(out.images, nrow=min(8, n), padding=2), folder / "grid.png")
    stats = dict(out.stats.as_dict(), lossless=out.lossless, acceptance_rate=out.acceptance_rate, args=vars(args))
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    print(out.stats, f"| draft acceptance rate {out.acceptance_rate}")
    print(f"wrote {n} images, grid.png and stats.json to {folder}")
    return out


if __name__ == "__main__":
    main()
