"""Generate images with speculative decoding and save them, a grid, and the decoding stats.

    python samples/generate_image.py --model zoo --prompt "a small red circle at the top left on a plain blue background"

Defaults follow ``mmspec image`` (Jacobi, vertical init, coupled redraw, window 16, threads that do not
oversubscribe the CPU).
    python samples/generate_image.py --model PIPELINE_DIR --class-label 207 --class-label 360 --decoding jacobi \\
        --init vertical --window 32 --guidance 4 --out outputs/llamagen
    python samples/generate_image.py --model PIPELINE_DIR --prompt "..." --acceptance lantern \\
        --acceptance-param k=100 --acceptance-param delta=0.2 --decoding draft --draft DRAFT_DIR

Data-parallel over many prompts (one per line in a file), on any number of processes or nodes::

    torchrun --nproc_per_node 2 samples/generate_image.py --model zoo --prompt-file prompts.txt --out outputs/run

Prompt ``i`` is drawn with seed ``--seed + i`` and written to ``image_{i:06d}.png`` (same bytes whatever the
number of processes); reruns skip finished prompts; a failing prompt is recorded, not fatal; rank 0 writes the
merged ``stats.json`` (see :mod:`mmspec.distributed`).

``--model`` is a folder written by ``SpeculativeImagePipeline.save_pretrained`` (any registered family:
the joint-vocabulary form, LlamaGen, Janus, Chameleon/Lumina-mGPT/Anole, ...) or ``zoo`` for the bundled
text-to-image model. Writes ``image_XXX.png``, ``grid.png`` and ``stats.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _param(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def _load_draft(path):
    from mmspec.pipelines import SpeculativeImagePipeline

    if (Path(path) / "model_index.json").is_file():
        return SpeculativeImagePipeline.from_pretrained(path).model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser():
    from mmspec.cli import THREADS_HELP
    from mmspec.drafting.jacobi import INIT_STRATEGIES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True, help="pipeline folder (save_pretrained) or 'zoo'")
    p.add_argument("--prompt", action="append", help="text prompt (repeatable)")
    p.add_argument("--prompt-file", default=None, help="one prompt per line: data-parallel, resumable mode (torchrun)")
    p.add_argument("--batch-size", type=int, default=8, help="--prompt-file mode: prompts per batched decode")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--class-label", action="append", type=int, help="class id for class-conditional models (repeatable)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt / class")
    p.add_argument("--decoding", choices=["jacobi", "draft", "ar"], default="jacobi")
    p.add_argument("--draft", default=None, help="draft model folder for --decoding draft ('zoo' for the bundled draft)")
    p.add_argument("--init", choices=sorted(INIT_STRATEGIES), default="vertical", help="Jacobi init for new slots")
    p.add_argument("--coupled", action=argparse.BooleanOptionalAction, default=True,
                   help="coupled redraw of Jacobi drafts (lossless; as `mmspec image`)")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--acceptance", default="exact", help="exact (lossless), lantern, gsd, typical")
    p.add_argument("--acceptance-param", action="append", type=_param, default=[], metavar="NAME=VALUE",
                   help="criterion parameter, e.g. k=1000, delta=0.1, lam=2, group_size=25 (repeatable)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample=False)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--out", default="outputs/images")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return p


def _load(args):
    from mmspec.pipelines import SpeculativeImagePipeline

    if args.model == "zoo":
        from mmspec.zoo.models import load_image_pipeline

        pipe, zoo_draft = load_image_pipeline(with_draft=args.decoding == "draft")
    else:
        pipe, zoo_draft = SpeculativeImagePipeline.from_pretrained(args.model), None
    draft = None
    if args.decoding == "draft":
        draft = zoo_draft if args.draft in (None, "zoo") else _load_draft(args.draft)
        if draft is None:
            raise SystemExit("--decoding draft needs --draft")
    return pipe, draft


def _decode_kwargs(args, draft):
    import mmspec

    criterion = mmspec.acceptance.get(args.acceptance, **dict(args.acceptance_param))
    kw = dict(decoding=args.decoding, window=args.window, acceptance=criterion, guidance_scale=args.guidance,
              num_images_per_prompt=args.num_images, do_sample=not args.greedy,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, output_type="pt")
    if args.decoding == "jacobi":
        kw.update(init=args.init, coupled=args.coupled)
    if args.decoding == "draft":
        kw.update(draft_model=draft)
    if args.decoding == "ar":
        kw.pop("window")
    return kw, criterion


def run_prompt_file(args):
    """Data-parallel mode: shard the prompt file over torch.distributed ranks (see the module docstring)."""
    import torch
    from torchvision.utils import save_image

    from mmspec.distributed import init_distributed, read_prompt_file, run_sharded

    if args.prompt or args.class_label:
        raise SystemExit("--prompt-file cannot be combined with --prompt / --class-label")
    prompts = read_prompt_file(args.prompt_file)
    ctx = init_distributed()
    try:
        pipe, draft = _load(args)
        pipe.to(ctx.device)
        if draft is not None:
            draft.to(ctx.device)
        pipe.set_progress_bar_config(disable=True)
        kw, _ = _decode_kwargs(args, draft)
        kw["num_images_per_prompt"] = 1
        folder = Path(args.out)

        def process(indices, batch):
            gens = [torch.Generator().manual_seed(args.seed + i) for i in indices]
            out = pipe(prompt=list(batch), negative_prompt=args.negative_prompt, generator=gens, **kw)
            records = []
            for row, (i, prompt) in enumerate(zip(indices, batch)):
                name = f"image_{i:06d}.png"
                save_image(out.images[row], folder / name)
                stats = {"new_tokens": out.stats.new_tokens_per_row[row], "row_forwards": out.stats.row_forwards[row]}
                records.append({"prompt": prompt, "file": name, "stats": stats, "tokens": out.tokens[row].tolist()})
            return records

        summary = run_sharded(prompts, process, folder, ctx, batch_size=args.batch_size)
    finally:
        ctx.close()
    if summary is not None:
        print(f"{summary['ok']}/{summary['items']} prompts ok, {len(summary['failed'])} failed, "
              f"step compression {summary.get('step_compression', float('nan')):.2f}x; wrote {folder / 'stats.json'}")
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    import torch

    from mmspec.bench.common import default_threads

    torch.set_num_threads(args.threads or default_threads())
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    if args.prompt_file:
        return run_prompt_file(args)
    import torch
    from torchvision.utils import make_grid, save_image

    n = len(args.prompt or args.class_label or [])
    if n == 0:
        raise SystemExit("give --prompt, --prompt-file or --class-label")
    pipe, draft = _load(args)
    kw, criterion = _decode_kwargs(args, draft)
    kw["generator"] = [torch.Generator().manual_seed(args.seed + i) for i in range(n * args.num_images)]
    out = pipe(prompt=args.prompt, class_labels=args.class_label, negative_prompt=args.negative_prompt, **kw)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(out.images):
        save_image(image, folder / f"image_{i:03d}.png")
    save_image(make_grid(out.images, nrow=min(8, len(out.images)), padding=2), folder / "grid.png")
    stats = out.stats.as_dict()
    record = {"args": {k: v for k, v in vars(args).items()}, "lossless": out.lossless, "criterion": repr(criterion),
              "stats": stats, "tokens": out.tokens.tolist()}
    (folder / "stats.json").write_text(json.dumps(record, indent=2))
    print(f"{out.stats}\nwrote {len(out.images)} images, grid.png and stats.json to {folder}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
