"""One-shot device check (``mmspec bench gpu``): everything a GPU session should measure, in one run.

Sections (each skippable with ``--sections``; each catches its own errors so one failure does not hide the
others, and each stops starting new cases once the ``--budget-s`` deadline has passed):

* ``kernel_tests``: ``pytest tests/test_kernels*.py`` in a subprocess with ``TRITON_INTERPRET`` unset; pass /
  fail counts. (The test files pin ``TRITON_INTERPRET=1`` themselves and use CPU tensors, so on a GPU machine
  they check the installed triton in its interpreter; ``test_kernels_compile`` compiles for real. The
  non-interpreted kernels on CUDA tensors are checked by the next section.)
* ``verify``: fused Triton verification == the torch reference (tokens and accepted counts) on real shapes
  (B 1-64, K 1-64, V 16384-152064, float16/bfloat16/float32), its time and bandwidth against one
  ``copy_`` (memcpy) of the same logits. Inputs come from ``mmspec bench kernels``.
* ``forward``: median time of one window forward (1, 4, 16, 32, 64 new tokens on a cached context) at
  batch 1 and 8, eager and ``torch.compile``, for random-weight ``LlamaForCausalLM`` models shaped like
  LlamaGen GPT-B/L/XL (vocab 16384) and a 7B-shaped decoder cut to 2 layers (its full 32-layer time is
  extrapolated from the 1- and 2-layer times). The curves are also written as ``forward_cost.json``, the
  input of ``mmspec bench project``.
* ``zoo``: the image and text benchmarks' run functions on the bundled zoo models, at small sizes.

``--dry-run`` runs the same code on the CPU with tiny shapes (no CUDA, well under a minute): it keeps this
module from rotting and its numbers mean nothing. Writes ``gpu.json`` and ``gpu.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from .common import environment, markdown_table, write_report

__all__ = ["main", "run", "MODEL_SHAPES", "forward_curve", "build_model"]

#: in run order: the kernel tests (slow, in the interpreter) get the time that is left
SECTIONS = ("verify", "forward", "zoo", "kernel_tests")
DTYPES = ("float16", "bfloat16", "float32")
WINDOWS = (1, 4, 16, 32, 64)

#: name -> (hidden, layers, heads, ffn, vocab, layers built). LlamaGen presets (GPT_PRESETS, SwiGLU width
#: ffn_hidden_dim(dim, 256)); "7B-2L" is a Llama-2-7B-shaped decoder with only 2 of its 32 layers built.
MODEL_SHAPES = {
    "GPT-B": (768, 12, 12, 2048, 16384, 12),
    "GPT-L": (1024, 24, 16, 2816, 16384, 24),
    "GPT-XL": (1280, 36, 20, 3584, 16384, 36),
    "7B-2L": (4096, 32, 32, 11008, 32000, 2),
}
TINY_SHAPES = {"tiny": (64, 2, 4, 128, 256, 2), "tiny-1of4L": (64, 4, 4, 128, 256, 2)}


def _parse(argv):
    ap = argparse.ArgumentParser(prog="mmspec bench gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, no CUDA (checks the code path)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--models", nargs="+", default=None, help=f"forward models, of {list(MODEL_SHAPES)}")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="forward batch sizes")
    ap.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS), help="forward window sizes")
    ap.add_argument("--context", type=int, default=256, help="cached context length before each window")
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="forward weights dtype")
    ap.add_argument("--compile", nargs="*", default=None, metavar="MODEL",
                    help="models also timed under torch.compile (default: GPT-L on CUDA; none elsewhere)")
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats per case (median reported)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="wall-clock budget: sections start no new case after it (the report says what was cut)")
    ap.add_argument("--zoo-parts", nargs="+", choices=("image", "text"), default=["image", "text"],
                    help="zoo section: the bundled image models, the text pair, or both")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench"), help="folder for gpu.json, gpu.md, "
                    "forward_cost.json")
    args = ap.parse_args(argv)
    unknown = set(args.models or []) - set(MODEL_SHAPES)
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; choose from {list(MODEL_SHAPES)}")
    return args


class _Clock:
    """The run's deadline: ``over()`` once ``budget`` seconds have passed since the start."""

    def __init__(self, budget):
        self.t0, self.budget = time.perf_counter(), budget

    def over(self):
        return time.perf_counter() - self.t0 > self.budget


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, repeats, warmup=2, after=None):
    """Median milliseconds of ``fn()`` (``after()`` runs untimed after each call, e.g. a cache crop)."""
    for _ in range(warmup):
        fn()
        if after:
            after()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if after:
            after()
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------------
# (a) kernel tests without the interpreter
# ------------------------------------------------------------------------------------------------------


def kernel_tests(args, clock):
    root = Path(__file__).resolve().parents[2]
    files = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_kernels*.py"))
    if args.dry_run:
        files = files[:1]
    if not files:
        return {"skipped": f"no tests/test_kernels*.py under {root} (not a source checkout)"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *files]
    if args.dry_run:
        cmd.append("--collect-only")  # the same subprocess and parsing, without running the interpreter tests
    t0 = time.perf_counter()
    timeout = max(30.0, clock.budget - (time.perf_counter() - clock.t0))
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-2000:]
        return {"command": " ".join(cmd), "error": f"cut by the budget: still running after {timeout:.0f} s",
                "stdout_tail": tail.decode() if isinstance(tail, bytes) else tail}
    tail = done.stdout.strip().splitlines()[-1:] or [""]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected"
                                              r"|tests? collected)", tail[0])}
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.M)
    return {"command": " ".join(cmd), "returncode": done.returncode, "summary": tail[0], "counts": counts,
            "failures": failures[:50], "seconds": round(time.perf_counter() - t0, 1),
            "stderr_tail": done.stderr[-2000:] if done.returncode not in (0, 5) else ""}


# ------------------------------------------------------------------------------------------------------
# (b) fused verification == torch, bandwidth vs memcpy
# ------------------------------------------------------------------------------------------------------


def _verify_cases(dry_run):
    if dry_run:
        return [(B, K, V, dt) for (B, K, V) in ((1, 1, 64), (2, 4, 100)) for dt in DTYPES]
    cases = [(B, K, V, dt) for dt in DTYPES for V in (16384, 65536, 152064) for B in (1, 8, 64)
             for K in (1, 4, 16, 64)]
    return [c for c in cases if c[0] * (c[1] + 1) * c[2] <= 2.0e8]  # ~0.8 GB of float32 logits at most


def _verify_times(request, device, repeats):
    """Median ms of the Triton step, the torch reference step and one ``copy_`` of the target logits."""
    from ..kernels import reference, triton_verify

    dst = torch.empty_like(request.target_logits)
    return (_median_ms(lambda: triton_verify.run(request), device, repeats),
            _median_ms(lambda: reference.run(request), device, repeats),
            _median_ms(lambda: dst.copy_(request.target_logits), device, repeats))


def verify(args, device, clock):
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton.language is imported (``import mmspec`` already did):
        # run this section in a fresh process that has it.
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, TRITON_INTERPRET="1")
            cmd = [sys.executable, "-m", "mmspec.bench.gpu", "--sections", "verify", "--out", tmp,
                   "--device", str(device)] + (["--dry-run"] if args.dry_run else [])
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                return {"error": f"subprocess {' '.join(cmd)} failed: {done.stderr[-2000:]}"}
            return json.loads((Path(tmp) / "gpu.json").read_text())["sections"]["verify"]
    from ..kernels import reference, triton_verify
    from . import kernels as kbench

    if device.type != "cuda" and not triton_verify.INTERPRETED:
        return {"skipped": "no CUDA and triton was imported without TRITON_INTERPRET=1"}
    interpreted = device.type != "cuda"
    rows, cut = [], 0
    for B, K, V, dt in _verify_cases(args.dry_run):
        if clock.over():
            cut += 1
            continue
        kargs = kbench._parse(["--dtype", dt, "--seed", str(B * 1000 + K)])
        request = kbench._inputs(B, K, V, kargs, device)
        a = reference.run(request)
        b = triton_verify.run(request)
        row = dict(B=B, K=K, V=V, dtype=dt,
                   rows_tokens_differ=int((a.tokens != b.tokens).any(-1).sum()),
                   rows_accepted_differ=int((a.num_accepted != b.num_accepted).sum()),
                   mean_accepted=round(float(a.num_accepted.float().mean()), 3))
        logits = request.target_logits
        nbytes = logits.numel() * logits.element_size()
        if not interpreted:  # interpreter timings measure Python: leave them out
            reps = 5 if nbytes > 2**28 else args.repeats
            t_tri, t_ref, t_cpy = _verify_times(request, device, reps)
            row.update(logits_MB=round(nbytes / 2**20, 1), triton_ms=round(t_tri, 4), torch_ms=round(t_ref, 4),
                       memcpy_ms=round(t_cpy, 4), triton_GBps=round(nbytes / t_tri / 1e6, 1),
                       memcpy_GBps=round(2 * nbytes / t_cpy / 1e6, 1),
                       fraction_of_memcpy_bw=round((nbytes / t_tri) / (2 * nbytes / t_cpy), 3))
        rows.append(row)
        del request
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"interpreted": interpreted, "rows": rows, "cases_cut_by_budget": cut,
            "all_equal": all(r["rows_tokens_differ"] == 0 and r["rows_accepted_differ"] == 0 for r in rows),
            "bandwidth": "triton_GBps = one read of the [B, K+1, V] logits / time; memcpy_GBps = (read + write) "
                         "of the same bytes / copy_ time; fraction_of_memcpy_bw = their ratio (target >= 0.5)"}


# ------------------------------------------------------------------------------------------------------
# (c) forward time vs window
# ------------------------------------------------------------------------------------------------------


def build_model(shape, device, dtype, seed=0):
    """A random-weight ``LlamaForCausalLM`` for a ``MODEL_SHAPES`` entry (only its built layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, _, heads, ffn, vocab, built = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=built,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      bos_token_id=0, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


@torch.no_grad()
def forward_curve(model, batch, windows, context, device, repeats, compiled=None):
    """Median ms of one forward of ``w`` new tokens on a ``context``-token cache, for each ``w`` in ``windows``;
    ``compiled``: None (eager) or a ``torch.compile`` backend name.

    The cache is cropped back to ``context`` after each call (untimed), so every call sees the same shapes."""
    from transformers import DynamicCache

    from ..models.compat import cache_keyword

    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, V, (batch, context + max(windows)), generator=g).to(device)
    cache = DynamicCache(config=model.config)
    kw = {cache_keyword(model): cache}
    model(input_ids=ids[:, :context], use_cache=True, **kw)
    # The dry run traces with dynamo but skips inductor's code generation (minutes on one CPU core).
    fwd = torch.compile(model, backend=compiled) if compiled else model
    curve = {}
    for w in windows:
        pos = torch.arange(context, context + w, device=device)
        window = ids[:, context:context + w]
        def step(window=window, pos=pos):
            fwd(input_ids=window, use_cache=True, cache_position=pos, **kw)

        curve[w] = round(_median_ms(step, device, repeats, warmup=3 if compiled else 2,
                                    after=lambda w=w: cache.crop(-w)), 4)
    return curve


def forward(args, device, clock):
    shapes = TINY_SHAPES if args.dry_run else {m: MODEL_SHAPES[m] for m in (args.models or MODEL_SHAPES)}
    dtype = torch.float32 if args.dry_run else getattr(torch, args.dtype)
    batches = [1, 2] if args.dry_run else args.batch
    windows = [1, 4, 8] if args.dry_run else args.windows
    context = 8 if args.dry_run else args.context
    repeats = 2 if args.dry_run else args.repeats
    if args.compile is not None:
        compiled = set(args.compile)
    else:
        compiled = {"tiny"} if args.dry_run else ({"GPT-L"} if device.type == "cuda" else set())
    backend = "eager" if args.dry_run else "inductor"
    curves, notes, cut = [], [], 0
    # Every eager curve first, then the compiled ones (compilation takes the longest; it gets what is left).
    for mode, name in [("eager", n) for n in shapes] + [("compiled", n) for n in shapes if n in compiled]:
        shape = shapes[name]
        if mode == "compiled" and not hasattr(torch, "compile"):
            notes.append("torch.compile unavailable")
            continue
        model = build_model(shape, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        be = backend if mode == "compiled" else None
        for batch in batches:
            if clock.over():
                cut += 1
                continue
            try:
                ms = forward_curve(model, batch, windows, context, device, repeats, be)
            except Exception as err:  # e.g. inductor without a compiler: record, keep going
                notes.append(f"{name} {mode} B={batch}: {type(err).__name__}: {str(err)[:300]}")
                continue
            entry = dict(model=name, params_M=round(params / 1e6, 1), batch=batch,
                         mode=f"compiled ({be})" if be else mode, context=context,
                         dtype=str(dtype).replace("torch.", ""), window_ms={str(w): t for w, t in ms.items()})
            hidden, layers, _, _, _, built = shape
            if built < layers:  # time the 1-layer model too: per-layer cost = t(2) - t(1)
                # the config too: the cache is built from it, and an unfilled layer breaks ``crop`` (5.17)
                full = model.model.layers
                model.model.layers, model.config.num_hidden_layers = full[:built - 1], built - 1
                try:
                    ms1 = forward_curve(model, batch, windows, context, device, repeats, be)
                finally:
                    model.model.layers, model.config.num_hidden_layers = full, built
                entry["built_layers"] = built
                entry["per_layer_ms"] = {str(w): round(ms[w] - ms1[w], 4) for w in windows}
                entry["window_ms_built"] = entry["window_ms"]
                entry["window_ms"] = {str(w): round(ms[w] + (layers - built) * (ms[w] - ms1[w]), 4)
                                      for w in windows}
                entry["scaled_to_layers"] = layers
            curves.append(entry)
            print(json.dumps(entry), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"curves": curves, "notes": notes, "cases_cut_by_budget": cut,
            "method": "median ms of one forward of w new tokens on a cached context (cache cropped back untimed); "
                      "scaled models: window_ms = t(built) + (layers - built) * (t(built) - t(built - 1))"}


def forward_cost_file(section, device_name, dry_run, command="") -> dict:
    """The forward-time-vs-window curves in the format ``mmspec bench project --cost`` reads."""
    return {"kind": "forward_cost", "label": "measured forward time vs window (input of the projection cost model)",
            "device": device_name, "dry_run": dry_run, "command": command, "env": environment(),
            "method": section.get("method"), "curves": section.get("curves", [])}


# ------------------------------------------------------------------------------------------------------
# (d) zoo benchmarks
# ------------------------------------------------------------------------------------------------------


#: the image methods timed on the GPU (names of ``bench.image.METHODS``): the lossless Jacobi family from SJD as
#: published to the widest token tree, GSD, and draft-verify
ZOO_IMAGE_METHODS = ["AR", "SJD (random init, w16)", "SJD coupled (horizontal, w16)",
                     "coupled + tree(3,2) (horizontal, w32)", "coupled + tree(4,2) (horizontal, w64)",
                     "jacobi-draft + tree(3,2) (horizontal, w48)", "GSD (G=10)", "draft-verify exact"]
#: the same through the static cache and ``compile=True`` (CUDA graphs), batch 1
ZOO_IMAGE_COMPILED = ["AR", "SJD coupled (horizontal, w16)"]


def _zoo_image(args, device, clock) -> dict:
    """Image rows: each method at batch 1 (prompts one after another) and at batch 8, eager, then compiled at
    batch 1 (CUDA only). ``median_s`` is the time of all the prompts; ``speedup_vs_ar`` is against AR at the same batch size
    and mode, ``vs_eager_ar`` against eager AR at that batch size."""
    from ..zoo.data import make_scene, scene_seed
    from ..zoo.models import load_image_pipeline
    from ..zoo.recipes.common import HELDOUT_SCENE_SEED
    from . import image

    pipe, draft = load_image_pipeline(device=str(device))
    pipe.set_progress_bar_config(disable=True)
    keys = ("method", "lossless", "target_forwards", "step_compression", "median_s")
    prompts = [make_scene(scene_seed(HELDOUT_SCENE_SEED + 7, i)).caption for i in range(8)]
    if args.dry_run:
        plan = [(1, prompts[:1], ["AR", "SJD (random init, w16)"], {})]
    else:
        plan = [(1, prompts[:4], ZOO_IMAGE_METHODS, {}), (8, prompts, ZOO_IMAGE_METHODS, {})]
        if device.type == "cuda":
            plan.append((1, prompts[:4], ZOO_IMAGE_COMPILED, dict(cache="static", compile=True)))
    image.run(pipe, draft, prompts[:1], ["AR"], progress=False)  # warm-up: CUDA context, allocator, kernels
    rows, cut, eager_ar = [], [], {}
    for batch, ps, names, extra in plan:
        if clock.over():
            cut.append(f"batch {batch}{' compiled' if extra else ''}")
            continue
        tag = " [static, compiled]" if extra else ""
        methods = {n + tag: {**image.METHODS[n], **extra} for n in names}
        # the median of three leaves out a first call that pays kernel JIT or (compiled) the compilation
        part = image.run(pipe, draft, ps, methods, repeats=1 if args.dry_run else 3,
                         batch_size=batch, progress=False)
        ar = part[0]["median_s"]  # each list starts with AR
        eager_ar.setdefault(batch, ar)
        for r in part:
            rows.append({"batch": batch, **{k: r.get(k) for k in keys}, "speedup_vs_ar": ar / r["median_s"],
                         "vs_eager_ar": eager_ar[batch] / r["median_s"]})
            print(json.dumps(rows[-1]), flush=True)  # in the log as it comes, should a later part hang
    return {"image": rows, **({"image_cut_by_budget": cut} if cut else {})}


def zoo(args, device, clock):
    from ..zoo.models import load_text_pair, text_prompts
    from . import text

    result = {}
    try:
        result.update(_zoo_image(args, device, clock))
    except Exception as err:
        result["image_error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
    if "text" not in args.zoo_parts:
        return result
    if clock.over():
        result["text_error"] = "cut by budget"
        return result
    try:
        target, draft, tok = load_text_pair(device=str(device))
        new, plen = (8, 8) if args.dry_run else (64, 64)
        rows = []
        for b in [1] if args.dry_run else [1, 8]:
            ids = text_prompts(tok, b, plen).to(device)
            rows += text.run(target, draft, ids, max_new_tokens=new, repeats=1 if args.dry_run else 3)
        result["text"] = [{k: r.get(k) for k in ("method", "batch", "identical", "target_forwards",
                                                 "step_compression", "median_s", "vs_raw", "vs_mmspec_ar")}
                          for r in rows]
    except Exception as err:
        result["text_error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
    if device.type == "cuda" and not clock.over():
        # the static KV cache and compile=True (CUDA graphs, one per window size) against the dynamic eager rows
        try:
            rows = text.run(target, draft, text_prompts(tok, 1, plen).to(device), max_new_tokens=new, repeats=3,
                            cache_variants=True)
            result["text_static_compiled"] = [
                {k: r.get(k) for k in ("method", "batch", "identical", "target_forwards", "median_s", "vs_raw",
                                       "vs_dynamic")} for r in rows
                if r["method"].endswith("]") or r["method"] in ("raw forward loop", "mmspec ar", "mmspec lookup",
                                                                 "mmspec draft")]
        except Exception as err:
            result["text_static_compiled_error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
    return result


# ------------------------------------------------------------------------------------------------------


def run(args) -> dict:
    """Run the sections of parsed ``args``; returns the report (also written to ``args.out``)."""
    if args.dry_run:
        device = torch.device(args.device or "cpu")
        if device.type == "cuda":
            raise ValueError("--dry-run runs on the CPU; drop --device cuda")
    else:
        device = torch.device(args.device or "cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("mmspec bench gpu: no CUDA device; use --dry-run (or --device cpu for CPU numbers)")
    clock = _Clock(args.budget_s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"benchmark": "mmspec bench gpu (one-shot device check)", "device": name, "dry_run": args.dry_run,
              "note": "DRY RUN: tiny shapes on the CPU; the numbers mean nothing" if args.dry_run else None,
              "command": "mmspec bench gpu " + " ".join(args.argv), "env": environment(), "sections": {}}
    funcs = {"kernel_tests": lambda: kernel_tests(args, clock), "verify": lambda: verify(args, device, clock),
             "forward": lambda: forward(args, device, clock), "zoo": lambda: zoo(args, device, clock)}
    for section in args.sections:
        t0 = time.perf_counter()
        print(f"=== {section} ===", flush=True)
        try:
            report["sections"][section] = funcs[section]()
        except Exception as err:  # one broken section does not hide the others
            report["sections"][section] = {"error": f"{type(err).__name__}: {err}",
                                           "traceback": traceback.format_exc()[-3000:]}
        report["sections"][section]["seconds"] = round(time.perf_counter() - t0, 1)
        report["total_seconds"] = round(time.perf_counter() - clock.t0, 1)
        # after every section: a run killed by its caller's timeout still leaves what it measured
        write_report(args.out, "gpu", report, markdown(report))
    if "forward" in report["sections"]:
        cost = forward_cost_file(report["sections"]["forward"], name, args.dry_run, report["command"])
        (Path(args.out) / "forward_cost.json").write_text(json.dumps(cost, indent=2))
    return report


def markdown(report) -> str:
    lines = [f"# {report['benchmark']}", "", f"`{report['command']}` on **{report['device']}**, "
             f"{report['total_seconds']} s.", ""]
    if report["note"]:
        lines += [f"> {report['note']}", ""]
    s = report["sections"]
    for name, sec in s.items():
        lines += [f"## {name} ({sec.get('seconds')} s)", ""]
        if "error" in sec or "skipped" in sec:
            lines += [f"{sec.get('error') or sec.get('skipped')}", ""]
            continue
        if name == "kernel_tests":
            lines += [f"`{sec['command']}`: {sec['summary']} (rc {sec['returncode']})", ""]
            lines += [f"- FAILED {f}" for f in sec["failures"]] + [""]
        elif name == "verify":
            lines += [f"all equal (tokens and accepted counts): **{sec['all_equal']}**; {sec['bandwidth']}; "
                      f"cases cut by the budget: {sec['cases_cut_by_budget']}.", ""]
            cols = [(k, k, "") for k in ("B", "K", "V", "dtype", "rows_tokens_differ", "rows_accepted_differ",
                                          "mean_accepted", "logits_MB", "triton_ms", "torch_ms", "memcpy_ms",
                                          "triton_GBps", "memcpy_GBps", "fraction_of_memcpy_bw")]
            lines += [markdown_table(sec["rows"], cols), ""]
        elif name == "forward":
            lines += [f"{sec['method']}. Cases cut by the budget: {sec['cases_cut_by_budget']}. "
                      f"{'; '.join(sec['notes'])}", ""]
            rows = []
            for c in sec["curves"]:
                w1 = c["window_ms"].get("1")
                row = dict(model=c["model"], params=c["params_M"], batch=c["batch"], mode=c["mode"])
                for w, t in c["window_ms"].items():
                    row[f"w{w}"] = f"{t:.3f}" + (f" ({t / w1:.2f}x)" if w1 else "")
                rows.append(row)
            keys = sorted({k for r in rows for k in r if k.startswith("w")}, key=lambda k: int(k[1:]))
            cols = [("model", "model", ""), ("params", "params M (built)", ""), ("batch", "B", ""),
                    ("mode", "mode", "")] + [(k, f"{k} ms (vs w1)", "") for k in keys]
            lines += [markdown_table(rows, cols), ""]
        elif name == "zoo":
            for part in ("image", "text"):
                if part in sec:
                    cols = [(k, k, ".3f" if isinstance(v, float) else "") for k, v in sec[part][0].items()]
                    lines += [f"### {part}", "", markdown_table(sec[part], cols), ""]
                if f"{part}_error" in sec:
                    lines += [f"{part} failed: {sec[part + '_error'].splitlines()[0]}", ""]
    lines += [f"Environment: {report['env']}", ""]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    args.argv = argv
    report = run(args)
    print(markdown(report))
    print(f"wrote {args.out / 'gpu.json'}, {args.out / 'gpu.md'}" +
          (f" and {args.out / 'forward_cost.json'}" if "forward" in report["sections"] else ""))
    return report


if __name__ == "__main__":
    main()
