"""The captioning service, started for real on 127.0.0.1 (uvicorn in a thread) and driven with httpx.

Most tests use a small deterministic caption function (the mean colour of the image) so they can gate,
poison and count model calls; the end-to-end tests use the real ``CaptionPipeline`` on a tiny LLaVA and
compare every served caption with the pipeline's caption for that image alone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import socket
import struct
import threading
import time
import zlib

import numpy as np
import PIL.Image
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from mmspec.serve import Batcher, ServeError, ServeSettings, create_app  # noqa: E402
from mmspec.serve.load import is_loopback, run_load, sample_images  # noqa: E402


# ----------------------------------------------------------------------------- helpers
def png(color=(10, 20, 30), size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def mean_caption(image) -> str:
    r, g, b = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0).round().astype(int)
    return f"colour {r} {g} {b}"


class FakeModel:
    """caption_fn stand-in: records each call's batch size; red images raise RuntimeError (a model
    failure), green ones ValueError (the model rejecting the input); ``gate`` (an Event) blocks calls."""

    def __init__(self, gate: threading.Event | None = None, delay: float = 0.0):
        self.calls = []
        self.gate = gate
        self.delay = delay
        self.entered = threading.Event()

    def __call__(self, images, prompt, max_new_tokens):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(20), "test gate never opened"
        time.sleep(self.delay)
        self.calls.append(len(images))
        captions = []
        for im in images:
            c = mean_caption(im)
            if c == "colour 255 0 0":
                raise RuntimeError("simulated CUDA error on this input")
            if c == "colour 0 255 0":
                raise ValueError("simulated: prompt longer than the model's context")
            captions.append(f"{c} | {prompt or ''} | {max_new_tokens}")
        return captions


@contextlib.contextmanager
def serving(app):
    """Run ``app`` on uvicorn at 127.0.0.1 on a free port in a thread; yields (base url, server)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


def post_many(url, payloads, max_workers=None):
    """POST every (files, data, headers) concurrently from threads; returns the responses in order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(p):
        files, data, headers = p
        with httpx.Client(timeout=60) as c:
            return c.post(url + "/v1/captions", files=files, data=data, headers=headers)

    with ThreadPoolExecutor(max_workers or len(payloads)) as ex:
        return list(ex.map(one, payloads))


def upload(image_bytes, name="x.png", **data):
    return ({"image": (name, image_bytes, "image/png")}, {k: str(v) for k, v in data.items()}, None)


# ----------------------------------------------------------------------------- the batcher alone
def test_batcher_gathers_concurrent_jobs_and_keeps_each_answer():
    model = FakeModel()
    colours = [(i * 20, 100, 200 - i * 10) for i in range(10)]

    async def main():
        b = Batcher(model, max_batch_size=4, max_wait_ms=200, max_queue=16)
        await b.start()
        images = [PIL.Image.new("RGB", (4, 4), c) for c in colours]
        results = await asyncio.gather(*(b.submit(im, None, 5, f"r{i}") for i, im in enumerate(images)))
        await b.stop()
        return results

    results = asyncio.run(main())
    assert [r.caption for r in results] == [f"colour {r} {g} {b} |  | 5" for r, g, b in colours]
    assert model.calls == [4, 4, 2]
    assert [r.batch_size for r in results] == [4] * 8 + [2] * 2


def test_batcher_size_one_and_groups_by_prompt_and_length():
    model = FakeModel()

    async def main(max_batch):
        b = Batcher(model, max_batch_size=max_batch, max_wait_ms=100, max_queue=16)
        await b.start()
        im = PIL.Image.new("RGB", (4, 4), (1, 2, 3))
        jobs = [(None, 5), ("a", 5), (None, 5), ("a", 7), (None, 5)]
        res = await asyncio.gather(*(b.submit(im, p, n, str(i)) for i, (p, n) in enumerate(jobs)))
        await b.stop()
        return [r.caption for r in res]

    caps = asyncio.run(main(1))
    assert model.calls == [1] * 5
    model.calls.clear()
    assert asyncio.run(main(8)) == caps
    assert model.calls == [3, 1, 1]  # (None, 5) x3 share a call; ("a", 5) and ("a", 7) differ
    assert caps[1] == "colour 1 2 3 | a | 5" and caps[3] == "colour 1 2 3 | a | 7"


def test_batcher_isolates_a_failing_job():
    model = FakeModel()

    async def main():
        b = Batcher(model, max_batch_size=8, max_wait_ms=200, max_queue=16)
        await b.start()
        colours = [(9, 9, 9), (255, 0, 0), (7, 7, 7), (0, 255, 0), (5, 5, 5)]
        out = await asyncio.gather(*(b.submit(PIL.Image.new("RGB", (2, 2), c), None, 3, str(i))
                                     for i, c in enumerate(colours)), return_exceptions=True)
        await b.stop()
        return out, b.stats

    out, stats = asyncio.run(main())
    assert [o.caption for o in (out[0], out[2], out[4])] == ["colour 9 9 9 |  | 3", "colour 7 7 7 |  | 3",
                                                           "colour 5 5 5 |  | 3"]
    assert all(o.batch_size == 1 for o in (out[0], out[2], out[4]))  # re-run alone after the batch failed
    assert isinstance(out[1], ServeError) and out[1].type == "internal_error" and out[1].status == 500
    assert isinstance(out[3], ServeError) and out[3].type == "invalid_input" and out[3].status == 422
    assert stats.failed == 2 and stats.retried_alone == 5 and stats.requests == 3


def test_batcher_bounded_queue_and_drain_on_stop():
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def main():
        b = Batcher(model, max_batch_size=1, max_wait_ms=0, max_queue=2)
        await b.start()
        im = PIL.Image.new("RGB", (2, 2))
        first = asyncio.ensure_future(b.submit(im, None, 1, "0"))
        while not model.entered.is_set():  # the first job is decoding (blocked), the queue is empty
            await asyncio.sleep(0.005)
        queued = [asyncio.ensure_future(b.submit(im, None, 1, str(i))) for i in (1, 2)]
        await asyncio.sleep(0.01)
        assert b.full
        with pytest.raises(ServeError) as e:
            await b.submit(im, None, 1, "3")
        assert e.value.type == "overloaded" and e.value.status == 503 and e.value.retry_after >= 1
        stopping = asyncio.ensure_future(b.stop(timeout=20))
        await asyncio.sleep(0.01)
        with pytest.raises(ServeError) as e:  # stopping: no new work
            await b.submit(im, None, 1, "4")
        assert e.value.type == "not_ready"
        gate.set()
        await stopping
        return [await f for f in [first] + queued]

    res = asyncio.run(main())
    assert [r.caption for r in res] == ["colour 0 0 0 |  | 1"] * 3
    assert model.calls == [1, 1, 1]


def test_batcher_stop_timeout_answers_every_job():
    gate = threading.Event()
    model = FakeModel(gate=gate)

    async def main():
        b = Batcher(model, max_batch_size=1, max_wait_ms=0, max_queue=4)
        await b.start()
        im = PIL.Image.new("RGB", (2, 2))
        jobs = [asyncio.ensure_future(b.submit(im, None, 1, str(i))) for i in range(3)]
        while not model.entered.is_set():
            await asyncio.sleep(0.005)
        await b.stop(timeout=0.1)  # the decode is stuck: nothing may be left waiting forever
        return await asyncio.gather(*jobs, return_exceptions=True)

    try:
        out = asyncio.run(main())
    finally:
        gate.set()
    assert [getattr(o, "type", None) for o in out] == ["not_ready"] * 3


# ----------------------------------------------------------------------------- the HTTP server
def _truncated_png() -> bytes:
    data = png((1, 2, 3), (64, 64))
    return data[: len(data) // 2]


def _bomb_png(width=20000, height=20000) -> bytes:
    """A valid PNG header claiming width x height pixels (a decompression bomb's header), tiny on disk."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


BAD_INPUTS = [
    # (name, request kwargs for httpx.post, expected status, expected error type)
    ("not an image", dict(files={"image": ("a.png", b"hello, I am text", "image/png")}), 400, "not_an_image"),
    ("empty file", dict(files={"image": ("a.png", b"", "image/png")}), 400, "not_an_image"),
    ("truncated png", dict(files={"image": ("a.png", _truncated_png(), "image/png")}), 400, "truncated_image"),
    ("too many pixels", dict(files={"image": ("a.png", _bomb_png(), "image/png")}), 413, "too_many_pixels"),
    ("too many bytes", dict(files={"image": ("a.png", png(size=(8, 8)) + b"\0" * 40_000, "image/png")}), 413,
     "payload_too_large"),
    ("pdf, not an image", dict(files={"image": ("a.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
                                                "application/pdf")}), 400, "not_an_image"),
    ("image format not accepted (PPM)", dict(files={"image": ("a.ppm", b"P6\n2 2\n255\n" + bytes(12), "image/x-ppm")}),
     415, "unsupported_media_type"),
    ("missing image field (multipart)", dict(files={"prompt": (None, "hi")}), 422, "missing_field"),
    ("unknown multipart field", dict(files={"image": ("a.png", png(), "image/png"), "seed": (None, "3")}), 400,
     "invalid_request"),
    ("missing image field (json)", dict(json={"prompt": "describe"}), 422, "missing_field"),
    ("max_new_tokens too large", dict(files={"image": ("a.png", png(), "image/png")}, data={"max_new_tokens": "999"}),
     422, "invalid_field"),
    ("max_new_tokens zero", dict(json={"image": base64.b64encode(png()).decode(), "max_new_tokens": 0}), 422,
     "invalid_field"),
    ("max_new_tokens not a number", dict(files={"image": ("a.png", png(), "image/png")},
                                         data={"max_new_tokens": "many"}), 422, "invalid_field"),
    ("max_new_tokens a string in json", dict(json={"image": base64.b64encode(png()).decode(), "max_new_tokens": "8"}),
     422, "invalid_field"),
    ("bad base64", dict(json={"image": "!!!not base64!!!"}), 400, "invalid_base64"),
    ("base64 of text", dict(json={"image": base64.b64encode(b"just words").decode()}), 400, "not_an_image"),
    ("malformed json", dict(content=b'{"image": ', headers={"content-type": "application/json"}), 400,
     "invalid_request"),
    ("json array", dict(json=[1, 2]), 400, "invalid_request"),
    ("unknown json field", dict(json={"image": base64.b64encode(png()).decode(), "temperature": 2}), 422,
     "invalid_field"),
    ("wrong content type", dict(content=png(), headers={"content-type": "image/png"}), 415, "unsupported_media_type"),
    ("prompt too long", dict(files={"image": ("a.png", png(), "image/png")}, data={"prompt": "x" * 300}), 422,
     "invalid_field"),
    ("body too large", dict(content=b"{" + b" " * 200_000 + b"}", headers={"content-type": "application/json"}), 413,
     "payload_too_large"),
    ("image as a text field", dict(data={"image": "abc"}, files={"prompt": ("p.txt", b"x", "text/plain")}), 400,
     "invalid_request"),
    ("absurdly nested json", dict(content=b"[" * 50_000, headers={"content-type": "application/json"}), 400,
     "invalid_request"),
    ("two image files", dict(files=[("image", ("a.png", png(), "image/png")), ("image", ("b.png", png(), "image/png"))]),
     400, "invalid_request"),
    ("model rejects input", dict(files={"image": ("g.png", png((0, 255, 0)), "image/png")}), 422, "invalid_input"),
]


def test_bad_inputs_get_the_right_4xx_and_the_server_keeps_serving():
    settings = ServeSettings(max_image_bytes=20_000, max_image_pixels=1_000_000, max_new_tokens_limit=16,
                             max_prompt_chars=200, max_wait_ms=1)
    model = FakeModel()
    with serving(create_app(caption_fn=model, settings=settings)) as (url, _), httpx.Client(timeout=30) as c:
        for name, kwargs, status, kind in BAD_INPUTS:
            r = c.post(url + "/v1/captions", **kwargs)
            assert (r.status_code, r.json()["error"]["type"]) == (status, kind), (name, r.text)
            assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
            assert c.get(url + "/health").status_code == 200, name
        assert c.get(url + "/nope").status_code == 404 and c.get(url + "/nope").json()["error"]["type"] == "not_found"
        assert c.get(url + "/v1/captions").status_code == 405
        r = c.post(url + "/v1/captions", files={"image": ("ok.png", png((4, 5, 6)), "image/png")},
                   data={"prompt": "describe", "max_new_tokens": "16"})
        assert r.status_code == 200 and r.json()["caption"] == "colour 4 5 6 | describe | 16"
        assert c.get(url + "/ready").status_code == 200
    assert model.calls == [1, 1]  # only the input the model itself rejected and the good one reached it


def test_json_and_multipart_agree_and_request_ids(caplog):
    model = FakeModel()
    data = png((40, 50, 60), (33, 17))
    with caplog.at_level(logging.INFO, logger="mmspec.serve"):
        with serving(create_app(caption_fn=model)) as (url, _), httpx.Client(timeout=30) as c:
            a = c.post(url + "/v1/captions", files={"image": ("a.png", data, "image/png")},
                       headers={"X-Request-ID": "client-id-42"})
            b = c.post(url + "/v1/captions", json={"image": "data:image/png;base64," + base64.b64encode(data).decode(),
                                                   "max_new_tokens": 32})
            d = c.post(url + "/v1/captions", json={"image": base64.b64encode(data).decode()},
                       headers={"X-Request-ID": "bad id with spaces"})
    assert a.status_code == b.status_code == d.status_code == 200
    assert a.json()["caption"] == b.json()["caption"] == "colour 40 50 60 |  | 32"
    assert a.headers["x-request-id"] == a.json()["request_id"] == "client-id-42"
    assert len(b.headers["x-request-id"]) == 32 and b.json()["request_id"] == b.headers["x-request-id"]
    assert d.headers["x-request-id"] != "bad id with spaces"
    logged = caplog.text
    assert "request_id=client-id-42" in logged and f"request_id={b.headers['x-request-id']}" in logged
    assert "decoded batch of 1" in logged


def test_failure_inside_the_model_fails_alone():
    model = FakeModel(delay=0.05)
    settings = ServeSettings(max_batch_size=4, max_wait_ms=1500)  # the batch closes when the 4th arrives
    colours = [(1, 1, 1), (255, 0, 0), (3, 3, 3), (4, 4, 4)]
    with serving(create_app(caption_fn=model, settings=settings)) as (url, _):
        rs = post_many(url, [upload(png(c)) for c in colours])
        with httpx.Client(timeout=30) as c:
            assert c.get(url + "/health").status_code == 200
            after = c.post(url + "/v1/captions", files={"image": ("a.png", png((8, 8, 8)), "image/png")})
    assert [r.status_code for r in rs] == [200, 500, 200, 200]
    assert rs[1].json()["error"]["type"] == "internal_error"
    assert [rs[i].json()["caption"].split(" |")[0] for i in (0, 2, 3)] == ["colour 1 1 1", "colour 3 3 3",
                                                                          "colour 4 4 4"]
    assert after.status_code == 200
    assert model.calls == [4, 1, 1, 1, 1, 1]  # the batch of 4 failed, each re-ran alone, then the later request


def test_full_queue_answers_503_with_retry_after_and_recovers():
    gate = threading.Event()
    model = FakeModel(gate=gate)
    settings = ServeSettings(max_batch_size=1, max_wait_ms=0, max_queue=2)
    from concurrent.futures import ThreadPoolExecutor

    with serving(create_app(caption_fn=model, settings=settings)) as (url, _), httpx.Client(timeout=30) as c:
        with ThreadPoolExecutor(3) as ex:
            first = ex.submit(post_many, url, [upload(png((1, 1, 1)))])
            assert model.entered.wait(10)  # decoding, blocked on the gate
            queued = ex.submit(post_many, url, [upload(png((2, 2, 2))), upload(png((3, 3, 3)))])
            deadline = time.monotonic() + 10
            while c.get(url + "/ready").json()["queue_depth"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            ready = c.get(url + "/ready")
            assert ready.status_code == 503 and ready.json()["reason"] == "queue full"
            refused = c.post(url + "/v1/captions", files={"image": ("a.png", png(), "image/png")})
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "overloaded"
            assert int(refused.headers["retry-after"]) >= 1
            assert c.get(url + "/health").status_code == 200  # liveness is not readiness
            gate.set()
            done = first.result(20) + queued.result(20)
        assert [r.status_code for r in done] == [200, 200, 200]
        assert c.get(url + "/ready").status_code == 200
        r = c.post(url + "/v1/captions", files={"image": ("a.png", png((9, 9, 9)), "image/png")})
        assert r.status_code == 200 and r.json()["caption"].startswith("colour 9 9 9")


def test_ready_waits_for_the_model_and_shutdown_finishes_in_flight_requests():
    loaded = threading.Event()
    gate = threading.Event()
    model = FakeModel(gate=gate)

    class Pipe:
        def __call__(self, images, prompt=None, max_new_tokens=32, batch_size=8, progress=None, **kw):
            return type("Out", (), {"captions": model(images, prompt, max_new_tokens)})()

    def loader():  # what the CLI's loader does with CaptionPipeline.from_pretrained, gated
        assert loaded.wait(20)
        return Pipe()

    app = create_app(loader=loader, settings=ServeSettings(max_batch_size=1, max_wait_ms=0))
    with serving(app) as (url, server), httpx.Client(timeout=30) as c:
        assert c.get(url + "/health").status_code == 200
        r = c.get(url + "/ready")
        assert r.status_code == 503 and r.json()["reason"] == "model loading" and "retry-after" in r.headers
        early = c.post(url + "/v1/captions", files={"image": ("a.png", png(), "image/png")})
        assert early.status_code == 503 and early.json()["error"]["type"] == "not_ready"
        loaded.set()
        deadline = time.monotonic() + 10
        while c.get(url + "/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as ex:
            inflight = ex.submit(post_many, url, [upload(png((i, i, i))) for i in range(3)])
            assert model.entered.wait(10)  # one request decoding (blocked), two waiting in the queue
            deadline = time.monotonic() + 10
            while c.get(url + "/ready").json()["queue_depth"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            server.should_exit = True  # SIGTERM does this: stop accepting, let in-flight requests finish
            time.sleep(0.3)
            gate.set()
            rs = inflight.result(20)
    assert [r.status_code for r in rs] == [200, 200, 200]
    assert [r.json()["caption"].split(" |")[0] for r in rs] == [f"colour {i} {i} {i}" for i in range(3)]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def test_openapi_documents_both_request_forms():
    with serving(create_app(caption_fn=FakeModel())) as (url, _), httpx.Client() as c:
        spec = c.get(url + "/openapi.json").json()
        assert c.get(url + "/docs").status_code == 200
    op = spec["paths"]["/v1/captions"]["post"]
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"200", "400", "413", "415", "422", "503"} <= set(op["responses"])
    assert "/health" in spec["paths"] and "/ready" in spec["paths"]


def test_load_script_reports_rates_and_refuses_remote_hosts():
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1") and is_loopback("http://[::1]:8")
    assert not is_loopback("http://10.0.0.1:8000") and not is_loopback("http://example.com")
    assert not is_loopback("http://127.0.0.1.example.com") and not is_loopback("http://localhost.example.com:1")
    from mmspec.serve import load

    with pytest.raises(SystemExit) as e:
        load.main(["--url", "http://10.1.2.3:8000", "--requests", "1"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_load("http://192.0.2.1:80", requests=1))
    model = FakeModel(delay=0.01)
    with serving(create_app(caption_fn=model, settings=ServeSettings(max_batch_size=4, max_wait_ms=20))) as (url, _):
        res = asyncio.run(run_load(url, requests=24, concurrency=6, duration=30, images=sample_images(3, 16)))
    assert res["sent"] == res["ok"] == 24 and res["errors"] == {}
    assert res["requests_per_s"] > 0 and res["latency_ms"]["p50"] <= res["latency_ms"]["p99"]
    assert sum(model.calls) == 24 and res["mean_batch_size"] > 1


# ----------------------------------------------------------------------------- the real pipeline, end to end
@pytest.fixture(scope="module")
def caption_pipeline():
    from mmspec.pipelines.caption import CaptionPipeline

    from vlm_fixtures import tiny_llava

    model, processor = tiny_llava(seed=0)
    return CaptionPipeline(model, processor)


def test_concurrent_requests_get_the_caption_the_pipeline_gives_each_image_alone(caption_pipeline):
    images = sample_images(8, 32, seed=1)
    prompts = [None, "what is in this picture", None, None, "what is in this picture", None, None, None]
    expected = [caption_pipeline(PIL.Image.open(io.BytesIO(b)), prompt=p, max_new_tokens=12).captions[0]
                for b, p in zip(images, prompts)]
    assert len(set(expected)) >= 3  # the images really get different captions, so a mix-up would show
    settings = ServeSettings(max_batch_size=8, max_wait_ms=1000, max_new_tokens_limit=16)
    with serving(create_app(caption_pipeline, settings=settings)) as (url, _):
        payloads = [upload(b, max_new_tokens=12, **({} if p is None else {"prompt": p}))
                    for b, p in zip(images, prompts)]
        rs = post_many(url, payloads)
    assert [r.status_code for r in rs] == [200] * 8, [r.text for r in rs]
    assert [r.json()["caption"] for r in rs] == expected
    with serving(create_app(caption_pipeline, settings=settings)) as (url, _), httpx.Client(timeout=30) as c:
        for prompt in ("<image> describe", "describe <eos>"):  # would ask for a second image / end the prompt
            r = c.post(url + "/v1/captions", files={"image": ("a.png", images[0], "image/png")}, data={"prompt": prompt})
            assert r.status_code == 422 and "special token" in r.json()["error"]["message"], r.text
    sizes = [r.json()["batch_size"] for r in rs]
    assert max(sizes) > 1, sizes  # they were decoded together, not one by one
    assert all(sizes[i] <= 2 for i in (1, 4)) and all(sizes[i] <= 6 for i in (0, 2, 3, 5, 6, 7))  # by prompt


def test_cli_flags_and_errors(tmp_path, capsys):
    from mmspec.generation import METHODS
    from mmspec.serve import cli

    assert set(cli.DECODINGS) == set(METHODS)
    assert cli.main([]) == 2
    assert cli.main(["translate"]) == 2
    assert cli.main(["caption", "--help"]) == 0
    assert "--max-batch-size" in capsys.readouterr().out
    assert cli.main(["caption", "--model", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["caption", "--model", str(tmp_path), "--max-batch-size", "0"]) == 2
    assert cli.main(["caption", "--model", str(tmp_path), "--decoding", "draft"]) == 2
    assert "needs --draft" in capsys.readouterr().err
    if cli._zoo_loader() is None:
        assert cli.main(["caption", "--model", "zoo"]) == 2
        assert "no bundled captioner" in capsys.readouterr().err
    else:
        assert cli.main(["caption", "--model", "zoo", "--draft", str(tmp_path)]) == 2
        assert "bundled draft" in capsys.readouterr().err


def test_serve_caption_command_loads_a_saved_pipeline_and_serves(caption_pipeline, tmp_path):
    """What `mmspec serve caption --model DIR ...` builds (flags -> settings -> loader -> uvicorn server),
    run in a thread: /ready turns 200 once the saved pipeline is loaded and captions match it."""
    from mmspec.pipelines.caption import CaptionPipeline
    from mmspec.serve.cli import make_server, parse_args

    caption_pipeline.save_pretrained(tmp_path / "captioner")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = parse_args(["--model", str(tmp_path / "captioner"), "--host", "127.0.0.1", "--port", str(port),
                       "--max-batch-size", "4", "--max-wait-ms", "50", "--max-new-tokens-limit", "8",
                       "--decoding", "jacobi"])
    # Loaded before the server thread starts its own load: transformers' from_pretrained patches module
    # constructors process-wide while it loads, so two concurrent loads can leave parameters on `meta`.
    reference = CaptionPipeline.from_pretrained(tmp_path / "captioner")  # float32, as the server loads it
    server, exit_code = make_server(args)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    images = [png((200, 30, 90), (40, 40)), png((10, 220, 90), (24, 50)), sample_images(1, 32, seed=5)[0]]
    expected = [reference(b, max_new_tokens=8, decoding="ar").captions[0] for b in images]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert thread.is_alive()
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.05)
        rs = post_many(url, [upload(b, max_new_tokens=8) for b in images])
        assert [r.json()["caption"] for r in rs] == expected
        assert {r.json()["model"] for r in rs} == {"captioner"}
        too_many = httpx.post(url + "/v1/captions", files={"image": ("a.png", images[0], "image/png")},
                              data={"max_new_tokens": "9"})
        assert too_many.status_code == 422 and too_many.json()["error"]["type"] == "invalid_field"
    finally:
        server.should_exit = True
        thread.join(20)
    assert not thread.is_alive() and exit_code == [0]


def test_replicas_behind_a_round_robin_balancer_are_interchangeable():
    """Two replicas share nothing: an overloaded one answers 503 + Retry-After, a balancer that moves on to
    the next replica gets the same caption there, and the request id follows the request."""
    gate = threading.Event()
    busy, free = FakeModel(gate=gate), FakeModel()
    settings = ServeSettings(max_batch_size=1, max_wait_ms=0, max_queue=1)
    with serving(create_app(caption_fn=busy, settings=settings)) as (url_a, _), \
            serving(create_app(caption_fn=free, settings=settings)) as (url_b, _), httpx.Client(timeout=30) as c:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as ex:
            blocked = [ex.submit(post_many, url_a, [upload(png((1, 0, 0)))])]
            assert busy.entered.wait(10)  # A decodes one request (blocked) ...
            blocked.append(ex.submit(post_many, url_a, [upload(png((2, 0, 0)))]))
            deadline = time.monotonic() + 10
            while c.get(url_a + "/ready").status_code != 503:  # ... and has one queued: full
                assert time.monotonic() < deadline
                time.sleep(0.01)

            def balanced(image, rid):
                for url in (url_a, url_b):  # round robin starting at A; skip a replica that says 503
                    r = c.post(url + "/v1/captions", files={"image": ("a.png", image, "image/png")},
                               headers={"X-Request-ID": rid})
                    if r.status_code != 503:
                        return url, r
                    assert int(r.headers["retry-after"]) >= 1
                raise AssertionError("every replica refused")

            served = [balanced(png((5, 6, i)), f"lb-{i}") for i in range(3)]
            gate.set()
            assert [f.result(20)[0].status_code for f in blocked] == [200, 200]
        assert [u for u, _ in served] == [url_b] * 3
        assert [r.json()["request_id"] for _, r in served] == ["lb-0", "lb-1", "lb-2"]
        direct = c.post(url_a + "/v1/captions", files={"image": ("a.png", png((5, 6, 0)), "image/png")})
        assert direct.json()["caption"] == served[0][1].json()["caption"]  # A, recovered, answers the same
