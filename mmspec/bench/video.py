"""Video benchmark on the bundled caption-to-video model: Jacobi inits side by side with plain AR.

For each method, in one process, on the same held-out moving-scene captions and seeds: target forwards, step
compression (tokens per target forward), mean accepted drafts per step, wall-clock ratio to AR (medians of
repeats), how often a generated code repeats the code at the same place in the previous frame (what the
``temporal`` init bets on) and prompt adherence (the lossless methods must match AR's). Writes ``video.json`` and
``video.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from .common import add_ratios, environment, markdown_table, write_report

__all__ = ["main", "METHODS", "run", "repeat_fraction"]

#: name -> pipeline keyword arguments (the window comes from ``--window``)
METHODS = {
    "AR": dict(decoding="ar"),
    "SJD (random init)": dict(decoding="jacobi", init="random"),
    "SJD vertical init": dict(decoding="jacobi", init="vertical"),
    "SJD temporal init": dict(decoding="jacobi", init="temporal"),
    "SJD temporal + coupled": dict(decoding="jacobi", init="temporal", coupled=True),
}


def repeat_fraction(tokens: torch.Tensor) -> float:
    """Fraction of codes in frames 1.. equal to the code at the same place one frame earlier; tokens [B, F, h*w]."""
    return float((tokens[:, 1:] == tokens[:, :-1]).float().mean())


def run(pipe, prompts, methods, window=16, repeats=1, guidance=3.0, seed=0, do_sample=True, temperature=1.0,
        top_k=None, clf=None, targets=None):
    """One row per method: the stats of generating one video per prompt (all prompts in one batch). With the
    evaluation classifier ``clf`` and the prompts' ``targets`` (``mmspec.zoo.recipes.video.caption_targets``), also
    prompt adherence: the share of heads (per video, then averaged) that
    :func:`~mmspec.zoo.recipes.video.read_clips` reads as the prompt asks, from the decoded videos (after timing)."""
    rows = []
    for name in methods:
        kw = dict(METHODS[name])
        if kw["decoding"] != "ar":
            kw["window"] = window
        times, out = [], None
        for _ in range(repeats):
            out = pipe(prompts, guidance_scale=guidance, do_sample=do_sample, temperature=temperature, top_k=top_k,
                       output_type="latent",
                       generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))], **kw)
            times.append(out.stats.wall_time)
        s = out.stats
        extra = {} if clf is None else _adherence(pipe, out.tokens, clf, targets)
        rows.append({**extra, "method": name, "lossless": out.lossless, "target_forwards": s.target_forwards,
                     "new_tokens": s.new_tokens, "step_compression": s.step_compression,
                     "mean_accepted": s.mean_accepted, "median_s": statistics.median(times), "times": times,
                     "repeat_fraction": repeat_fraction(out.tokens), "accepted_histogram": s.accepted_histogram})
    return add_ratios(rows)


def _adherence(pipe, tokens: torch.Tensor, clf, targets: dict[str, torch.Tensor]) -> dict:
    from ..zoo import hub
    from ..zoo.recipes.video import VIDEO_HEADS, read_clips, reader_speed

    layout = pipe.family.layout()
    b, f = tokens.shape[:2]
    frames = hub.decode_tokens(pipe.vq, tokens.flatten(0, 1).cpu(), grid=(layout.height, layout.width))
    pred = read_clips(clf, frames.view(b, f, *frames.shape[1:]), "position" in targets, reader_speed(pipe.model.config))
    heads = {h: float((pred[h] == targets[h]).float().mean()) for h in targets}
    return {"adherence": 100 * sum(heads[h] for h in VIDEO_HEADS) / len(VIDEO_HEADS), "adherence_heads": heads}


COLUMNS = [
    ("method", "method", ""), ("lossless", "lossless", ""), ("target_forwards", "target fwd", ""),
    ("step_compression", "step compr.", ".2f"), ("compression_vs_sjd", "vs SJD", ".2f"),
    ("mean_accepted", "mean acc.", ".2f"), ("median_s", "median s", ".1f"), ("speedup_vs_ar", "wall-clock vs AR", ".2f"),
    ("repeat_fraction", "codes = prev. frame", ".2f"), ("adherence", "adherence %", ".1f"),
]


def main(argv=None):
    p = argparse.ArgumentParser(prog="mmspec bench video", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4, help="held-out one-object moving-scene captions (one video each, one batch)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per method (medians reported)")
    p.add_argument("--window", type=int, default=16, help="Jacobi window (anchor included)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"subset of: {list(METHODS)}")
    p.add_argument("--model", default=None, help="video model folder (default: the bundled one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="outputs/bench", help="folder for video.json and video.md")
    p.add_argument("--tiny", action="store_true", help="a smoke run: 1 prompt, AR and SJD temporal only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..zoo import hub
    from ..zoo.recipes.video import caption_targets, held_out_clips, load_video_pipeline

    pipe = load_video_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    layout = pipe.family.layout()
    n = 1 if args.tiny else args.prompts
    methods = ["AR", "SJD temporal init"] if args.tiny else args.methods
    prompts = [c.caption for c in held_out_clips(pipe.model.config, n)]
    rows = run(pipe, prompts, methods, args.window, args.repeats, args.guidance, args.seed, not args.greedy,
               args.temperature, args.top_k, hub.load_classifier(), caption_targets(prompts))
    cmd = "mmspec bench video " + " ".join(argv if argv is not None else sys.argv[1:])
    mode = "greedy" if args.greedy else f"sampling at temperature {args.temperature}" + (
        f", top-k {args.top_k}" if args.top_k else "")
    md = (f"# mmspec bench video (bundled caption-to-video model)\n\n`{cmd}`\n\n"
          f"{n} held-out captions in one batch, {layout.frames} frames of {layout.height}x{layout.width} codes "
          f"({layout.num_tokens} tokens per video), guidance {args.guidance}, {mode}, window {args.window}, seeds "
          f"per video; medians of {args.repeats} run(s).\n\n{markdown_table(rows, COLUMNS)}\n\n"
          "step compression = tokens / target forwards (per row); vs SJD = its ratio to SJD with random init; "
          "codes = prev. frame = fraction of generated codes in frames 1.. equal to the code at the same place one "
          "frame earlier; adherence = share of the heads shape, colour, size, background, background colour and "
          "direction that the evaluation classifier (frames upsampled to 64x64) and the motion reader "
          "(`mmspec.zoo.recipes.video.read_clips`) find as the caption asks (held-out one-object captions).\n\n"
          f"Environment: {environment()}\n")
    payload = {"args": vars(args), "env": environment(), "prompts": prompts, "rows": rows}
    js, mdp = write_report(args.out, "video", payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return rows


if __name__ == "__main__":
    main()
