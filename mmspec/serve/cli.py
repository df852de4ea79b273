"""``mmspec serve caption``: run the captioning API on uvicorn.

    mmspec serve caption --model PATH [--draft PATH] [--decoding lookup|jacobi|draft]
                         [--host 127.0.0.1] [--port 8000] [--max-batch-size 8] [--max-wait-ms 10]
                         [--max-queue 64] [--max-new-tokens-limit 64] [--max-image-bytes N] [--max-image-pixels N]

``--model`` is a directory written by ``CaptionPipeline.save_pretrained`` or ``zoo`` for the bundled
captioner. The model loads in the background after the server starts: ``/health`` answers at once,
``/ready`` turns 200 when the model is in memory. SIGTERM/SIGINT stop accepting connections, let
in-flight requests finish (up to ``--graceful-timeout`` seconds), then exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..generation import METHODS

SERVICES = ("caption",)

#: the decoding methods a server accepts (the registry's, ``mmspec.generate``'s ``METHODS``)
DECODINGS = tuple(METHODS)


def _zoo_loader():
    """The bundled captioner's loader ``(device, dtype, with_draft, decoding) -> CaptionPipeline``, or None
    when this version does not ship one."""
    try:
        from ..zoo.models import load_caption_pipeline
    except ImportError:
        try:
            from ..zoo.recipes.captioner import load_caption_pipeline
        except ImportError:
            return None
    return load_caption_pipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmspec serve caption",
        description="Serve image captioning over HTTP (FastAPI on uvicorn): POST /v1/captions, GET /health, "
        "GET /ready, OpenAPI docs at /docs. Concurrent requests are batched into one speculative decode.",
    )
    p.add_argument("--model", required=True, help="CaptionPipeline directory (save_pretrained), or 'zoo' for the "
                   "bundled captioner")
    p.add_argument("--draft", default=None, help="draft model directory for --decoding draft")
    p.add_argument("--decoding", choices=DECODINGS, default=None,
                   help="decoding method for every request (default: the pipeline's own, prompt lookup)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 behind a load balancer)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="most requests decoded together (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for batch-mates")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for the model; more are answered 503 with Retry-After")
    p.add_argument("--max-new-tokens-limit", type=int, default=64, help="largest max_new_tokens a request may ask")
    p.add_argument("--default-max-new-tokens", type=int, default=32, help="max_new_tokens when a request gives none")
    p.add_argument("--max-image-bytes", type=int, default=8 * 1024 * 1024, help="largest encoded image (bytes)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest width*height")
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="longest prompt (characters)")
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--graceful-timeout", type=int, default=30,
                   help="seconds in-flight requests get to finish on shutdown")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def _check(p: argparse.ArgumentParser, args) -> None:
    for flag in ("max_batch_size", "max_queue", "max_new_tokens_limit", "default_max_new_tokens", "max_image_bytes",
                 "max_image_pixels", "max_prompt_chars"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_wait_ms < 0:
        p.error("--max-wait-ms must be >= 0")
    if not 0 <= args.port <= 65535:
        p.error("--port must be in [0, 65535]")
    if args.model == "zoo":
        if _zoo_loader() is None:
            p.error("--model zoo: this version of mmspec ships no bundled captioner "
                    "(mmspec.zoo.models.load_caption_pipeline is missing); pass a CaptionPipeline directory")
        if args.draft is not None:
            p.error("--draft cannot be combined with --model zoo: the bundled draft is used with --decoding draft")
    elif not os.path.isdir(args.model):
        p.error(f"--model {args.model!r} is not a directory (expected a CaptionPipeline.save_pretrained folder or 'zoo')")
    if args.draft is not None and not os.path.isdir(args.draft):
        p.error(f"--draft {args.draft!r} is not a directory")
    if args.decoding == "draft" and args.draft is None and args.model != "zoo":
        p.error("--decoding draft needs --draft PATH")


def make_loader(args):
    """A no-argument callable that loads the pipeline the flags describe (run in the worker thread)."""

    def load():
        import torch

        dtype = getattr(torch, args.dtype)
        if args.model == "zoo":  # missing weights raise FileNotFoundError saying how to train them
            return _zoo_loader()(device=args.device, dtype=dtype, with_draft=args.decoding == "draft",
                                 decoding=args.decoding or "lookup")
        from ..pipelines.caption import CaptionPipeline

        return CaptionPipeline.from_pretrained(args.model, draft=args.draft, device=args.device, dtype=dtype)

    return load


def parse_args(argv):
    """The parsed and checked flags of ``mmspec serve caption ...`` (``argv`` without ``serve caption``).
    Raises ``SystemExit`` (argparse's) on ``--help`` and on bad flags."""
    p = build_parser()
    args = p.parse_args(argv)
    _check(p, args)
    return args


def make_server(args):
    """A ``uvicorn.Server`` for the parsed flags, and a one-item list holding the exit code to return
    (set to 1 when the model fails to load, which also stops the server)."""
    import uvicorn

    from .app import ServeSettings, create_app

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = ServeSettings(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_new_tokens_limit=args.max_new_tokens_limit, default_max_new_tokens=args.default_max_new_tokens,
        max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
        max_prompt_chars=args.max_prompt_chars, decoding=args.decoding,
        model_name="zoo" if args.model == "zoo" else os.path.basename(os.path.normpath(args.model)),
    )
    exit_code = [0]
    server = None

    def on_load_error(exc):
        exit_code[0] = 1
        server.should_exit = True

    app = create_app(loader=make_loader(args), settings=settings, on_load_error=on_load_error)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=args.graceful_timeout)
    server = uvicorn.Server(config)
    return server, exit_code


def main(argv=None) -> int:
    """``mmspec serve <service> ...``; ``argv`` excludes ``serve``. Returns the exit code.

    On SIGTERM/SIGINT uvicorn finishes in-flight requests, runs the shutdown (the batcher drains), then
    re-raises the signal, so the process ends as terminated by it (exit status 128 + 15 for SIGTERM).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SERVICES:
        usage = "usage: mmspec serve caption --model PATH [options]   (mmspec serve caption --help for all flags)\n"
        if argv and argv[0] not in ("-h", "--help"):
            sys.stderr.write(f"mmspec serve: unknown service {argv[0]!r}\n" + usage)
            return 2
        if not argv:
            sys.stderr.write(usage)
            return 2
        sys.stdout.write(usage)
        return 0
    try:
        args = parse_args(argv[1:])
    except SystemExit as e:  # argparse exits on --help and on errors; the mmspec command wants a code
        return int(e.code or 0)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server, exit_code = make_server(args)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits this way when it cannot bind
        return int(e.code or 1)
    return exit_code[0]
