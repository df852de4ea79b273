"""Continuous-token benchmark on the bundled MAR-style models: draft-verify (lossless) side by side with AR.

For each method, in one process, on the same class labels and per-image seeds: target forwards, step
compression (tokens / target forward), mean accepted length, the measured acceptance rate of drafts, draft
forwards, wall-clock median and its ratio to AR, class adherence (the zoo classifier's background-colour accuracy
against the requested class, on images upsampled from 32x32 to the classifier's 64x64) and the Frechet distance of
classifier features to real one-object scenes put through the same resize (the FID analogue; with few images
it is biased upwards, so compare rows, not absolute values). Writes ``continuous.json`` and ``continuous.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from .common import add_ratios, environment, markdown_table, write_report

__all__ = ["main", "METHODS", "run"]

#: name -> pipeline keyword arguments (``draft_model`` is filled in with the zoo draft)
METHODS = {
    "AR": dict(decoding="ar"),
    "draft-verify w2": dict(decoding="draft", window=2),
    "draft-verify w4": dict(decoding="draft", window=4),
    "draft-verify w4, no alignment": dict(decoding="draft", window=4, align=False),
    "self-draft (draft = target) w4": dict(decoding="draft", window=4, self_draft=True),
}


def to_classifier(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, h, w] in [0, 1] -> [B, 3, 64, 64] in [-1, 1] (bilinear), the classifier's input."""
    return F.interpolate(images.float() * 2 - 1, size=(64, 64), mode="bilinear", align_corners=False).clamp(-1, 1)


def run(pipe, draft, labels, methods, repeats=1, guidance=3.0, steps=25, temperature=1.0, seed=0, clf=None,
        real_feats=None):
    from ..zoo import hub

    rows = []
    for name in methods:
        kw = dict(METHODS[name])
        if kw.pop("self_draft", False):
            kw["draft_model"] = pipe.model
        elif kw["decoding"] == "draft":
            kw["draft_model"] = draft
        times, out = [], None
        for _ in range(repeats):
            gens = [torch.Generator().manual_seed(seed + i) for i in range(len(labels))]
            out = pipe(class_labels=labels, guidance_scale=guidance, generator=gens, num_inference_steps=steps,
                       temperature=temperature, output_type="pt", **kw)
            times.append(out.stats.wall_time)
        st = out.stats
        row = {"method": name, "lossless": out.lossless, "target_forwards": st.target_forwards,
               "draft_forwards": st.draft_forwards, "step_compression": st.step_compression,
               "mean_accepted": st.mean_accepted, "acceptance_rate": out.acceptance_rate,
               "median_s": statistics.median(times), "times": times, "accepted_histogram": st.accepted_histogram}
        if clf is not None:
            images = to_classifier(out.images)
            pred = hub.classify(clf, images)["background_colour"]
            row["adherence"] = 100 * float((pred == labels).float().mean())
            if real_feats is not None:
                row["frechet"] = hub.frechet_distance(hub.features(clf, images), real_feats)
        rows.append(row)
    return add_ratios(rows)


COLUMNS = [
    ("method", "method", ""), ("lossless", "lossless", ""), ("target_forwards", "target fwd", ""),
    ("draft_forwards", "draft fwd", ""), ("step_compression", "step compr.", ".2f"),
    ("mean_accepted", "mean acc.", ".2f"), ("acceptance_rate", "draft acc. rate", ".3f"),
    ("median_s", "median s", ".2f"), ("speedup_vs_ar", "speedup vs AR", ".2f"),
    ("adherence", "adherence %", ".1f"), ("frechet", "Frechet", ".2f"),
]


def main(argv=None):
    p = argparse.ArgumentParser(prog="mmspec bench continuous", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=18, help="images to generate (class labels cycle over the 9 colours)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per method (medians reported)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25, help="DDPM inference steps of the heads")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"subset of: {list(METHODS)}")
    p.add_argument("--real", type=int, default=256, help="real scenes for the Frechet reference set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="outputs/bench", help="folder for continuous.json and continuous.md")
    p.add_argument("--tiny", action="store_true", help="a smoke run: 2 images, 6 steps, AR and draft-verify w4")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..pipelines.continuous import SpeculativeContinuousPipeline
    from ..zoo import hub
    from ..zoo.recipes.common import HELDOUT_SCENE_SEED
    from ..zoo.recipes.mar import NUM_CLASSES, scene_batch

    pipe, draft = SpeculativeContinuousPipeline.from_zoo()
    pipe.set_progress_bar_config(disable=True)
    n = 2 if args.tiny else args.images
    steps = 6 if args.tiny else args.steps
    methods = ["AR", "draft-verify w4"] if args.tiny else args.methods
    labels = torch.arange(n) % NUM_CLASSES
    try:
        clf = hub.load_classifier()
    except FileNotFoundError as err:
        print(f"no evaluation classifier ({err}); adherence and Frechet columns are left empty")
        clf = real_feats = None
    else:
        real, _ = scene_batch(0, 16 if args.tiny else args.real, HELDOUT_SCENE_SEED + 9)
        real_feats = hub.features(clf, to_classifier((real + 1) / 2))
    rows = run(pipe, draft, labels, methods, args.repeats, args.guidance, steps, args.temperature, args.seed, clf,
               real_feats)
    cmd = "mmspec bench continuous " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"# mmspec bench continuous (bundled MAR-style zoo models)\n\n`{cmd}`\n\n"
          f"{n} images (class = background colour, cycling), one seed per image, guidance {args.guidance}, "
          f"{steps} DDPM steps, temperature {args.temperature}; medians of {args.repeats} run(s).\n\n"
          f"{markdown_table(rows, COLUMNS)}\n\n"
          "step compression = tokens / target forwards (prefill included; AR = 1); draft acc. rate = accepted / "
          "proposed drafts; every row is lossless (exact Gaussian acceptance, reflection residual); adherence = "
          "classifier background-colour accuracy against the class; Frechet = classifier-feature distance to "
          "real scenes (few samples: biased upwards, compare rows).\n\n"
          f"Environment: {environment()}\n")
    payload = {"args": vars(args), "env": environment(), "labels": labels.tolist(), "rows": rows}
    js, mdp = write_report(args.out, "continuous", payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return rows


if __name__ == "__main__":
    main()
