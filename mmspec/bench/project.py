"""A cost model, labelled as such (``mmspec bench project``): PROJECTED wall-clock speedups over AR.

It combines what a benchmark measured about a method's steps (step compression = tokens per target forward,
draft forwards per target forward, from ``image.json`` / ``text.json``) with a measured forward-time-vs-window
curve (``forward_cost.json`` from ``mmspec bench gpu``, on a GPU or on this CPU):

    time per token (method) = [t(window) + draft_fwd_per_step * draft_cost * t(1) + overhead] / step_compression
    time per token (AR)     = t(1) + overhead
    projected speedup       = time per token (AR) / time per token (method)

``t(w)`` is the curve's median time of one forward of ``w`` tokens (linear between measured windows),
``draft_cost`` a draft forward in units of the target's 1-token forward (an assumption, ``--draft-cost``),
``overhead`` the per-step time outside the forward (``--step-overhead-ms``, default 0: the ideal of a loop whose
step is only the forward). These are projections, not measurements: the device check confirms or refutes them.
Writes ``project.json`` and ``project.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import markdown_table, write_report

__all__ = ["main", "project", "interpolate", "pick_curve", "method_window"]

#: forward window of each benchmark row (tokens per target forward, anchor included), by method name
WINDOWS = {
    # bench text (its run() defaults)
    "mmspec ar": 1, "mmspec draft": 5, "mmspec lookup": 8, "mmspec jacobi": 8,
    # bench image (METHODS there)
    "AR": 1, "SJD (random init, w16)": 16, "SJD vertical init": 16, "SJD coupled (vertical, w16)": 16,
    "SJD coupled (vertical, w32)": 32, "GSD (G=10)": 16, "LANTERN (draft, k=50, delta=0.2)": 6,
    "draft-verify exact": 6,
}


def method_window(row: dict, overrides: dict) -> int | None:
    """The forward window of a bench row: ``--window`` overrides, the row's own ``window``, else ``WINDOWS``."""
    name = row["method"]
    if name in overrides:
        return overrides[name]
    if row.get("window"):
        return int(row["window"])
    if name == "mmspec self (calibrated)" and row.get("skip") is not None:
        return None  # its drafts are partial-depth forwards: not on a full-model curve
    return WINDOWS.get(name)


def interpolate(window_ms: dict, w: float) -> float:
    """Time of a ``w``-token forward from a curve ``{window: ms}``: exact or linear between measured windows.

    >>> interpolate({"1": 10.0, "4": 11.0, "16": 14.0}, 10)
    12.5
    """
    pts = sorted((int(k), float(v)) for k, v in window_ms.items())
    lo, hi = pts[0][0], pts[-1][0]
    if not lo <= w <= hi:
        raise ValueError(f"window {w} is outside the curve's measured windows {lo}-{hi}; measure it "
                         "(mmspec bench gpu --windows ...) rather than extrapolate")
    for (w0, t0), (w1, t1) in zip(pts, pts[1:]):
        if w0 <= w <= w1:
            return t0 + (t1 - t0) * (w - w0) / (w1 - w0)
    return pts[0][1]  # a one-point curve at w


def pick_curve(cost: dict, model=None, batch=None, mode=None) -> dict:
    """The curve of ``cost["curves"]`` matching ``model`` / ``batch`` / ``mode`` (None: any); the first match."""
    curves = cost.get("curves") or []
    found = [c for c in curves if (model is None or c["model"] == model) and (batch is None or c["batch"] == batch)
             and (mode is None or c["mode"] == mode)]
    if not found:
        have = sorted({(c["model"], c["batch"], c["mode"]) for c in curves})
        raise ValueError(f"no curve with model={model!r}, batch={batch!r}, mode={mode!r}; the cost file has "
                         f"(model, batch, mode) {have}")
    return found[0]


def project(rows: list[dict], curve: dict, draft_cost: float = 0.0, step_overhead_ms: float = 0.0,
            windows: dict | None = None) -> list[dict]:
    """Projected speedups over AR for bench ``rows`` (dicts with method, step_compression, target_forwards,
    optional draft_forwards) on a forward-cost ``curve`` (dict with ``window_ms``). Rows whose window is unknown
    or outside the curve get ``projected_speedup`` None and a ``note``."""
    windows = windows or {}
    t1 = interpolate(curve["window_ms"], 1)
    ar = t1 + step_overhead_ms
    out = []
    for r in rows:
        res = {"method": r["method"], "batch": r.get("batch"), "step_compression": r.get("step_compression"),
               "measured_speedup": r.get("speedup_vs_ar", r.get("vs_mmspec_ar"))}
        w = method_window(r, windows)
        sc = r.get("step_compression")
        if w is None or not sc:
            res["note"] = "no forward window known for this method (pass --window NAME=W)" if w is None else \
                "no step compression in the bench row"
            out.append(res)
            continue
        drafts = (r.get("draft_forwards") or 0) / r["target_forwards"] if r.get("target_forwards") else 0.0
        try:
            step = interpolate(curve["window_ms"], w) + drafts * draft_cost * t1 + step_overhead_ms
        except ValueError as err:
            res.update(window=w, note=str(err))
            out.append(res)
            continue
        res.update(window=w, draft_fwd_per_step=round(drafts, 3), projected_ms_per_token=round(step / sc, 4),
                   projected_speedup=round(ar / (step / sc), 3))
        if "draft" in r["method"].lower() and "draft_forwards" not in r:
            res["note"] = "the bench row has no draft_forwards: draft time is not counted (an upper bound)"
        out.append(res)
    return out


def _parse(argv):
    ap = argparse.ArgumentParser(prog="mmspec bench project", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=Path, required=True, help="a bench JSON with rows (image.json, text.json, ...)")
    ap.add_argument("--cost", type=Path, required=True, help="forward_cost.json from mmspec bench gpu")
    ap.add_argument("--model", default=None, help="curve model (default: the first curve)")
    ap.add_argument("--batch", type=int, default=None, help="curve batch (default: each row's batch, else 1)")
    ap.add_argument("--mode", default=None, help="curve mode, e.g. eager or 'compiled (inductor)' (default: first)")
    ap.add_argument("--draft-cost", type=float, default=0.0,
                    help="one draft forward in target 1-token forwards (an assumption; 0 ignores draft time)")
    ap.add_argument("--step-overhead-ms", type=float, default=0.0, help="per-step time outside the forward")
    ap.add_argument("--window", action="append", default=[], metavar="METHOD=W",
                    help="forward window of a method the table does not know (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench"), help="folder for project.json and project.md")
    args = ap.parse_args(argv)
    windows = {}
    for item in args.window:
        name, sep, w = item.rpartition("=")
        if not sep or not w.isdigit() or int(w) < 1:
            ap.error(f"--window must be METHOD=W with W a positive integer, got {item!r}")
        windows[name] = int(w)
    args.windows = windows
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    bench, cost = json.loads(args.steps.read_text()), json.loads(args.cost.read_text())
    if cost.get("kind") != "forward_cost":
        raise ValueError(f"--cost {args.cost} is not a forward_cost.json (kind={cost.get('kind')!r})")
    rows = bench["rows"]
    batches = sorted({r.get("batch") or 1 for r in rows}) if args.batch is None else [args.batch]
    result, used = [], []
    for b in batches:
        curve = pick_curve(cost, args.model, b, args.mode)
        used.append({k: curve[k] for k in ("model", "batch", "mode", "window_ms")})
        part = [r for r in rows if args.batch is not None or (r.get("batch") or 1) == b]
        for r in project(part, curve, args.draft_cost, args.step_overhead_ms, args.windows):
            r["curve"] = f"{curve['model']} B={curve['batch']} {curve['mode']}"
            result.append(r)
    label = ("PROJECTED by a cost model (not measured): step compression from "
             f"{args.steps} x forward-time-vs-window from {args.cost} (device {cost.get('device')}"
             f"{', DRY RUN curve' if cost.get('dry_run') else ''}); draft forward = {args.draft_cost} target "
             f"1-token forwards; per-step overhead {args.step_overhead_ms} ms")
    cols = [("method", "method", ""), ("batch", "B", ""), ("window", "window", ""),
            ("step_compression", "step compr.", ".2f"), ("draft_fwd_per_step", "draft fwd/step", ""),
            ("projected_ms_per_token", "projected ms/token", ".3f"), ("projected_speedup", "PROJECTED speedup", ".2f"),
            ("measured_speedup", "measured speedup (on the bench's own model and machine)", ".2f"),
            ("curve", "curve", ""), ("note", "note", "")]
    md = (f"# Projected speedups over AR (cost model)\n\n`mmspec bench project {' '.join(argv)}`\n\n> {label}\n\n"
          f"{markdown_table(result, cols)}\n\n{__doc__.split(chr(10) * 2, 1)[1]}\n")
    payload = {"kind": "projection", "label": label, "steps": str(args.steps), "cost": str(args.cost),
               "curves": used, "draft_cost": args.draft_cost, "step_overhead_ms": args.step_overhead_ms,
               "rows": result}
    js, mdp = write_report(args.out, "project", payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return result


if __name__ == "__main__":
    main()
