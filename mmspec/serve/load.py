"""Load generator for the captioning API: requests/s and latency percentiles.

    python -m mmspec.serve.load --url http://127.0.0.1:8000 --requests 200 --concurrency 16 --duration 60

``--concurrency`` clients each send one request at a time (multipart uploads of a few small seeded
images) until ``--requests`` were sent or ``--duration`` seconds passed, whichever comes first. It
refuses any host that is not the loopback interface: it is a tool for measuring your own server, not
for loading someone else's. Prints one summary line and, with ``--json``, writes the numbers to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import sys
import time
from typing import List, Optional, Sequence
from urllib.parse import urlsplit

import numpy as np

__all__ = ["run_load", "sample_images", "is_loopback", "main"]


def is_loopback(url: str) -> bool:
    """True when ``url``'s host is localhost, 127.0.0.0/8 or ::1."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sample_images(n: int = 8, size: int = 64, seed: int = 0) -> List[bytes]:
    """``n`` distinct PNG files (size x size): a colour gradient and a rectangle per image, seeded."""
    import PIL.Image

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for _ in range(n):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = (a * (1 - xx[..., None]) + b * yy[..., None]).clip(0, 255).astype(np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        img[y0:y0 + size // 3, x0:x0 + size // 3] = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        PIL.Image.fromarray(img).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _percentile(values: Sequence[float], q: float) -> Optional[float]:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


async def _wait_ready(client, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await client.get(url + "/ready")).status_code == 200:
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/ready did not answer 200 within {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def run_load(url: str, requests: int = 100, concurrency: int = 8, duration: float = 60.0,
                   images: Optional[Sequence[bytes]] = None, max_new_tokens: Optional[int] = None,
                   prompt: Optional[str] = None, timeout: float = 120.0, wait_ready: float = 60.0) -> dict:
    """Send up to ``requests`` caption requests from ``concurrency`` clients for at most ``duration`` s.

    Returns a dict: sent, ok, errors (status -> count), wall_s, requests_per_s (answered 200 per
    second of wall time), latency_ms (p50, p90, p99, mean, max over 200 answers), mean_batch_size
    (as reported by the server), retry_after_seen (503 answers with the header).
    """
    import httpx

    if not is_loopback(url):
        raise ValueError(f"refusing to load {url!r}: only loopback hosts (localhost, 127.0.0.0/8, ::1) are allowed")
    if requests < 1 or concurrency < 1 or duration <= 0:
        raise ValueError("requests and concurrency must be >= 1 and duration > 0")
    url = url.rstrip("/")
    images = list(images) if images else sample_images()
    data = {} if max_new_tokens is None else {"max_new_tokens": str(max_new_tokens)}
    if prompt is not None:
        data["prompt"] = prompt
    latencies: List[float] = []
    batch_sizes: List[int] = []
    errors: dict = {}
    state = {"next": 0, "retry_after": 0}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await _wait_ready(client, url, wait_ready)
        start = time.perf_counter()
        stop_at = start + duration

        async def worker():
            while state["next"] < requests and time.perf_counter() < stop_at:
                i = state["next"]
                state["next"] += 1
                files = {"image": (f"img{i}.png", images[i % len(images)], "image/png")}
                t0 = time.perf_counter()
                try:
                    r = await client.post(url + "/v1/captions", files=files, data=data)
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                    r = None
                dt = time.perf_counter() - t0
                if status == 200:
                    latencies.append(dt * 1e3)
                    batch_sizes.append(r.json()["batch_size"])
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1
                    if r is not None and "retry-after" in r.headers:
                        state["retry_after"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "url": url, "sent": state["next"], "ok": len(latencies), "errors": errors, "concurrency": concurrency,
        "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 3),
        "latency_ms": {"p50": _percentile(latencies, 50), "p90": _percentile(latencies, 90),
                       "p99": _percentile(latencies, 99),
                       "mean": float(np.mean(latencies)) if latencies else None,
                       "max": max(latencies) if latencies else None},
        "mean_batch_size": float(np.mean(batch_sizes)) if batch_sizes else None,
        "retry_after_seen": state["retry_after"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmspec.serve.load", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--requests", type=int, default=100, help="most requests to send")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending at the same time")
    p.add_argument("--duration", type=float, default=60.0, help="most seconds to send for")
    p.add_argument("--image", action="append", default=None, help="image file to send (repeatable); "
                   "default: 8 seeded 64x64 PNGs")
    p.add_argument("--size", type=int, default=64, help="side of the generated images")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--prompt", default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if not is_loopback(args.url):
        p.error(f"--url {args.url!r}: only loopback hosts (localhost, 127.0.0.0/8, ::1) are allowed")
    images = None
    if args.image:
        images = [open(path, "rb").read() for path in args.image]
    else:
        images = sample_images(size=args.size)
    try:
        res = asyncio.run(run_load(args.url, args.requests, args.concurrency, args.duration, images,
                                   args.max_new_tokens, args.prompt, args.timeout))
    except (ValueError, TimeoutError) as e:
        sys.stderr.write(f"load: {e}\n")
        return 2
    lat = res["latency_ms"]
    def fmt(v):
        return "-" if v is None else f"{v:.1f}"
    print(f"{res['ok']}/{res['sent']} ok in {res['wall_s']:.1f}s: {res['requests_per_s']:.2f} req/s, "
          f"p50 {fmt(lat['p50'])} ms, p99 {fmt(lat['p99'])} ms, mean batch {fmt(res['mean_batch_size'])}, "
          f"errors {res['errors'] or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
