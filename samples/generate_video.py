"""Generate short videos with speculative decoding and save them as GIF (or MP4) plus the decoding stats.

    python samples/generate_video.py --model zoo --prompt "a large red circle moving right on a plain blue background"
    python samples/generate_video.py --model zoo --prompt "..." --init temporal --window 32 --format mp4
    python samples/generate_video.py --model PIPELINE_DIR --prompt "..." --decoding draft --draft DRAFT_DIR

``--model`` is a folder written by ``SpeculativeVideoPipeline.save_pretrained`` or ``zoo`` for the bundled
caption-to-video model (4 frames of 16x16 codes, 64x64 pixels). Writes ``video_XXX.gif`` (or ``.mp4``) and
``stats.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pipeline folder (save_pretrained) or 'zoo'")
    p.add_argument("--prompt", action="append", help="caption (repeatable)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--num-videos", type=int, default=1, help="videos per prompt")
    p.add_argument("--decoding", choices=["jacobi", "draft", "ar"], default="jacobi")
    p.add_argument("--draft", default=None, help="draft model folder for --decoding draft")
    p.add_argument("--init", default="temporal", help="Jacobi init: temporal, vertical, horizontal, random, sample_horizon")
    p.add_argument("--coupled", action=argparse.BooleanOptionalAction, default=True,
                   help="coupled redraw of Jacobi drafts (lossless; as `mmspec image`)")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample=False)")
    p.add_argument("--seed", type=int, default=0, help="video i uses seed + i")
    p.add_argument("--fps", type=float, default=4.0)
    p.add_argument("--scale", type=int, default=4, help="integer upscaling of the written frames")
    p.add_argument("--format", choices=["gif", "mp4"], default="gif")
    p.add_argument("--out", default="outputs/videos")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the cores free now, at most 4; see `mmspec image --help`)")
    return p


def _load_draft(path):
    from mmspec.pipelines.video import SpeculativeVideoPipeline

    if (Path(path) / "model_index.json").is_file():
        return SpeculativeVideoPipeline.from_pretrained(path).model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    from mmspec.bench.common import default_threads

    torch.set_num_threads(args.threads or default_threads())
    if not args.prompt:
        build_parser().error("pass at least one --prompt")
    import torch

    from mmspec.pipelines.video import SpeculativeVideoPipeline, export_video

    if args.model == "zoo":
        from mmspec.zoo.recipes.video import load_video_pipeline

        pipe = load_video_pipeline()
    else:
        pipe = SpeculativeVideoPipeline.from_pretrained(args.model)
    draft = _load_draft(args.draft) if args.decoding == "draft" and args.draft else None
    n = len(args.prompt) * args.num_videos
    out = pipe(args.prompt, negative_prompt=args.negative_prompt, num_videos_per_prompt=args.num_videos,
               guidance_scale=args.guidance, do_sample=not args.greedy, temperature=args.temperature,
               top_k=args.top_k, top_p=args.top_p, decoding=args.decoding, draft_model=draft, window=args.window,
               init=args.init, coupled=args.coupled, output_type="pil",
               generator=[torch.Generator().manual_seed(args.seed + i) for i in range(n)])
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [export_video(frames, folder / f"video_{i:03d}.{args.format}", fps=args.fps, scale=args.scale)
             for i, frames in enumerate(out.frames)]
    stats = dict(out.stats.as_dict(), lossless=out.lossless, prompts=args.prompt, files=paths,
                 frames=len(out.frames[0]), frame_size=list(out.frames[0][0].size), args=vars(args))
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    print(out.stats)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
