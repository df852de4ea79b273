"""Caption benchmark: mmspec lookup / Jacobi / draft vs plain AR and transformers' generate on a VLM.

Runs the zoo captioner (a tiny LLaVA trained on the procedural scenes, ``mmspec.zoo.recipes.captioner``) and
its draft (a smaller LLaVA sharing the processor, so it sees the images too) on held-out scenes, in one
process. Every method starts from the same processor outputs; each time is the median of ``--repeats``
round-robin runs. Reported per row: target forwards, step compression (caption tokens per target forward a
row took part in), median seconds, speed vs mmspec AR and vs transformers' greedy generate, and whether
the captions equal AR's. transformers' assisted generation and prompt lookup run at batch size 1 only (their
limit). ``--models random`` uses untrained weights of the same shapes (overhead only).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from .. import generate
from ..pipelines.caption import merge_stats
from .common import environment, markdown_table, timed, write_report

__all__ = ["main", "run", "load_models"]


def load_models(kind: str = "zoo"):
    """(target, draft, processor, prompt): the bundled captioner pair, or random weights of the same shapes."""
    from ..zoo.recipes import captioner

    if kind == "zoo":
        pipe = captioner.load_caption_pipeline(with_draft=True)
        return pipe.model, pipe.draft_model, pipe.processor, pipe.prompt
    torch.manual_seed(0)
    processor = captioner.build_processor()
    target = captioner.build_model(captioner.PRESETS["target"], processor).eval()
    draft = captioner.build_model(captioner.PRESETS["draft"], processor).eval()
    return target, draft, processor, captioner.PROMPT


def _new_tokens(sequences: torch.Tensor, prompt_len: int, eos_id: int) -> list:
    """Caption ids per row (up to and including EOS) from [B, T + new] sequences."""
    rows = []
    for row in sequences[:, prompt_len:].cpu().tolist():
        rows.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return rows


def run(target, draft, batches: list, eos_id: int, pad_id: int, max_new_tokens: int = 32, repeats: int = 3,
        window_lookup: int = 6, window_jacobi: int = 6, window_draft: int = 5) -> list:
    """Time every method over ``batches`` (processor outputs, one dict per batch); returns result rows."""
    B = batches[0]["input_ids"].shape[0]
    common = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
    hf = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)

    def mm(**kw):
        def fn():
            seqs, stats = [], []
            for inputs in batches:
                rest = dict(inputs)
                ids, mask = rest.pop("input_ids"), rest.pop("attention_mask")
                out = generate(target, ids, attention_mask=mask, **kw, **common, **rest)
                seqs += _new_tokens(out.sequences, ids.shape[1], eos_id)
                stats.append(out.stats)
            return seqs, merge_stats(stats)
        return fn

    def tf(**kw):
        def fn():
            seqs = []
            for inputs in batches:
                out = target.generate(**inputs, **kw, **hf)
                seqs += _new_tokens(out, inputs["input_ids"].shape[1], eos_id)
            return seqs, None
        return fn

    cases = [
        ("mmspec ar", "mmspec", mm(method="ar")),
        ("transformers generate", "peer", tf()),
        ("mmspec lookup", "mmspec", mm(method="lookup", window=window_lookup)),
        ("mmspec jacobi", "mmspec", mm(method="jacobi", window=window_jacobi)),
        ("mmspec draft", "mmspec", mm(method="draft", draft_model=draft, window=window_draft)),
    ]
    if B == 1:
        cases += [
            ("transformers assisted", "peer", tf(assistant_model=draft, num_assistant_tokens=window_draft - 1,
                                                 num_assistant_tokens_schedule="constant",
                                                 assistant_confidence_threshold=0.0)),
            ("transformers prompt lookup", "peer", tf(prompt_lookup_num_tokens=window_lookup - 1)),
        ]
    usable = []
    for name, kind, fn in cases:  # warm-up; a peer that does not support this VLM is reported, not fatal
        try:
            fn()
            usable.append((name, kind, fn))
        except Exception as err:  # noqa: BLE001 - report any failure of a peer implementation
            if kind == "mmspec":
                raise
            print(f"skipping {name}: {type(err).__name__}: {err}", file=sys.stderr)
    times = {name: [] for name, _, _ in usable}
    results = {}
    for _ in range(repeats):
        for name, _, fn in usable:
            results[name], t = timed(fn)
            times[name].append(t)
    reference = results["mmspec ar"][0]
    rows = []
    for name, kind, _ in usable:
        seqs, stats = results[name]
        row = {"method": name, "kind": kind, "batch": B, "images": len(reference),
               "median_s": statistics.median(times[name]), "times": times[name], "same_as_ar": seqs == reference,
               "caption_tokens": sum(len(s) for s in seqs)}
        if stats is not None:
            row.update(target_forwards=stats.target_forwards, draft_forwards=stats.draft_forwards,
                       step_compression=stats.step_compression, mean_accepted=stats.mean_accepted)
        rows.append(row)
    by = {r["method"]: r["median_s"] for r in rows}
    for r in rows:
        r["vs_ar"] = by["mmspec ar"] / r["median_s"]
        r["vs_transformers"] = by["transformers generate"] / r["median_s"] if "transformers generate" in by else None
    return rows


COLUMNS = [
    ("method", "method", ""), ("batch", "B", ""), ("same_as_ar", "= AR captions", ""),
    ("target_forwards", "target fwd", ""), ("draft_forwards", "draft fwd", ""),
    ("step_compression", "step compr.", ".2f"), ("median_s", "median s", ".3f"),
    ("vs_ar", "speed vs mmspec AR", ".2f"), ("vs_transformers", "speed vs transformers generate", ".2f"),
]


def main(argv=None):
    p = argparse.ArgumentParser(prog="mmspec bench caption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", choices=["zoo", "random"], default="zoo",
                   help="zoo: the bundled captioner and its draft; random: untrained weights (overhead only)")
    p.add_argument("--images", type=int, default=16, help="held-out scenes to caption")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to run")
    p.add_argument("--new", type=int, default=32, help="max new tokens per caption")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="outputs/bench", help="folder for caption.json and caption.md")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.images, args.new, args.repeats, args.batch = 2, 8, 1, [1, 2]
    from ..pipelines.caption import CaptionPipeline
    from ..zoo.data import make_scene, scene_seed
    from ..zoo.recipes.common import HELDOUT_SCENE_SEED

    target, draft, processor, prompt = load_models(args.models)
    pipe = CaptionPipeline(target, processor, prompt=prompt)
    images = [make_scene(scene_seed(HELDOUT_SCENE_SEED, 50_000 + i)).image for i in range(args.images)]
    tok = processor.tokenizer
    rows = []
    for b in args.batch:
        batches = [pipe.prepare_inputs(_pil(images[i : i + b]), prompt)
                   for i in range(0, len(images), b)]
        rows += run(target, draft, batches, tok.eos_token_id, tok.pad_token_id, max_new_tokens=args.new,
                    repeats=args.repeats)
    md = (f"# mmspec bench caption ({args.models} weights)\n\n`mmspec bench caption {' '.join(argv or sys.argv[1:])}`"
          f"\n\n{args.images} held-out scenes, prompt {prompt!r}, up to {args.new} new tokens, median of "
          f"{args.repeats}.\n\n{markdown_table(rows, COLUMNS)}\n\nEnvironment: {environment()}\n")
    js, mdp = write_report(args.out, "caption", {"args": vars(args), "env": environment(), "rows": rows}, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return rows


def _pil(images):
    from ..pipelines.caption import load_image

    return [load_image(im) for im in images]


if __name__ == "__main__":
    main()
