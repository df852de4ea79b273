"""Image benchmark on the bundled text-to-image models: every decoding method side by side with plain AR.

For each method, in one process, on the same held-out scene captions and seeds: target forwards, step
compression, mean accepted length, wall-clock ratio to AR (medians of repeats), prompt adherence (the zoo
classifier's accuracy against the prompt's labels, the GenEval analogue), Frechet distance of classifier
features to real scenes (the FID analogue), and the target's mean per-token entropy on the generated tokens.
Writes ``image.json``, ``image.md`` and plots (step compression vs adherence; accepted-length histograms).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .common import add_ratios, environment, markdown_table, write_report

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
    "draft tree(4,5) (w20)": dict(decoding="draft", window=20, tree=(4, 5)),
    # the Jacobi tree plus the draft model's chain as one more branch (mmspec.drafting.hybrid), and layer skipping
    "jacobi-draft + tree(3,2) (horizontal, w48)": dict(decoding="jacobi-draft", window=48, init="horizontal",
                                                       coupled=True, tree=(3, 2)),
    "self (layer-skip, calibrated, w6)": dict(decoding="self", window=6),
    "self (layer-skip, skips the last layer, w6)": dict(decoding="self", window=6, skip=[3]),
    "self tree(4,5) (layer-skip, skips the last layer, w20)": dict(decoding="self", window=20, skip=[3], tree=(4, 5)),
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
    dev = pipe.model.device
    inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    first = target.prefill(ids, mask, **inputs)
    span = tokens.to(dev) + layout.image_token_offset  # no EOL in the zoo layout; EOI is not scored
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


def uses_draft(spec: dict) -> bool:
    """Whether a method's pipeline kwargs decode with the draft model."""
    return spec.get("decoding") in ("draft", "jacobi-draft")


def run(pipe, draft, prompts, methods, repeats=1, guidance=3.0, seed=0, clf=None, real_feats=None, batch_size=None,
        bootstrap=0, progress=True):
    """One row per method: ``methods`` is a list of names of :data:`METHODS` or a dict name -> pipeline kwargs.
    ``bootstrap > 0`` adds 95% bootstrap intervals (that many resamples of the images) of adherence and Frechet.
    ``progress``: a bar over the images generated (all methods and repeats), on stderr."""
    from ..zoo import hub
    from ..zoo.data import caption_labels

    labels = [caption_labels(p) for p in prompts]
    positions = torch.tensor([lab["position"] for lab in labels])
    specs = methods if isinstance(methods, dict) else {name: METHODS[name] for name in methods}
    bs = batch_size or len(prompts)
    bar = tqdm(total=len(specs) * repeats * len(prompts), unit="image", desc="bench image", disable=not progress)
    rows = []
    for name, spec in specs.items():
        bar.set_postfix_str(name)
        kw = dict(spec)
        if uses_draft(kw):
            kw["draft_model"] = draft
        if "acceptance" in kw:
            kw["acceptance"] = _criterion(kw["acceptance"])
        times, stats = [], None
        for _ in range(repeats):
            outs = []
            for i in range(0, len(prompts), bs):
                outs.append(pipe(prompts[i : i + bs], guidance_scale=guidance, output_type="pt", **kw,
                                 generator=[torch.Generator().manual_seed(seed + j)
                                            for j in range(i, min(i + bs, len(prompts)))]))
                bar.update(min(bs, len(prompts) - i))
            out = _concat(outs)
            times.append(out.stats.wall_time)
            stats = out.stats
        row = {"method": name, "lossless": out.lossless, "target_forwards": stats.target_forwards,
               "step_compression": stats.step_compression, "mean_accepted": stats.mean_accepted,
               "tree_nodes": stats.tree_nodes_per_step, "median_s": statistics.median(times), "times": times,
               "accepted_histogram": stats.accepted_histogram, "window": kw.get("window", 1),
               "draft_forwards": stats.draft_forwards,
               "entropy": token_entropy(pipe, prompts, out.tokens, guidance), "device": _where(pipe.model.device)}
        if clf is not None:
            images = out.images.float().cpu() * 2 - 1  # the classifier scores on the CPU
            pred = hub.classify(clf, images, positions=positions)
            heads = [k for k in pred if k in labels[0]]
            correct = torch.stack([(pred[k] == torch.tensor([lab[k] for lab in labels])).float() for k in heads], 1)
            row["adherence"] = 100 * float(correct.mean())
            row["adherence_heads"] = dict(zip(heads, correct.mean(0).tolist()))
            per_image = correct.mean(1)  # [N] fraction of the caption's heads the image satisfies
            feats = hub.features(clf, images) if real_feats is not None else None
            if feats is not None:
                row["frechet"] = hub.frechet_distance(feats, real_feats)
            if bootstrap:
                row["adherence_ci"] = [100 * v for v in bootstrap_mean_ci(per_image, bootstrap, seed)]
                if feats is not None:
                    row["frechet_ci"] = bootstrap_frechet_ci(feats, real_feats, bootstrap, seed)
                row["_per_image"] = per_image
        rows.append(row)
    bar.close()
    return add_ratios(rows)


def bootstrap_mean_ci(values: torch.Tensor, reps: int, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values [N]`` (``reps`` resamples of N with replacement)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.shape[0], (reps, values.shape[0]), generator=g)
    means = values.double()[idx].mean(1)
    a = (1 - level) / 2
    return [float(means.quantile(a)), float(means.quantile(1 - a))]


def bootstrap_frechet_ci(feats: torch.Tensor, real: torch.Tensor, reps: int, seed: int = 0,
                         level: float = 0.95) -> list[float]:
    """Bias-corrected bootstrap interval of the Frechet distance of generated features ``feats [N, D]`` (resampled
    with replacement, ``min(reps, 200)`` times: each needs a matrix square root) to the fixed ``real [M, D]``.

    The distance is biased upward on fewer distinct samples and a resample holds only ~63% distinct images, so the
    plain percentile interval lies above the estimate; the resamples' quantiles are shifted down by their mean's
    excess over the full-set estimate (the bootstrap's bias estimate), floored at 0."""
    from ..zoo import hub

    g = torch.Generator().manual_seed(seed + 1)
    vals = torch.tensor([hub.frechet_distance(feats[torch.randint(0, feats.shape[0], (feats.shape[0],), generator=g)], real)
                         for _ in range(min(reps, 200))], dtype=torch.float64)
    bias = float(vals.mean()) - float(hub.frechet_distance(feats, real))
    a = (1 - level) / 2
    return [max(0.0, float(vals.quantile(a)) - bias), max(0.0, float(vals.quantile(1 - a)) - bias)]


def sweep_methods(codebook: torch.Tensor, tiny: bool = False) -> dict[str, dict]:
    """The sweep's points, name -> pipeline kwargs: the lossless references (AR, SJD, draft-verify, the token tree
    of Jacobi proposals with the draft's chain as a branch), LANTERN
    (additive ``delta`` 0.05-0.4 and multiplicative ``lam`` 2-20, draft proposals, k=50 neighbours), GSD (group
    sizes 3/10/25 without a distance bound, then ``d_max`` at size 10 as quantiles of the squared distances between
    codebook vectors ``codebook [N, D]``; Jacobi proposals as in the paper) and typical acceptance (draft
    proposals)."""
    d = torch.cdist(codebook.float(), codebook.float()).pow(2)
    off = d[~torch.eye(d.shape[0], dtype=torch.bool)]
    q = {f"q{int(100 * f)}": float(off.quantile(f)) for f in (0.05, 0.25)}
    pts = {
        "AR": dict(decoding="ar"),
        "SJD (random init, w16)": dict(decoding="jacobi", window=16, init="random"),
        "draft-verify exact": dict(decoding="draft", window=6),
        # the best lossless method (BENCHMARKS.md, token trees): Jacobi tree with the draft's chain as a branch
        "token tree (Jacobi + draft, 3x2, w48)": dict(decoding="jacobi-draft", window=48, init="horizontal",
                                                      coupled=True, tree=(3, 2)),
    }
    deltas, lams, groups, dmaxes, typ = (0.05, 0.1, 0.2, 0.4), (2.0, 5.0, 10.0, 20.0), (3, 10, 25), \
        [("inf", math.inf)] + list(q.items()), (0.09, 0.3)
    if tiny:
        deltas, lams, groups, dmaxes, typ = (0.2,), (5.0,), (10,), [("inf", math.inf)], (0.09,)
    for dl in deltas:
        pts[f"LANTERN delta={dl:g}"] = dict(decoding="draft", window=6, acceptance=("lantern", dict(k=50, delta=dl)))
    for lam in lams:
        pts[f"LANTERN++ lam={lam:g}"] = dict(decoding="draft", window=6, acceptance=("lantern", dict(k=50, lam=lam)))
    # GSD: the group size without a distance bound, then the bound at the middle group size (a cross, not the full
    # grid: a Jacobi point of 256 images costs about half an hour on one CPU core)
    gsd = [(g, dmaxes[0]) for g in groups] + [(groups[len(groups) // 2], d) for d in dmaxes[1:]]
    for g, (tag, dm) in gsd:
        pts[f"GSD G={g} d_max={tag}"] = dict(decoding="jacobi", window=16, init="random",
                                            acceptance=("gsd", dict(group_size=g, delta_p=0.2, d_max=dm)))
    for eps in typ:
        pts[f"typical eps={eps:g}"] = dict(decoding="draft", window=6, acceptance=("typical", dict(epsilon=eps)))
    return pts


def sanity(rows, reps: int, seed: int = 0) -> list[str]:
    """The sweep's sanity rule: every lossless method's adherence must agree with AR's, i.e. the 95% bootstrap
    interval of (method - AR) must contain 0 (if not, the metric or the method is broken). One line per method."""
    ar = next(r for r in rows if r["method"] == "AR")
    g = torch.Generator().manual_seed(seed + 2)
    lines = []
    for r in rows:
        if not r["lossless"] or r is ar:
            continue
        a, b = r["_per_image"].double(), ar["_per_image"].double()
        ia = torch.randint(0, a.shape[0], (reps, a.shape[0]), generator=g)
        ib = torch.randint(0, b.shape[0], (reps, b.shape[0]), generator=g)
        diff = 100 * (a[ia].mean(1) - b[ib].mean(1))
        lo, hi = float(diff.quantile(0.025)), float(diff.quantile(0.975))
        ok = lo <= 0.0 <= hi
        r["sanity_vs_ar"] = "pass" if ok else "FAIL"
        lines.append(f"{'PASS' if ok else 'FAIL'}: {r['method']} adherence {r['adherence']:.1f}% vs AR "
                     f"{ar['adherence']:.1f}% (difference 95% interval [{lo:+.1f}, {hi:+.1f}] points)")
    return lines


def paired_delta(rows, reps: int, seed: int = 0) -> None:
    """Each row's adherence minus AR's with a paired 95% bootstrap interval (points): the images of one caption
    are resampled together (every method draws one image per caption with the same seed), which removes the
    captions' own difficulty from the interval. Sets ``delta_vs_ar``, ``delta_vs_ar_ci``, ``p_vs_ar`` (two-sided,
    from the bootstrap's normal approximation), ``p_holm`` (Holm-adjusted over every row compared, so the family
    of comparisons, not each one, keeps the 5% error rate) and ``delta_text``, marked ``*`` where ``p_holm < 0.05``:
    the quality cost of a relaxed criterion."""
    ar = next(r for r in rows if r["method"] == "AR")
    b = torch.as_tensor(ar["_per_image"]).double()
    idx = torch.randint(0, b.shape[0], (reps, b.shape[0]), generator=torch.Generator().manual_seed(seed + 3))
    compared = []
    for r in rows:
        a = torch.as_tensor(r["_per_image"]).double()
        if r is ar or a.shape != b.shape:
            continue
        r["delta_vs_ar"], r["delta_vs_ar_ci"], r["p_vs_ar"] = paired_bootstrap(100 * (a - b), idx)
        compared.append(r)
    for r, p in zip(compared, holm([r["p_vs_ar"] for r in compared])):
        r["p_holm"] = p
        r["delta_text"] = f"{r['delta_vs_ar']:+.1f} [{r['delta_vs_ar_ci'][0]:+.1f}, {r['delta_vs_ar_ci'][1]:+.1f}]" + (
            " *" if p < 0.05 else "")


def paired_bootstrap(diff: torch.Tensor, idx: torch.Tensor) -> tuple[float, list[float], float]:
    """The mean of paired differences ``diff [N]`` (one per caption) with its 95% percentile bootstrap interval over
    the resamples ``idx [reps, N]`` (indices into the captions) and a two-sided p-value for "no difference" from the
    bootstrap's normal approximation -> ``(mean, [lo, hi], p)``."""
    diff = diff.double()
    return bootstrap_summary(float(diff.mean()), diff[idx].mean(1))


def bootstrap_summary(estimate: float, boot: torch.Tensor) -> tuple[float, list[float], float]:
    """An ``estimate`` with its bootstrap replicates ``boot [reps]`` -> ``(estimate, [lo, hi], p)``: the 95%
    percentile interval and a two-sided p-value for "zero" from the replicates' normal approximation."""
    sd = float(boot.std())
    z = abs(estimate) / sd if sd > 0 else (0.0 if estimate == 0 else math.inf)
    return estimate, [float(boot.quantile(0.025)), float(boot.quantile(0.975))], math.erfc(z / math.sqrt(2))


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment of the p-values ``p`` (same order): the k-th smallest is multiplied by
    ``m - k + 1`` (``m = len(p)``), made non-decreasing along that order and capped at 1."""
    order = sorted(range(len(p)), key=p.__getitem__)
    out, running = [1.0] * len(p), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        out[i] = running
    return out


def sweep_plot(rows, path):
    """Adherence and Frechet distance (with 95% intervals) against step compression, one colour per family."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    fams = {}
    gsd = {r["method"]: re.match(r"GSD G=(\d+) d_max=(\S+)", r["method"]) for r in rows}
    bounded_g = {m[1] for m in gsd.values() if m and m[2] != "inf"}  # the group size the d_max points use
    for r in rows:
        m = gsd[r["method"]]
        if r["lossless"]:
            fams.setdefault("lossless", []).append(r)
        elif m is None:
            fams.setdefault(r["method"].split(" ")[0], []).append(r)
        else:  # the GSD cross as two lines: group size without a bound, d_max at one group size
            if m[2] == "inf":
                fams.setdefault("GSD, group size (no d_max)", []).append(r)
            if m[1] in bounded_g:
                fams.setdefault(f"GSD, d_max at G={m[1]}", []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ar = next((r for r in rows if r["method"] == "AR"), None)
    for ax, key in zip(axes, ("adherence", "frechet")):
        if ar is not None and key in ar:  # AR's interval as a band: a lossless point should sit inside it
            lo, hi = ar.get(f"{key}_ci", [ar[key], ar[key]])
            ax.axhspan(lo, hi, color="tab:blue", alpha=0.08, label="AR 95% interval")
        for fam, rs in fams.items():
            rs = sorted((r for r in rs if key in r), key=lambda r: r["step_compression"])
            if not rs:
                continue
            x = [r["step_compression"] for r in rs]
            y = [r[key] for r in rs]
            ci = [r.get(f"{key}_ci", [v, v]) for r, v in zip(rs, y)]
            # (a resampled set has duplicates, so the Frechet interval can lie above the point estimate)
            err = [[max(v - c[0], 0.0) for v, c in zip(y, ci)], [max(c[1] - v, 0.0) for v, c in zip(y, ci)]]
            ax.errorbar(x, y, yerr=err, fmt="o" if fam == "lossless" else "x-", capsize=3, label=fam)
            for r, xi, yi in zip(rs, x, y):
                if fam.startswith("GSD, d_max") and r["method"].endswith("d_max=inf"):
                    continue  # labelled on the group-size line
                ax.annotate(r["method"].split(" ", 1)[-1] if fam != "lossless" else r["method"], (xi, yi), fontsize=6)
        ax.margins(x=0.12)  # room for the labels of the outermost points
        ax.set_xlabel("step compression (tokens / target forward)")
        ax.set_ylabel("prompt adherence (%)" if key == "adherence" else "Frechet distance (classifier features)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("quality vs speed: adherence (95% bootstrap intervals)")
    axes[1].set_title("Frechet distance to real scenes (lower is better)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    p.add_argument("--prompts", type=int, default=None,
                   help="held-out scene captions to generate, one image each (default 16; 256 with --sweep)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per method (medians reported)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"subset of: {list(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per pipeline call (default: all at once); 1 measures single-image latency")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="where the models run (cuda on a GPU machine); the seeds are "
                   "CPU generators, so a row draws the same random numbers on every device")
    p.add_argument("--out", default="outputs/bench", help="folder for image.json, image.md, image.png")
    p.add_argument("--tiny", action="store_true", help="a smoke run: 2 prompts, AR and SJD only, no plots "
                   "(with --sweep: 4 prompts, one point per family)")
    p.add_argument("--sweep", action="store_true",
                   help="speed/quality curves: LANTERN over delta and lam, GSD over group size and d_max, typical, and "
                        "the lossless methods, with bootstrap intervals; writes image_sweep.{json,md} and a plot")
    p.add_argument("--bootstrap", type=int, default=1000, help="--sweep: bootstrap resamples for the intervals")
    p.add_argument("--plot", default=None, help="--sweep: plot path (default: OUT/image_sweep.png)")
    p.add_argument("--points", nargs="+", default=None, metavar="TEXT",
                   help="--sweep: only the points whose name contains one of these (case-insensitive), and AR")
    args = p.parse_args(argv)
    if args.prompts is None:
        args.prompts = 256 if args.sweep else 16
    if args.prompts < 1:
        p.error("--prompts must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..zoo import hub
    from ..zoo.data import make_scene, scene_seed
    from ..zoo.models import load_image_pipeline
    from ..zoo.recipes.common import HELDOUT_SCENE_SEED, scene_batch

    pipe, draft = load_image_pipeline(device=args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.sweep:
        return _sweep(args, pipe, draft, argv)
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


SWEEP_COLUMNS = [
    ("method", "method", ""), ("lossless", "lossless", ""), ("step_compression", "step compr.", ".2f"),
    ("mean_accepted", "mean acc.", ".2f"), ("speedup_vs_ar", "speedup vs AR", ".2f"),
    ("adherence", "adherence %", ".1f"), ("adherence_ci_text", "95% interval", ""), ("delta_text", "vs AR (paired)", ""),
    ("p_holm", "p (Holm)", ".3f"), ("frechet", "Frechet", ".2f"),
    ("frechet_ci_text", "95% interval", ""), ("entropy", "entropy (nats)", ".2f"), ("sanity_vs_ar", "= AR?", ""),
]


def weights_fingerprint(*models) -> str:
    """A short hash of the models' parameters: a sweep point computed on other weights is not reused."""
    h = hashlib.sha256()
    for m in models:
        for name, t in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", name).strip("_")


def _sweep(args, pipe, draft, argv):
    """The sweep, one point at a time. Each finished point is kept in ``OUT/sweep_points/`` (with the settings and a
    hash of the weights it was measured with) and reused by a later run with the same settings, so a sweep of
    several hours can be stopped and continued; the report and plot are rewritten after every point."""
    from ..zoo import hub
    from ..zoo.data import make_scene, scene_seed
    from ..zoo.recipes.common import HELDOUT_SCENE_SEED, scene_batch

    n = 4 if args.tiny else args.prompts
    methods = sweep_methods(hub.codebook(pipe.vq), tiny=args.tiny)
    if args.points:
        picked = {k: v for k, v in methods.items() if any(s.lower() in k.lower() for s in args.points)}
        if not picked:
            raise SystemExit(f"--points {args.points} matches none of the sweep's points: {list(methods)}")
        methods = {"AR": methods["AR"], **picked}  # AR: the reference of the sanity rule and the speedups
    prompts = [make_scene(scene_seed(HELDOUT_SCENE_SEED + 7, i)).caption for i in range(n)]
    clf = hub.load_classifier()
    real_feats = hub.features(clf, scene_batch(0, max(n, 256), HELDOUT_SCENE_SEED + 8, 2)[0])
    batch = args.batch_size or min(n, 64)
    # a point is reused only on the weights it was measured with: the target, the tokenizer and the classifier that
    # scores it, and the draft only for the points that decode with it (retraining the draft keeps AR, SJD and GSD)
    base = weights_fingerprint(pipe.model, pipe.vq, clf)
    with_draft = weights_fingerprint(pipe.model, pipe.vq, clf, draft)
    key = dict(prompts=n, guidance=args.guidance, seed=args.seed, batch=batch, bootstrap=args.bootstrap)
    store = Path(args.out) / "sweep_points"
    store.mkdir(parents=True, exist_ok=True)
    cmd = "mmspec bench image " + " ".join(argv if argv is not None else sys.argv[1:])
    rows, reused = [], []
    if any(uses_draft(spec) for spec in methods.values()):  # a draft that does not fit fails now, not hours in
        pipe(prompts[:1], guidance_scale=args.guidance, output_type="pt", decoding="draft", window=2, draft_model=draft)
    for i, (name, spec) in enumerate(methods.items()):
        path = store / f"{_slug(name)}.pt"
        saved = torch.load(path, weights_only=False) if path.is_file() else None
        point_key = {**key, "weights": with_draft if uses_draft(spec) else base}
        if saved is not None and saved["key"] == point_key and saved["spec"] == repr(spec):
            rows.append(saved["row"])
            reused.append(name)
        else:
            print(f"[{i + 1}/{len(methods)}] {name}", file=sys.stderr)
            row = run(pipe, draft, prompts, {name: spec}, args.repeats, args.guidance, args.seed, clf, real_feats,
                      batch, bootstrap=args.bootstrap)[0]
            torch.save({"key": point_key, "spec": repr(spec), "row": row}, path)
            rows.append(row)
        _sweep_report(args, rows, cmd, prompts, batch, methods, reused)
    return _sweep_report(args, rows, cmd, prompts, batch, methods, reused, final=True)


def _where(device) -> str:
    """The device a wall-clock figure was measured on, in words."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"this machine's CPU ({torch.get_num_threads()} threads)"


def _sweep_report(args, rows, cmd, prompts, batch, methods, reused, final=False):
    """Write image_sweep.{json,md} and the plot for the points done so far; print them when ``final``."""
    import copy

    rows, n = copy.deepcopy(rows), len(prompts)
    add_ratios(rows)
    checks = sanity(rows, args.bootstrap, args.seed) if any(r["method"] == "AR" for r in rows) else []
    if any(r["method"] == "AR" for r in rows):
        paired_delta(rows, args.bootstrap, args.seed)
    for r in rows:
        r["adherence_ci_text"] = "[{:.1f}, {:.1f}]".format(*r["adherence_ci"])
        r["frechet_ci_text"] = "[{:.2f}, {:.2f}]".format(*r["frechet_ci"])
        r["adherence_per_image"] = r.pop("_per_image").tolist()
    plot = sweep_plot(rows, args.plot or f"{args.out}/image_sweep.png")
    missing = [m for m in methods if m not in {r["method"] for r in rows}]
    where = " and ".join(sorted({r.get("device") or _where(args.device) for r in rows}))
    md = (f"# mmspec bench image --sweep (bundled text-to-image zoo models)\n\n`{cmd}`\n\n"
          f"{n} held-out captions, one image each (seed {args.seed} + i), guidance {args.guidance}, batch "
          f"{batch}; 95% percentile-bootstrap intervals over the images ({args.bootstrap} "
          f"resamples; Frechet: {min(args.bootstrap, 200)}, shifted by the bootstrap's bias estimate). "
          f"Speedups are wall clock on {where}, each point timed "
          f"in its own run (points reused from an earlier run: {len(reused)}).\n\n"
          + (f"**Partial: {len(missing)} of {len(methods)} points still to run** ({', '.join(missing)}).\n\n"
             if missing else "")
          + f"{markdown_table(rows, SWEEP_COLUMNS)}\n\n"
          "Sanity rule (every lossless method's adherence agrees with AR's: the 95% interval of the difference "
          "contains 0):\n\n" + "\n".join(f"- {c}" for c in checks) + "\n\n`vs AR`: adherence minus AR's in points, "
          "paired by caption (the same captions and seeds for every method), with its 95% bootstrap interval; "
          "`p (Holm)`: its two-sided p-value, Holm-adjusted over all the rows compared with AR (a sweep makes many "
          "comparisons: unadjusted, about one in twenty would look significant by chance); `*` where it is below "
          "0.05 (a measured quality change)." + f"\n\nPlot: `{plot}`\n\nEnvironment: {environment()}\n")
    payload = {"args": vars(args), "env": environment(), "prompts": prompts, "rows": rows, "sanity": checks,
               "missing": missing}
    js, mdp = write_report(args.out, "image_sweep", payload, md)
    if final:
        print(md)
        print(f"wrote {js}, {mdp} and {plot}")
    return rows

if __name__ == "__main__":
    main()
