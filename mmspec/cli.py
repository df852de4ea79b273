"""The ``mmspec`` command.

    mmspec bench text [--batch 1 4] [--models random|zoo] ...   benchmark text methods against peers
    mmspec bench kernels ...                                      fused verification kernels vs torch

Run ``mmspec <command> --help`` for every flag.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHES = {
    "text": ("mmspec.bench.text", "text methods vs plain AR and transformers' assisted generation"),
    "kernels": ("mmspec.bench.kernels", "fused Triton verification vs the torch reference"),
}


def _bench(argv):
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        lines = "\n".join(f"  {k:10s} {doc}" for k, (_, doc) in BENCHES.items())
        msg = f"usage: mmspec bench {{{','.join(BENCHES)}}} [options]\n\nbenchmarks:\n{lines}\n"
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"mmspec bench: unknown benchmark {argv[0]!r}\n" + msg)
            return 2
        sys.stdout.write(msg)
        return 0
    module = importlib.import_module(BENCHES[argv[0]][0])
    module.main(argv[1:])
    return 0


COMMANDS = {"bench": (_bench, "run a benchmark and write JSON + markdown")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="mmspec", description="Lossless speculative decoding for text, VLM, image and video AR models.",
        epilog="\n".join(f"{k}: {doc}" for k, (_, doc) in COMMANDS.items()),
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="what to run")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose from {sorted(COMMANDS)}")
    return COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
