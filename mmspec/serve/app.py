"""The captioning API as a FastAPI application.

Routes:
    POST /v1/captions   one image (multipart upload or base64 JSON), optional ``prompt`` and
                        ``max_new_tokens`` -> ``{"caption": ..., "request_id": ..., ...}``
    GET  /health        liveness: the process answers (200 while it runs)
    GET  /ready         readiness: the model is loaded, the batcher runs, the queue has room (else 503)
    GET  /docs, /openapi.json   the OpenAPI description

Requests are checked completely (body size while reading, content type, fields, image decode and
limits) before they enter the batcher's queue, so bad input is a 4xx and never reaches the model. Each
request carries an id (the client's ``X-Request-ID`` if it is sane, else a new one), echoed in the
response header and error bodies and written in every log line about the request. The app keeps no
state outside the process and writes no files: replicas behind a load balancer are independent.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from .batcher import Batcher
from .errors import ERROR_TYPES, ServeError
from .images import ACCEPTED_FORMATS, decode_base64, decode_image

log = logging.getLogger("mmspec.serve")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("mmspec_request_id", default="-")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_FIELD_BYTES = 64 * 1024  # room for the non-image fields of a body


@dataclass
class ServeSettings:
    """Limits and batching of one server process (the ``mmspec serve caption`` flags).

    Attributes:
        max_batch_size: most requests decoded together (1 turns dynamic batching off).
        max_wait_ms: how long the first request of a batch waits for batch-mates.
        max_queue: most requests waiting for the model; beyond it the answer is 503 + Retry-After.
        max_new_tokens_limit: largest ``max_new_tokens`` a request may ask for.
        default_max_new_tokens: used when a request gives none (capped by the limit).
        max_image_bytes: largest encoded image accepted (bytes, before base64).
        max_image_pixels: largest width * height accepted (checked from the header before decoding).
        max_prompt_chars: longest ``prompt`` accepted.
        decoding: the pipeline's decoding method for every request (None: the pipeline's default).
        model_name: reported in responses.
    """

    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_new_tokens_limit: int = 64
    default_max_new_tokens: int = 32
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int = 2000
    decoding: Optional[str] = None
    model_name: str = "caption"

    def __post_init__(self):
        for name in ("max_batch_size", "max_queue", "max_new_tokens_limit", "max_image_bytes", "max_image_pixels",
                     "max_prompt_chars", "default_max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body read: the image as base64 plus the other fields."""
        return math.ceil(self.max_image_bytes / 3) * 4 + _FIELD_BYTES


# ----------------------------------------------------------------------------- schemas (OpenAPI)
class CaptionJSONRequest(BaseModel):
    """The JSON form of a caption request."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="the image file's bytes, base64 (a data:image/...;base64, URL is fine)")
    prompt: Optional[str] = Field(None, description="instruction for the captioner; the model's default if absent")
    max_new_tokens: Optional[int] = Field(None, description="most tokens to generate, 1..--max-new-tokens-limit")


class CaptionResponse(BaseModel):
    caption: str = Field(description="the generated caption")
    request_id: str
    model: str
    max_new_tokens: int
    batch_size: int = Field(description="requests decoded together with this one (1: alone)")
    queue_ms: float = Field(description="time spent waiting for the model")
    decode_ms: float = Field(description="wall time of the batched decode that produced the caption")


class ErrorBody(BaseModel):
    type: str = Field(description="stable error name: " + ", ".join(ERROR_TYPES))
    message: str
    request_id: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorBody


_CAPTION_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["image"],
            "properties": {
                "image": {"type": "string", "format": "binary",
                          "description": f"the image file ({', '.join(ACCEPTED_FORMATS)})"},
                "prompt": {"type": "string"},
                "max_new_tokens": {"type": "integer", "minimum": 1},
            }}},
        "application/json": {"schema": CaptionJSONRequest.model_json_schema()},
    },
}
_ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": "; ".join(
    f"`{t}`: {why}" for t, (s, why) in ERROR_TYPES.items() if s == status)}
    for status in sorted({s for s, _ in ERROR_TYPES.values()}) if status not in (404, 405)}


# ----------------------------------------------------------------------------- request ids and access log
class RequestIdMiddleware:
    """Gives every request an id (the client's ``X-Request-ID`` when sane, else a new uuid), puts it in
    ``request_id_var`` for log lines, echoes it in the ``X-Request-ID`` response header, and writes one
    access log line per request with the id, status and time."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            level = logging.DEBUG if scope["path"] in ("/health", "/ready") else logging.INFO  # probes are frequent
            log.log(level, '%s %s %d %.1fms [request_id=%s]', scope["method"], scope["path"], status[0],
                    (time.perf_counter() - start) * 1e3, rid)
            request_id_var.reset(token)


def _error_response(err: ServeError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(err.body(request_id_var.get()), status_code=err.status, headers=headers)


# ----------------------------------------------------------------------------- reading a request
async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing with 413 as soon as more than ``limit`` bytes arrive (or are announced)."""
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise ServeError("payload_too_large", f"the request body is {announced} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError("payload_too_large", f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_request(request: Request, settings: ServeSettings):
    """(image bytes, prompt, max_new_tokens as given or None) from a multipart or JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json"):
        raise ServeError("unsupported_media_type", f"Content-Type must be multipart/form-data or application/json, "
                         f"got {ctype or 'none'!r}")
    body = await _read_body(request, settings.max_body_bytes)
    if ctype == "application/json":
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            raise ServeError("invalid_request", f"the body is not valid JSON ({e})") from None
        if not isinstance(payload, dict):
            raise ServeError("invalid_request", "the JSON body must be an object with an `image` field")
        if "image" not in payload:
            raise ServeError("missing_field", "the JSON body has no `image` field (base64 of the image file)")
        try:
            req = CaptionJSONRequest.model_validate(payload, strict=True)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ServeError("invalid_field", f"`{where}`: {first['msg']}") from None
        return decode_base64(req.image, settings.max_image_bytes), req.prompt, req.max_new_tokens
    async def replay():  # the form parser reads the body already taken in, from memory
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8, max_part_size=_FIELD_BYTES)
    except (MultiPartException, StarletteHTTPException) as e:  # Starlette reports parse errors as HTTP 400
        raise ServeError("invalid_request", f"the multipart body is malformed or has too many parts: "
                         f"{getattr(e, 'detail', None) or getattr(e, 'message', e)}") from None
    try:
        image = form.get("image")
        if image is None:
            raise ServeError("missing_field", "the form has no `image` file part")
        unknown = sorted(set(form.keys()) - {"image", "prompt", "max_new_tokens"})
        if unknown:
            raise ServeError("invalid_request", f"unknown form fields {unknown}; expected image, prompt, max_new_tokens")
        if not isinstance(image, UploadFile):
            raise ServeError("invalid_request", "`image` must be a file part (with a filename), not a text field")
        data = await image.read()
        prompt = form.get("prompt")
        mnt = form.get("max_new_tokens")
        if isinstance(prompt, UploadFile) or isinstance(mnt, UploadFile):
            raise ServeError("invalid_request", "`prompt` and `max_new_tokens` must be text fields, not files")
        if mnt is not None:
            if not re.fullmatch(r"\s*[+-]?[0-9]{1,9}\s*", mnt):
                raise ServeError("invalid_field", f"`max_new_tokens` must be an integer, got {mnt[:40]!r}")
            mnt = int(mnt)
        return data, prompt, mnt
    finally:
        await form.close()


def special_tokens(pipeline) -> tuple:
    """The strings a prompt may not contain: the tokenizer's special tokens and the processor's image token
    (a prompt holding ``<image>`` would ask for a second image, one holding ``<eos>`` would end the prompt)."""
    processor = getattr(pipeline, "processor", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for name in ("image_token", "video_token", "boi_token", "eoi_token"):
        token = getattr(processor, name, None)
        if isinstance(token, str) and token:
            found.add(token)
    return tuple(sorted(t for t in found if t))


def _check_fields(prompt, max_new_tokens, settings: ServeSettings, forbidden=()):
    if max_new_tokens is None:
        max_new_tokens = min(settings.default_max_new_tokens, settings.max_new_tokens_limit)
    elif not 1 <= max_new_tokens <= settings.max_new_tokens_limit:
        raise ServeError("invalid_field", f"`max_new_tokens` must be in [1, {settings.max_new_tokens_limit}], "
                         f"got {max_new_tokens}")
    if prompt is not None and len(prompt) > settings.max_prompt_chars:
        raise ServeError("invalid_field", f"`prompt` is {len(prompt)} characters; the limit is {settings.max_prompt_chars}")
    if prompt is not None:
        bad = [t for t in forbidden if t in prompt]
        if bad:
            raise ServeError("invalid_field", f"`prompt` must be plain text; it contains the special token(s) {bad}")
        if not prompt.strip():
            prompt = None
    return prompt, max_new_tokens


# ----------------------------------------------------------------------------- the app
def pipeline_caption_fn(pipeline, decoding: Optional[str] = None) -> Callable:
    """``(images, prompt, max_new_tokens) -> captions`` calling a ``CaptionPipeline`` once for the batch."""

    def caption(images, prompt, max_new_tokens):
        kw = {} if decoding is None else {"decoding": decoding}
        out = pipeline(images, prompt=prompt, max_new_tokens=max_new_tokens, batch_size=len(images),
                       progress=False, **kw)
        return out.captions

    return caption


def create_app(pipeline=None, *, loader: Optional[Callable[[], Any]] = None,
               settings: Optional[ServeSettings] = None, caption_fn: Optional[Callable] = None,
               on_load_error: Optional[Callable[[BaseException], None]] = None) -> FastAPI:
    """Build the captioning app.

    Give exactly one of ``pipeline`` (a loaded ``CaptionPipeline``), ``loader`` (a callable returning
    one, run in the worker thread after startup; ``/ready`` answers 503 until it returns) or
    ``caption_fn`` (``(images, prompt, max_new_tokens) -> list[str]``, for custom backends).
    ``on_load_error`` is called if ``loader`` raises (the CLI uses it to exit non-zero).
    """
    if sum(x is not None for x in (pipeline, loader, caption_fn)) != 1:
        raise ValueError("give exactly one of pipeline=, loader= or caption_fn=")
    settings = settings or ServeSettings()
    state = {"caption_fn": caption_fn or (pipeline_caption_fn(pipeline, settings.decoding) if pipeline else None),
             "forbidden": special_tokens(pipeline) if pipeline is not None else (),
             "load_error": None, "shutting_down": False}
    batcher = Batcher(lambda *a: state["caption_fn"](*a), settings.max_batch_size, settings.max_wait_ms,
                      settings.max_queue)

    async def load_in_background():
        try:
            pipe = await asyncio.get_running_loop().run_in_executor(batcher.executor, loader)
            state["forbidden"] = special_tokens(pipe)
            state["caption_fn"] = pipeline_caption_fn(pipe, settings.decoding)
            log.info("model loaded; ready")
        except asyncio.CancelledError:  # shut down while loading
            raise
        except BaseException as e:  # noqa: BLE001 - reported, and the CLI exits
            state["load_error"] = f"{type(e).__name__}: {e}"
            log.error("loading the model failed: %s", state["load_error"], exc_info=True)
            if on_load_error is not None:
                on_load_error(e)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        load_task = asyncio.get_running_loop().create_task(load_in_background()) if loader else None
        try:
            yield
        finally:
            # uvicorn calls this after it stopped accepting connections and in-flight requests finished.
            state["shutting_down"] = True
            if load_task is not None and not load_task.done():
                load_task.cancel()
            await batcher.stop(timeout=30)
            log.info("batcher stopped: %d batches, %d requests, mean batch %.2f", batcher.stats.batches,
                     batcher.stats.requests, batcher.stats.mean_batch_size)

    app = FastAPI(title="mmspec captioning", version="1", lifespan=lifespan,
                  description="Image captioning with lossless speculative decoding and dynamic batching. "
                  "Errors are JSON `{\"error\": {\"type\", \"message\", \"request_id\"}}`.")
    app.state.batcher = batcher
    app.state.settings = settings
    app.add_middleware(RequestIdMiddleware)

    def not_ready_reason() -> Optional[str]:
        if state["shutting_down"] or batcher.closing:
            return "shutting down"
        if state["load_error"]:
            return f"model failed to load ({state['load_error']})"
        if state["caption_fn"] is None:
            return "model loading"
        if not batcher.running:
            return "batcher not running"
        return None

    @app.exception_handler(ServeError)
    async def serve_error(request, exc: ServeError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        resp = _error_response(ServeError(kind, str(exc.detail)))
        resp.status_code = exc.status_code
        return resp

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return _error_response(ServeError("invalid_request", str(exc.errors()[:1])))

    @app.get("/health", summary="Liveness: the process is up")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded and the queue has room",
             responses={503: {"description": "loading, shutting down, or the queue is full"}})
    async def ready():
        reason = not_ready_reason() or ("queue full" if batcher.full else None)
        body = {"status": "ready" if reason is None else "not_ready", "reason": reason,
                "queue_depth": batcher.depth, "max_queue": batcher.max_queue,
                "batches": batcher.stats.batches, "requests": batcher.stats.requests,
                "failed": batcher.stats.failed, "mean_batch_size": round(batcher.stats.mean_batch_size, 3)}
        headers = {"Retry-After": str(batcher.retry_after())} if reason else None
        return JSONResponse(body, status_code=200 if reason is None else 503, headers=headers)

    @app.post("/v1/captions", response_model=CaptionResponse, summary="Caption one image",
              responses=_ERROR_RESPONSES, openapi_extra={"requestBody": _CAPTION_BODY})
    async def captions(request: Request):
        """Caption one image. Send it as a multipart file part `image` (with optional text fields `prompt`
        and `max_new_tokens`) or as JSON `{"image": "<base64>", "prompt": ..., "max_new_tokens": ...}`."""
        rid = request_id_var.get()
        try:
            reason = not_ready_reason()
            if reason is not None:
                raise ServeError("not_ready", f"not ready: {reason}", retry_after=batcher.retry_after())
            if batcher.full:  # refuse before reading a body we could not queue
                raise ServeError("overloaded", f"the request queue is full ({batcher.max_queue} waiting); retry later",
                                 retry_after=batcher.retry_after())
            data, prompt, max_new_tokens = await _parse_request(request, settings)
            prompt, max_new_tokens = _check_fields(prompt, max_new_tokens, settings, state["forbidden"])
            image = await run_in_threadpool(decode_image, data, settings.max_image_bytes, settings.max_image_pixels)
            result = await batcher.submit(image, prompt, max_new_tokens, rid)
        except ServeError as e:
            return _error_response(e)
        except ClientDisconnect:
            log.info("client disconnected [request_id=%s]", rid)
            return JSONResponse({}, status_code=499)
        except Exception as e:  # a bug: answer 500 with the id, log the traceback, keep serving
            log.exception("unexpected error [request_id=%s]", rid)
            return _error_response(ServeError("internal_error", f"unexpected server error ({type(e).__name__}); "
                                              f"see the server log under request id {rid}"))
        return CaptionResponse(caption=result.caption, request_id=rid, model=settings.model_name,
                               max_new_tokens=max_new_tokens, batch_size=result.batch_size,
                               queue_ms=round(result.queue_ms, 3), decode_ms=round(result.decode_ms, 3))

    return app
