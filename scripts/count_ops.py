"""Tensor operations a decoding step launches, by the part of the loop that launches them: a device-independent
measure of per-step host work (on a GPU each one is at least one kernel launch, and a small model's step is bound by
them, not by its FLOPs; BENCHMARKS.md, session 16).

    python scripts/count_ops.py [sjd|tree|ar] [--prompts N]

Runs the bundled text-to-image pipeline (guidance 3, seeds 0..N-1) once under a ``TorchDispatchMode`` that counts
every ATen op except views and allocations, and attributes each to the innermost of the loop's main functions it ran
in (the target forward, verification, the proposer's propose / update, the tree helpers; "other" for the rest)."""
from __future__ import annotations

import argparse
import collections
import functools
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmspec.decoding  # noqa: F401
import mmspec.tree as tree_mod
from mmspec.drafting import jacobi
from mmspec.models import causal_lm
from mmspec.zoo.models import load_image_pipeline

NOT_COUNTED = {"view", "_unsafe_view", "unsqueeze", "squeeze", "slice", "select", "as_strided", "expand", "t",
               "transpose", "permute", "alias", "detach", "split", "unbind", "lift_fresh", "empty", "empty_strided",
               "_reshape_alias", "reshape", "_local_scalar_dense"}
METHODS = {"ar": dict(decoding="ar"), "sjd": dict(decoding="jacobi", window=16),
           "tree": dict(decoding="jacobi", window=32, init="horizontal", coupled=True, tree=(3, 2))}
PROMPTS = ["a small red circle at the top left on a striped blue background",
           "a large green square at the center on a plain yellow background",
           "a medium blue star at the bottom right on a checkered white background",
           "a small yellow ring at the top right on a plain black background"]

where, counts = ["other"], collections.Counter()


class Count(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] not in NOT_COUNTED:
            counts[where[-1]] += 1
        return func(*args, **(kwargs or {}))


def attribute(owner, name: str, label: str) -> None:
    """Count the ops run inside ``owner.name`` (and not in a more inner attributed function) under ``label``."""
    f = getattr(owner, name)

    @functools.wraps(f)
    def wrapped(*a, **k):
        where.append(label)
        try:
            return f(*a, **k)
        finally:
            where.pop()

    setattr(owner, name, wrapped)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method", choices=sorted(METHODS), nargs="?", default="tree")
    ap.add_argument("--prompts", type=int, default=2, choices=range(1, len(PROMPTS) + 1))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    verify_mod = sys.modules["mmspec.verify"]
    attribute(causal_lm.CausalLM, "call_model", "target forward")
    attribute(jacobi.JacobiProposer, "propose", "propose")
    attribute(jacobi.JacobiProposer, "update", "update")
    for mod in (verify_mod, mmspec.decoding):
        for name in ("verify", "verify_tree", "sampled_step"):
            if hasattr(mod, name):
                attribute(mod, name, "verify")
    for name in ("with_alternatives", "closest_rows", "block_depth", "block_ancestors"):
        for mod in [m for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("mmspec")]:
            if getattr(mod, name, None) is getattr(tree_mod, name):
                attribute(mod, name, name)
    pipe, _ = load_image_pipeline(with_draft=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = PROMPTS[: args.prompts]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with Count():
        out = pipe(prompts, guidance_scale=3.0, generator=gens, **METHODS[args.method])
    steps = out.stats.target_forwards
    print(f"{args.method}: {out.stats}")
    print(f"tensor ops a step: {sum(counts.values()) / steps:.0f}")
    for label, n in counts.most_common():
        print(f"  {label:18s} {n / steps:6.1f}")


if __name__ == "__main__":
    main()
