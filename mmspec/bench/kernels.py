"""Benchmark of the fused verification kernels against the torch reference (``mmspec bench kernels``).

For each batch size B, window K and vocabulary V it times one verification step from raw logits both ways
(Triton kernels vs the torch chain ``LogitsPipeline.probs`` + exact ``verify`` that they replace), checks
that both emit the same tokens, and reports the achieved bandwidth against one read of the logits:
``bytes([B, K+1, V] logits) / time`` (both the cond and the uncond logits with ``--guidance``). A ``sum()``
over the same tensors (one read, nothing else) is timed too, as the practical roofline of this GPU.
``--criterion lantern|gsd`` times the relaxed criteria (on a random codebook's neighbour table / rank windows).
Results go to ``kernels.json`` and ``kernels.md``.

On a machine without CUDA the kernels run in Triton's CPU interpreter on a tiny subset: that checks
correctness only, and the report says so (interpreter timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "run"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse(argv):
    ap = argparse.ArgumentParser(prog="mmspec bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="batch sizes B")
    ap.add_argument("--window", type=int, nargs="+", default=[4, 16], help="draft lengths K")
    ap.add_argument("--vocab", type=int, nargs="+", default=[16384, 65536], help="vocabulary sizes V")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the logits")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (doubles reads)")
    ap.add_argument("--drafts", choices=["sampled", "deterministic", "greedy"], default="sampled",
                    help="drafts with a q row, one-hot drafts (q=None), or greedy verification")
    ap.add_argument("--return-probs", action="store_true", help="also write the p rows (as Jacobi decoding needs)")
    ap.add_argument("--criterion", choices=["exact", "lantern", "gsd"], default="exact",
                    help="acceptance criterion (lantern: 100 neighbours, delta 0.1; gsd: group 25, delta_p 0.15)")
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats per case (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/kernels"), help="output directory")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu (interpreter)")
    return ap.parse_args(argv)


def _criterion(name, V, device, generator):
    """The criterion object; the relaxed ones on a random [V, 8] codebook (every token an image token)."""
    from ..acceptance import GSD, Exact, Lantern

    if name == "exact":
        return Exact()
    codebook = torch.randn(V, 8, device=device, generator=generator)
    if name == "lantern":
        return Lantern(k=100, delta=0.1, codebook=codebook)
    return GSD(group_size=25, delta_p=0.15, codebook=codebook)


def _inputs(B, K, V, args, device):
    """A checked request: target logits near a draft's (so acceptance is realistic), the draft's q rows and
    tokens, and the noise."""
    from ..kernels import draw_noise, make_request
    from ..kernels.request import guided_logits
    from ..sampling import LogitsPipeline, sample_from_weights

    g = torch.Generator(device=device).manual_seed(args.seed)
    dtype = _DTYPES[args.dtype]
    logits = (torch.randn(B, K + 1, V, device=device, generator=g) * 3.0).to(dtype)
    uncond = None
    if args.guidance is not None:
        uncond = (torch.randn(B, K + 1, V, device=device, generator=g) * 3.0).to(dtype)
    pipe = LogitsPipeline(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    guided = guided_logits(logits, uncond, args.guidance)
    q = pipe.probs(guided[:, :K].float() + 0.5 * torch.randn(B, K, V, device=device, generator=g))
    drafts = sample_from_weights(q, g)
    u, E = draw_noise(B, K, V, g, device)
    return make_request(drafts, q if args.drafts == "sampled" else None, logits, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, u=u, E=E, greedy=args.drafts == "greedy",
                        guidance_scale=args.guidance, uncond_logits=uncond, return_probs=args.return_probs,
                        criterion=_criterion(args.criterion, V, device, g))


def _time(fn, device, warmup, repeats):
    """Median seconds of ``fn()``; CUDA events on a GPU, wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> dict:
    """Run the benchmark described by parsed ``args``; returns the report (also written to ``args.out``)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    interpreter = device.type != "cuda"
    if interpreter:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import
    from ..kernels import reference, triton_verify

    note = None
    if interpreter:
        if not triton_verify.INTERPRETED:
            raise RuntimeError("no CUDA device and triton was imported without TRITON_INTERPRET=1; "
                               "rerun with TRITON_INTERPRET=1 set in the environment.")
        note = ("No CUDA device: the Triton kernels ran in Triton's CPU interpreter on a tiny subset, to check "
                "correctness only. Timings and bandwidths are NOT meaningful; run on a GPU for the real numbers.")
        cases = [(B, K, V) for B in (1, 2) for K in (1, 4) for V in (100,)]
        warmup, repeats = 0, 1
    else:
        cases = [(B, K, V) for B in args.batch for K in args.window for V in args.vocab]
        warmup, repeats = args.warmup, args.repeats

    records = []
    for B, K, V in cases:
        request = _inputs(B, K, V, args, device)
        out = {}

        def triton_step():
            out["triton"] = triton_verify.run(request)  # noqa: B023 (called within this iteration)

        def torch_step():
            out["torch"] = reference.run(request)  # noqa: B023 (called within this iteration)

        read = [t for t in (request.target_logits, request.uncond_logits) if t is not None]
        t_triton = _time(triton_step, device, warmup, repeats)
        t_torch = _time(torch_step, device, warmup, repeats)
        t_read = _time(lambda: [t.sum() for t in read], device, warmup, repeats) if not interpreter else None  # noqa: B023
        a, b = out["torch"], out["triton"]
        mismatched = int((a.tokens != b.tokens).any(-1).sum())
        nbytes = sum(t.numel() * t.element_size() for t in read)
        records.append(dict(
            B=B, K=K, V=V, logits_MB=round(nbytes / 2**20, 2),
            # Interpreter timings measure Python, not the kernels: leave them out rather than mislead.
            triton_ms=None if interpreter else round(t_triton * 1e3, 4),
            torch_ms=None if interpreter else round(t_torch * 1e3, 4),
            speedup=None if interpreter else round(t_torch / t_triton, 3),
            triton_GBps=None if interpreter else round(nbytes / t_triton / 1e9, 1),
            torch_GBps=None if interpreter else round(nbytes / t_torch / 1e9, 1),
            read_GBps=None if interpreter else round(nbytes / t_read / 1e9, 1),
            mean_accepted=round(float(a.num_accepted.float().mean()), 3),
            rows_differing=mismatched,
        ))
        print(json.dumps(records[-1]), flush=True)

    report = dict(
        benchmark="fused verification kernels vs torch reference",
        mode="cpu-interpreter (correctness only)" if interpreter else "cuda",
        note=note,
        device=torch.cuda.get_device_name(device) if not interpreter else platform.processor() or "cpu",
        torch=torch.__version__,
        settings=dict(dtype=args.dtype, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      guidance=args.guidance, drafts=args.drafts, return_probs=args.return_probs,
                      criterion=args.criterion,
                      repeats=repeats, warmup=warmup),
        bandwidth="bytes of one read of the [B, K+1, V] logits (cond and uncond with guidance) / median time; "
                  "read_GBps = sum() over the same tensors, the practical one-read roofline",
        results=records,
    )
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - the kernels would not have run
        pass
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(report, indent=2))
    (args.out / "kernels.md").write_text(_markdown(report))
    return report


def _markdown(report) -> str:
    s = report["settings"]
    lines = [
        "# Fused verification kernels vs torch reference",
        "",
        f"Mode: **{report['mode']}** on {report['device']} (torch {report['torch']}, triton "
        f"{report.get('triton', '?')}). Logits {s['dtype']}, temperature {s['temperature']}, top-k {s['top_k']}, "
        f"top-p {s['top_p']}, guidance {s['guidance']}, drafts {s['drafts']}, criterion {s['criterion']}, "
        f"p rows written: {s['return_probs']}; "
        f"median of {s['repeats']}.",
        "",
    ]
    if report["note"]:
        lines += [f"> {report['note']}", ""]
    lines += [
        f"Bandwidth: {report['bandwidth']}.",
        "",
        "| B | K | V | logits MB | triton ms | torch ms | speedup | triton GB/s | torch GB/s | read GB/s "
        "| mean accepted | rows differing |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        cells = [r[k] for k in ("B", "K", "V", "logits_MB", "triton_ms", "torch_ms", "speedup", "triton_GBps",
                                "torch_GBps", "read_GBps", "mean_accepted", "rows_differing")]
        lines.append("| " + " | ".join("n/a" if c is None else str(c) for c in cells) + " |")
    lines += ["", "`rows differing`: rows whose tokens differ between the two backends given the same noise "
              "(expected 0; a last-bit near-tie may rarely flip one)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Entry point: ``mmspec bench kernels [options]`` (see ``--help``)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    report = run(args)
    print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.md'} ({report['mode']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
