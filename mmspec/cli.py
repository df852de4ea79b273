"""The ``mmspec`` command.

    mmspec image "a red circle on a blue background" -o out.png [--compare]   the bundled text-to-image model
    mmspec text "def fibonacci(n):" [--compare]                    the bundled text LM (Python code)
    mmspec bench all [--tiny]                                     every benchmark in turn
    mmspec bench text [--batch 1 4] [--models random|zoo] ...   benchmark text methods against peers
    mmspec bench kernels ...                                      fused verification kernels vs torch
    mmspec bench gpu [--dry-run]                                  one-shot device check (JSON + markdown)
    mmspec bench project --steps BENCH.json --cost FORWARD_COST.json   projected speedups (cost model)

Run ``mmspec <command> --help`` for every flag.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHES = {
    "image": ("mmspec.bench.image", "image methods (SJD variants, GSD, LANTERN, draft) vs AR on the zoo models"),
    "text": ("mmspec.bench.text", "text methods vs plain AR and transformers' assisted generation"),
    "kernels": ("mmspec.bench.kernels", "fused Triton verification vs the torch reference"),
    "caption": ("mmspec.bench.caption", "captioning methods vs AR on the bundled captioner"),
    "continuous": ("mmspec.bench.continuous", "continuous-token (MAR-style) speculative decoding vs AR"),
    "video": ("mmspec.bench.video", "video token methods vs AR on the bundled video model"),
    "gpu": ("mmspec.bench.gpu", "one-shot device check: kernels, verify bandwidth, forward cost vs window, zoo"),
    "project": ("mmspec.bench.project", "cost model: projected speedups from a bench JSON and a forward-cost curve"),
}
#: benchmarks `mmspec bench all` leaves out (device-specific, or needing input files)
NOT_IN_ALL = ("kernels", "gpu", "project")


def _bench_all(argv):
    """Run every benchmark in turn with the given flags understood by all (``--tiny``, ``--out``, ``--threads``)."""
    p = argparse.ArgumentParser(prog="mmspec bench all", description="Run every benchmark in turn: "
                                + ", ".join(k for k in BENCHES if k not in NOT_IN_ALL)
                                + " (not " + ", ".join(NOT_IN_ALL) + ": run those by name).")
    p.add_argument("--tiny", action="store_true", help="smoke settings for every benchmark")
    p.add_argument("--out", default="outputs/bench", help="folder for every benchmark's JSON, markdown and plots")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip", nargs="*", default=[], choices=list(BENCHES), help="benchmarks to leave out")
    args = p.parse_args(argv)
    common = ["--out", args.out] + (["--tiny"] if args.tiny else []) + (
        ["--threads", str(args.threads)] if args.threads else [])
    failed = []
    for name, (module, _) in BENCHES.items():
        if name in NOT_IN_ALL or name in args.skip:
            continue
        print(f"\n=== mmspec bench {name} ===", flush=True)
        try:
            importlib.import_module(module).main(common)
        except Exception as err:  # one broken benchmark does not hide the others' results
            print(f"mmspec bench {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def _bench(argv):
    if argv and argv[0] == "all":
        return _bench_all(argv[1:])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        lines = "\n".join(f"  {k:10s} {doc}" for k, (_, doc) in BENCHES.items())
        lines += f"\n  all        every benchmark above but {', '.join(NOT_IN_ALL)}, in turn"
        msg = f"usage: mmspec bench {{{','.join(BENCHES)},all}} [options]\n\nbenchmarks:\n{lines}\n"
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"mmspec bench: unknown benchmark {argv[0]!r}\n" + msg)
            return 2
        sys.stdout.write(msg)
        return 0
    module = importlib.import_module(BENCHES[argv[0]][0])
    module.main(argv[1:])
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with every default shown and the description/epilog kept as written."""


THREADS_HELP = ("torch CPU threads (default: the cores free now, from the load average, at most 4; torch's own "
                "default of one per core oversubscribes a shared machine and can make a run 20-40x slower)")


def _zoo_words() -> list[str]:
    """The words the bundled text-to-image model knows (read from its tokenizer file; no model load)."""
    import json
    from pathlib import Path

    path = Path(__file__).parent / "zoo" / "weights" / "t2i_target" / "tokenizer.json"
    try:
        vocab = json.loads(path.read_text())["model"]["vocab"]
    except (OSError, KeyError, ValueError):
        return []
    return sorted(w for w in vocab if not (w.startswith("<") and w.endswith(">")))


def _setup_torch(args):
    import torch

    from .bench.common import default_threads

    torch.set_num_threads(args.threads or default_threads())
    return torch


def _compare(args, run, method):
    """``--compare``: a warm-up, then ``--repeats`` interleaved runs of ``method`` and AR; prints the medians, their
    ratio and the spread. Returns the last speculative and AR outputs."""
    from .bench.common import interleaved_times, speedup_summary

    runs = {"AR": lambda: _timed(run, "ar"), method: lambda: _timed(run, method)}
    results, times = interleaved_times(runs, repeats=args.repeats, warmup=1)
    print(speedup_summary(times, "AR", method))
    return results[method], results["AR"]


def _timed(run, method):
    out = run(method)
    return out, out.stats.wall_time


def _add_tree_argument(p):
    p.add_argument("--tree", nargs=2, type=int, default=None, metavar=("WIDTH", "DEPTH"),
                   help="verify a token tree per forward: WIDTH candidates at each of the first DEPTH levels "
                   "(draft: an EAGLE-2 tree of DEPTH levels, WIDTH children for each of the WIDTH best nodes per "
                   "level; --window counts every node)")


def _add_skip_argument(p):
    p.add_argument("--skip-layers", nargs="+", type=int, default=None, metavar="LAYER",
                   help="--method self: the decoder layers the draft leaves out (default: calibrated on the prompt)")


def _check_skip(p, args):
    if args.skip_layers is not None and args.decoding != "self":
        p.error("--skip-layers is only used with --method self")


def _add_compile_arguments(p):
    p.add_argument("--cache", choices=["dynamic", "static"], default=None,
                   help="KV cache: dynamic (default) or static (preallocated, per-row lengths; default with --compile)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the window forwards (CUDA graphs on CUDA); the first run pays the compilation")


def _image(argv):
    from .acceptance import available
    from .drafting.jacobi import INIT_STRATEGIES

    words = _zoo_words()
    p = argparse.ArgumentParser(
        prog="mmspec image",
        description="Generate images with the bundled text-to-image token model, decoded speculatively. "
        "Prints tokens, target forwards, step compression and time; --compare also runs plain AR.",
        epilog="The bundled model knows only the words of its procedural scene captions (others are encoded as "
        "<unk> and ignored, with a warning):\n  " + " ".join(words) + "\nCaptions read like 'a small red circle "
        "at the top left on a vertically striped blue background' (one or two objects: size, colour, shape, "
        "position; then the background's texture and colour). See mmspec/zoo/cards/t2i.md for what it can draw.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("prompt", nargs="+", help="one or more prompts, e.g. 'a small red circle at the top left on "
                   "a vertically striped blue background'")
    p.add_argument("-o", "--output", default="image.png",
                   help="output PNG (several images: a grid, plus one file per image next to it)")
    from .drafting import available_methods, method_spec

    p.add_argument("--method", "--decoding", dest="decoding", choices=available_methods(), default="jacobi",
                   help="decoding method (--decoding is an alias)")
    p.add_argument("--init", choices=sorted(INIT_STRATEGIES), default="vertical",
                   help="Jacobi init for new window slots")
    p.add_argument("--coupled", action=argparse.BooleanOptionalAction, default=True,
                   help="coupled redraw of Jacobi drafts (lossless)")
    p.add_argument("--window", type=int, default=16, help="tokens verified per forward (anchor included)")
    _add_tree_argument(p)
    _add_skip_argument(p)
    _add_compile_arguments(p)
    p.add_argument("--acceptance", choices=available(), default="exact",
                   help="acceptance criterion (exact is lossless; the others relax it)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--compare", action="store_true",
                   help="also run plain AR in this process and print the wall-clock speedup (after a warm-up, "
                   "median of --repeats interleaved runs, with the spread)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each method for --compare")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = p.parse_args(argv)
    if args.window < 1:
        p.error("--window must be >= 1")
    if args.num_images < 1:
        p.error("--num-images must be >= 1")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.compare and args.decoding == "ar":
        p.error("--compare runs plain AR beside --decoding; choose jacobi or draft")
    if not args.output.lower().endswith(".png"):
        p.error("--output must end with .png")
    _check_skip(p, args)

    torch = _setup_torch(args)
    from torchvision.utils import make_grid, save_image

    from .zoo.models import load_image_pipeline

    pipe, draft = load_image_pipeline(device=args.device, with_draft=method_spec(args.decoding).needs_draft)
    common = dict(guidance_scale=args.guidance, temperature=args.temperature, top_k=args.top_k,
                  num_images_per_prompt=args.num_images, output_type="pt", cache=args.cache, compile=args.compile)
    kw = dict(window=args.window, acceptance=args.acceptance)
    if args.tree is not None:
        kw.update(tree=tuple(args.tree))
    if args.skip_layers is not None:
        kw.update(skip=args.skip_layers)
    if args.decoding == "jacobi":
        kw.update(init=args.init, coupled=args.coupled)
    if draft is not None:
        kw.update(draft_model=draft)

    def run(decoding):
        extra = kw if decoding == args.decoding and decoding != "ar" else {}
        return pipe(args.prompt, method=decoding, generator=torch.Generator().manual_seed(args.seed), **common,
                    **extra)

    if args.compare:
        out, ar = _compare(args, run, args.decoding)
    else:
        out = run(args.decoding)
    s = out.stats
    print(f"{args.decoding}: {s.new_tokens} tokens, {s.target_forwards} target forwards, step compression "
          f"{s.step_compression:.2f}x, mean accepted {s.mean_accepted:.2f}, {s.wall_time:.2f}s"
          + ("" if out.lossless else "  (lossy criterion)"))
    if args.compare:
        print(f"ar: {ar.stats.new_tokens} tokens, {ar.stats.target_forwards} target forwards")
        if out.lossless and args.acceptance == "exact" and not torch.equal(out.tokens, ar.tokens):
            print("(sampled outputs differ from AR's draws, as expected: same distribution, different randomness)")
    images = out.images.cpu()
    if len(images) == 1:
        save_image(images[0], args.output)
    else:
        save_image(make_grid(images, nrow=min(len(images), 8), padding=2), args.output)
        stem = args.output[:-4]
        for i, im in enumerate(images):
            save_image(im, f"{stem}_{i}.png")
    print(f"wrote {args.output}")
    return 0


def _text(argv):
    p = argparse.ArgumentParser(
        prog="mmspec text",
        description="Continue Python code with the bundled text LM (trained on the standard library), decoded "
        "speculatively. Prints tokens, target forwards, step compression and time; --compare also runs plain AR.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("prompt", nargs="+", help="one or more prompts (a batch), e.g. 'def fibonacci(n):'")
    from .drafting import available_methods, method_spec

    p.add_argument("--method", "--decoding", dest="decoding", choices=available_methods(), default="draft",
                   help="decoding method (draft: the bundled draft model; --decoding is an alias)")
    p.add_argument("--window", type=int, default=None, help="tokens verified per forward (default: per method)")
    _add_tree_argument(p)
    _add_skip_argument(p)
    _add_compile_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--sample", action="store_true", help="sample (exactly from the target) instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--compare", action="store_true",
                   help="also run plain AR in this process and print the wall-clock speedup (after a warm-up, "
                   "median of --repeats interleaved runs, with the spread)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each method for --compare")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = p.parse_args(argv)
    if args.window is not None and args.window < 1:
        p.error("--window must be >= 1")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.temperature <= 0:
        p.error("--temperature must be > 0")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.compare and args.decoding == "ar":
        p.error("--compare runs plain AR beside --decoding; choose draft, lookup or jacobi")
    _check_skip(p, args)

    torch = _setup_torch(args)
    from . import generate
    from .zoo.models import load_text_pair

    target, draft, tok = load_text_pair(device=args.device)
    enc = tok(args.prompt, return_tensors="pt", padding=True).to(args.device)
    sampling = dict(do_sample=args.sample, temperature=args.temperature, top_p=args.top_p)

    def run(method):
        kw = dict(draft_model=draft) if method_spec(method).needs_draft else {}
        if args.window is not None:
            kw["window"] = args.window  # methods with a fixed window (ar) ignore it
        if args.tree is not None and method != "ar":
            kw["tree"] = tuple(args.tree)
        if args.skip_layers is not None and method == "self":
            kw["skip"] = args.skip_layers
        return generate(target, enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=args.max_new_tokens,
                        method=method, generator=torch.Generator().manual_seed(args.seed), cache=args.cache,
                        compile=args.compile, **sampling, **kw)

    if args.compare:
        out, ar = _compare(args, run, args.decoding)
    else:
        out = run(args.decoding)
    T = enc.input_ids.shape[1]
    for prompt, seq in zip(args.prompt, out.sequences):
        print(prompt + tok.decode(seq[T:], skip_special_tokens=True))
        print("-" * 40)
    s = out.stats
    print(f"{args.decoding}: {s.new_tokens} tokens, {s.target_forwards} target forwards (+{s.draft_forwards} draft), "
          f"step compression {s.step_compression:.2f}x, mean accepted {s.mean_accepted:.2f}, {s.wall_time:.2f}s")
    if args.compare:
        print(f"ar: {ar.stats.new_tokens} tokens, {ar.stats.target_forwards} target forwards")
        if not args.sample:
            print("identical to AR: " + str(bool(torch.equal(out.sequences, ar.sequences))))
    return 0


SERVE_MODULES = {"fastapi", "uvicorn", "starlette", "multipart", "python_multipart"}


def _serve(argv):
    try:
        from .serve.cli import main as serve_main
    except ModuleNotFoundError as err:  # the [serve] extra is not installed
        if (err.name or "").split(".")[0] not in SERVE_MODULES:
            raise
        sys.stderr.write(f"mmspec serve needs the optional [serve] dependencies (missing module {err.name!r}); "
                         "install them with:\n    pip install 'mmspec[serve]'\n")
        return 2
    return serve_main(argv)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mmspec")
    except Exception:  # not installed as a distribution (a source checkout on the path)
        from . import __version__

        return __version__


COMMANDS = {
    "image": (_image, "generate images with the bundled text-to-image model"),
    "text": (_text, "continue Python code with the bundled text LM"),
    "serve": (_serve, "serve a model over HTTP (mmspec serve caption --model PATH ...)"),
    "bench": (_bench, "run a benchmark and write JSON + markdown"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="mmspec", description="Lossless speculative decoding for text, VLM, image and video AR models.",
        epilog="commands:\n" + "\n".join(f"  {k:6s} {doc}" for k, (_, doc) in COMMANDS.items())
        + "\n\nRun `mmspec COMMAND --help` for its flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to run")
    parser.add_argument("--version", action="version", version=f"mmspec {_version()}")
    if argv and argv[0] == "--version":
        print(f"mmspec {_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose from {sorted(COMMANDS)}")
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
