"""Image benchmark on the bundled text-to-image models: every decoding method side by side with plain AR.

For each method, in one process, on the same held-out scene captions and seeds: target forwards, step
compression, mean accepted length, wall-clock ratio to AR (medians of repeats), prompt adherence (the zoo
classifier's accuracy against the prompt's labels, the GenEval analogue), Frechet distance of classifier
features to real scenes (the FID analogue), and the target's mean per-token entropy on the generated tokens.
Writes ``image.json``, ``image.md`` and plots (step compression vs adherence; accepted-length histograms).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from .common import environment, markdown_table, write_report

__all__ = ["main", "METHODS", "token_entropy"]

#: name -> pipeline keyword arguments (``draft_model`` is filled in with the zoo draft)
METHODS = {
    "AR": dict(decoding="ar"),
    "SJD (random init, w16)": dict(decoding="jacobi", window=16, init="random"),
    "SJD vertical init": dict(decoding="jacobi", window=16, init="vertical"),
    "SJD coupled (vertical, w16)": dict(decoding="jacobi", window=16, init="vertical", coupled=True),
    "SJD coupled (vertical, w32)": dict(decoding="jacobi", window=32, init="vertical", coupled=True),
    "GSD (G=10)": dict(decoding="jacobi", window=16, init="random", acceptance=("gsd", dict(group_size=10, delta_p=0.2))),
    "LANTERN (draft, k=50, delta=0.2)": dict(decoding="draft", window=6, acceptance=("lantern", dict(k=50, delta=0.2))),
    "draft-verify exact": dict(decoding="draft", window=6),
    # token trees (SJD-PAC): `window` counts every node, so a tree's chain is shorter than the window
    "SJD coupled (horizontal, w16)": dict(decoding="jacobi", window=16, init="horizontal", coupled=True),
    "coupled + tree(2,3) (horizontal, w32)": dict(decoding="jacobi", window=32, init="horizontal", coupled=True,
                                                   tree=(2, 3)),
    "coupled + tree(3,2) (horizontal, w32)": dict(decoding="jacobi", window=32, init="horizontal", coupled=True,
                                                   tree=(3, 2)),
    "coupled + tree(4,2) (horizontal, w64)": dict(decoding="jacobi", window=64, init="horizontal", coupled=True,
                                                   tree=(4, 2)),
    "draft tree(3,2) (w20)": dict(decoding="draft", window=20, tree=(3, 2)),
}


@torch.no_grad()
def token_entropy(pipe, prompts, tokens, guidance_scale: float, temperature: float = 1.0) -> float:
    """Mean entropy (nats) of the target's guided distributions along the generated tokens [B, h*w]."""
    from ..models.families import family_for
    from ..models.image_tokens import GuidedLM

    family = family_for(pipe.model, tokenizer=pipe.tokenizer, vq=pipe.vq)
    layout = family.layout()
    inputs = family.prefill_inputs(prompts)
    target = GuidedLM(pipe.model, layout, guidance_scale, adapter=family.adapter)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    first = target.prefill(ids, mask, **inputs)
    span = tokens + layout.image_token_offset  # no EOL in the zoo layout; EOI is not scored
    rest = target.forward(span[:, :-1], torch.ones(span.shape[0], span.shape[1] - 1, dtype=torch.bool))
    logits = torch.cat([first.unsqueeze(1), rest], dim=1).float() / temperature
    logp = logits.log_softmax(-1)
    return float(-(logp.exp() * logp.nan_to_num(0.0)).sum(-1).mean())


def _criterion(spec):
    from ..acceptance import get

    if isinstance(spec, tuple):
        return get(spec[0], **spec[1])
    return spec


def _concat(outs):
    """One output for several sequential pipeline calls: images/tokens stacked, stats summed (forwards of
    sequential batches add up; target_forwards is then the total over batches)."""
    from dataclasses import replace

    if len(outs) == 1:
        return outs[0]
    s = [o.stats for o in outs]
    width = max(len(x.accepted_histogram) for x in s)
    hist = [sum(x.accepted_histogram[k] if k < len(x.accepted_histogram) else 0 for x in s) for k in range(width)]
    stats = replace(s[0], target_forwards=sum(x.target_forwards for x in s), draft_forwards=sum(x.draft_forwards for x in s),
                    new_tokens=sum(x.new_tokens for x in s), new_tokens_per_row=sum((x.new_tokens_per_row for x in s), []),
                    row_forwards=sum((x.row_forwards for x in s), []), accepted_histogram=hist,
                    tree_nodes=sum(x.tree_nodes for x in s), wall_time=sum(x.wall_time for x in s))
    return replace(outs[0], images=torch.cat([o.images for o in outs]), tokens=torch.cat([o.tokens for o in outs]),
                   stats=stats)


def run(pipe, draft, prompts, methods, repeats=1, guidance=3.0, seed=0, clf=None, real_feats=None, batch_size=None):
    from ..zoo import hub
    from ..zoo.data import caption_labels

    labels = [caption_labels(p) for p in prompts]
    positions = torch.tensor([lab["position"] for lab in labels])
    rows = []
    for name in methods:
        kw = dict(METHODS[name])
        if kw.get("decoding") == "draft":
            kw["draft_model"] = draft
        if "acceptance" in kw:
            kw["acceptance"] = _criterion(kw["acceptance"])
        times, stats = [], None
        bs = batch_size or len(prompts)
        for _ in range(repeats):
            outs = [pipe(prompts[i : i + bs], guidance_scale=guidance, output_type="pt", **kw,
                         generator=[torch.Generator().manual_seed(seed + j) for j in range(i, min(i + bs, len(prompts)))])
                    for i in range(0, len(prompts), bs)]
            out = _concat(outs)
            times.append(out.stats.wall_time)
            stats = out.stats
        row = {"method": name, "lossless": out.lossless, "target_forwards": stats.target_forwards,
               "step_compression": stats.step_compression, "mean_accepted": stats.mean_accepted,
               "tree_nodes": stats.tree_nodes_per_step, "median_s": statistics.median(times), "times": times,
               "accepted_histogram": stats.accepted_histogram,
               "entropy": token_entropy(pipe, prompts, out.tokens, guidance)}
        if clf is not None:
            images = out.images * 2 - 1
            pred = hub.classify(clf, images, positions=positions)
            per_head = {k: float((pred[k] == torch.tensor([lab[k] for lab in labels])).float().mean())
                        for k in pred if k in labels[0]}
            row["adherence"] = 100 * statistics.mean(per_head.values())
            row["adherence_heads"] = per_head
            if real_feats is not None:
                row["frechet"] = hub.frechet_distance(hub.features(clf, images), real_feats)
        rows.append(row)
    ar = next((r for r in rows if r["method"] == "AR"), None)
    sjd = next((r for r in rows if r["method"].startswith("SJD (random")), None)
    for r in rows:
        if ar:
            r["speedup_vs_ar"] = ar["median_s"] / r["median_s"]
        if sjd:
            r["compression_vs_sjd"] = r["step_compression"] / sjd["step_compression"]
    return rows


COLUMNS = [
    ("method", "method", ""), ("lossless", "lossless", ""), ("target_forwards", "target fwd", ""),
    ("step_compression", "step compr.", ".2f"), ("compression_vs_sjd", "vs SJD", ".2f"),
    ("mean_accepted", "mean acc.", ".2f"), ("tree_nodes", "tree nodes/step", ".1f"), ("median_s", "median s", ".2f"),
    ("speedup_vs_ar", "speedup vs AR", ".2f"),
    ("adherence", "adherence %", ".1f"), ("frechet", "Frechet", ".2f"), ("entropy", "entropy (nats)", ".2f"),
]


def plots(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    out = Path(out_dir)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        if "adherence" in r:
            ax[0].scatter(r["step_compression"], r["adherence"], marker="o" if r["lossless"] else "x", s=60)
            ax[0].annotate(r["method"], (r["step_compression"], r["adherence"]), fontsize=7)
    ax[0].set_xlabel("step compression (tokens / target forward)")
    ax[0].set_ylabel("prompt adherence (%)")
    ax[0].set_title("speed vs quality (o lossless, x lossy)")
    for r in rows:
        if r["method"] != "AR":
            h = r["accepted_histogram"]
            total = sum(h) or 1
            ax[1].plot(range(len(h)), [c / total for c in h], label=r["method"], marker=".")
    ax[1].set_xlabel("drafts accepted per step")
    ax[1].set_ylabel("fraction of row-steps")
    ax[1].set_yscale("log")
    ax[1].legend(fontsize=7)
    ax[1].set_title("accepted-length histogram")
    fig.tight_layout()
    path = out / "image.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="mmspec bench image", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16, help="held-out scene captions to generate (one image each)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per method (medians reported)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"subset of: {list(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per pipeline call (default: all at once); 1 measures single-image latency")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="outputs/bench", help="folder for image.json, image.md, image.png")
    p.add_argument("--tiny", action="store_true", help="a smoke run: 2 prompts, AR and SJD only, no plots")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..zoo import hub
    from ..zoo.data import make_scene, scene_seed
    from ..zoo.models import load_image_pipeline
    from ..zoo.recipes.common import HELDOUT_SCENE_SEED, scene_batch

    pipe, draft = load_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    n = 2 if args.tiny else args.prompts
    methods = ["AR", "SJD (random init, w16)"] if args.tiny else args.methods
    prompts = [make_scene(scene_seed(HELDOUT_SCENE_SEED + 7, i)).caption for i in range(n)]
    try:
        clf = hub.load_classifier()
    except FileNotFoundError as err:  # quality columns need the evaluation classifier
        print(f"no evaluation classifier ({err}); adherence and Frechet columns are left empty")
        clf = real_feats = None
    else:
        real, _ = scene_batch(0, max(n, 64), HELDOUT_SCENE_SEED + 8, 2)
        real_feats = hub.features(clf, real)
    rows = run(pipe, draft, prompts, methods, args.repeats, args.guidance, args.seed, clf, real_feats,
               args.batch_size)
    cmd = "mmspec bench image " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"# mmspec bench image (bundled text-to-image zoo models)\n\n`{cmd}`\n\n"
          f"{n} held-out captions, one image each, batch {args.batch_size or n}, guidance {args.guidance}, seeds per image; "
          f"medians of {args.repeats} run(s).\n\n{markdown_table(rows, COLUMNS)}\n\n"
          "step compression = tokens / target forwards; vs SJD = its ratio to SJD as published on the same model; "
          "adherence = mean classifier accuracy over shape, colour, size, position, background, background colour "
          "against the prompt; Frechet = distance of classifier features to real scenes (lower is better); "
          f"entropy = target's mean per-token entropy along the generated tokens.\n\nEnvironment: {environment()}\n")
    payload = {"args": vars(args), "env": environment(), "prompts": prompts, "rows": rows}
    js, mdp = write_report(args.out, "image", payload, md)
    if not args.tiny:
        print(f"plot: {plots(rows, args.out)}")
    print(md)
    print(f"wrote {js} and {mdp}")
    return rows


if __name__ == "__main__":
    main()
