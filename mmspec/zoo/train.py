"""Train a bundled zoo model on the CPU: ``python -m mmspec.zoo.train vq|classifier``.

Each run is seeded and stops by wall clock (``--minutes``) or step count (``--max-steps``); it
saves fp16 safetensors and a JSON config with ``save_pretrained`` in ``--out`` and writes the
final metrics to ``--out/metrics.json``. The bundled weights were made with::

    python -m mmspec.zoo.train vq --minutes 20 --threads 1 --seed 0 --out mmspec/zoo/weights/vq
    python -m mmspec.zoo.train classifier --minutes 25 --max-steps 2000 --threads 1 --seed 0 \
        --out mmspec/zoo/weights/classifier

(the model cards in ``mmspec/zoo/cards/`` record the results). ``--threads 1`` because two OpenMP
threads ran 2-15x slower than one on a two-core machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import os
import sys

from .recipes import RECIPES

DEFAULT_MINUTES = {"vq": 20.0, "classifier": 25.0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m mmspec.zoo.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=RECIPES, help="which zoo model to train")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock training budget (default: vq 20, classifier 25)")
    ap.add_argument("--max-steps", type=int, default=None, help="also stop after this many optimiser steps")
    ap.add_argument("--out", default=None, help="output directory (default: outputs/zoo/MODEL)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=None, help="held-out images per evaluation set (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is much faster when other jobs share the cores)")
    ap.add_argument("--vq", default=None, help="classifier only: tokenizer whose reconstructions are also scored (default: the bundled one, if present)")
    args = ap.parse_args(argv)
    minutes = DEFAULT_MINUTES[args.model] if args.minutes is None else args.minutes
    if minutes <= 0:
        ap.error("--minutes must be > 0")
    out = args.out or os.path.join("outputs", "zoo", args.model)
    if args.model == "vq":
        from .recipes import vq

        return vq.train(out, minutes=minutes, seed=args.seed, max_steps=args.max_steps, eval_n=args.eval_n, threads=args.threads)
    from .recipes import classifier

    return classifier.train(out, minutes=minutes, seed=args.seed, max_steps=args.max_steps, eval_n=args.eval_n, vq_path=args.vq, threads=args.threads)


if __name__ == "__main__":
    main(sys.argv[1:])
