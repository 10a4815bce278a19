"""The OpenAI-compatible HTTP app (FastAPI on Starlette, served by uvicorn) and the web page.

Routes:

- ``POST /v1/chat/completions``: OpenAI chat completions, with ``stream: true`` as server-sent
  events (``chat.completion.chunk`` objects, then ``data: [DONE]``);
- ``GET /v1/models``: the one served model;
- ``GET /health``: ``{"status": "ok", ...}`` with queue counters and the DICOM window presets;
- ``GET /``: the web page (``medtune/serve/static/index.html``, no external resources).

Every error is an OpenAI error object (``{"error": {"message", "type", "param", "code"}}``) with
a 4xx/5xx status; the server keeps serving after any of them. With ``api_key`` set, ``/v1/*``
needs ``Authorization: Bearer <api_key>`` (401 otherwise); ``/`` and ``/health`` stay open (the
page asks for the key).
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medtune.data.errors import DataError
from medtune.data.images import NAMED_WINDOWS
from medtune.serve.batcher import Batcher, Pending
from medtune.serve.images import decode_image
from medtune.serve.protocol import APIError, ChatRequest, Limits, bad, parse_chat_request
from medtune.serve.text import TextStream


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    too_big = APIError(
        413, f"request body larger than {limit} bytes", param=None, code="request_too_large"
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    engine,
    *,
    limits: Limits | None = None,
    max_batch_size: int = 8,
    max_wait_ms: float = 10.0,
    max_queue: int = 64,
    api_key: str | None = None,
) -> FastAPI:
    """Build the app around a loaded :class:`~medtune.serve.engine.Engine`.

    Args:
        engine: the model.
        limits: request bounds (body size, images, pixels, default ``max_tokens``).
        max_batch_size, max_wait_ms, max_queue: see :class:`~medtune.serve.batcher.Batcher`.
        api_key: when set, the Bearer token ``/v1/*`` requires.

    Returns:
        The FastAPI app (``app.state.batcher`` holds the batcher once started).
    """
    limits = limits or Limits()
    batcher = Batcher(
        engine, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="medtune serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return _error(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _bug(_request: Request, e: Exception) -> JSONResponse:
        message = f"internal error ({type(e).__name__}: {e})"
        return _error(APIError(500, message, type="server_error", code="internal_error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key (send Authorization: Bearer <key>)",
                code="invalid_api_key",
            )

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = resources.files("medtune.serve").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": engine.name,
            "images": engine.takes_images,
            "context_length": engine.context_len,
            "dicom_windows": {k: list(v) for k, v in NAMED_WINDOWS.items()},
            **batcher.stats(),
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        entry = {"id": engine.name, "object": "model", "created": 0, "owned_by": "medtune"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        check_key(request)
        raw = await read_body(request, limits.max_body_bytes)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            raise bad(f"the request body is not valid JSON ({e})", code="invalid_json") from None
        decode = partial(decode_image, max_pixels=limits.max_image_pixels)
        # image decoding and tokenizing are CPU work: keep them off the event loop
        req: ChatRequest = await run_in_threadpool(
            parse_chat_request,
            body,
            limits=limits,
            decode_image=decode,
            takes_images=engine.takes_images,
        )
        pending = _pending(engine, req, limits)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        batcher.submit(pending)
        stream = TextStream(engine.decode, req.stop, pending.max_tokens)
        prompt_tokens = pending.prompt_tokens
        if req.stream:
            events = _sse(pending, stream, request_id, engine.name, req.include_usage)
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            async for _ in _pieces(pending, stream):
                pass
        finally:
            pending.cancelled = True  # a no-op once it ran; drops it if the client went away
        return JSONResponse(
            {
                "id": request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": engine.name,
                "system_fingerprint": None,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": stream.text},
                        "logprobs": None,
                        "finish_reason": stream.finish_reason,
                    }
                ],
                "usage": _usage(prompt_tokens, len(stream.ids)),
            }
        )

    return app


def _pending(engine, req: ChatRequest, limits: Limits) -> Pending:
    """Check the prompt against the context and fix ``max_tokens``."""
    try:
        n_prompt = engine.prompt_tokens(req.sample)
    except DataError as e:
        if getattr(e, "reason", "") == "too long":
            raise bad(
                f"the prompt is longer than the model's context of {engine.context_len} tokens",
                "messages",
                "context_length_exceeded",
            ) from None
        raise bad(str(e), "messages") from None
    room = engine.context_len - n_prompt
    if room < 1:
        raise bad(
            f"the prompt has {n_prompt} tokens; the model's context is {engine.context_len}",
            "messages",
            "context_length_exceeded",
        )
    if req.max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif req.max_tokens > room:
        raise bad(
            f"max_tokens={req.max_tokens} plus the prompt's {n_prompt} tokens exceed the "
            f"model's context of {engine.context_len} tokens",
            "max_tokens",
            "context_length_exceeded",
        )
    else:
        max_tokens = req.max_tokens
    pending = Pending(
        req.sample,
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
    )
    pending.prompt_tokens = n_prompt
    return pending


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _pieces(pending: Pending, stream: TextStream):
    """Text pieces of one request's answer as its tokens arrive; raises on a failed batch."""
    while not stream.done:
        kind, value = await pending.events.get()
        if kind == "tokens":
            piece = stream.feed(value)
        elif kind == "done":
            # the answer's ids are authoritative: feed any that on_tokens did not report
            piece = stream.feed(value.token_ids[len(stream.ids) :])
            piece += stream.close(value.finish_reason)
        else:
            if isinstance(value, DataError):
                raise bad(str(value), "messages")
            raise value
        if piece:
            yield piece


async def _sse(pending: Pending, stream: TextStream, rid: str, model: str, include_usage: bool):
    """Server-sent events as OpenAI sends them: a role chunk, content chunks, a finish chunk,
    optionally a usage chunk, then ``[DONE]``."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for piece in _pieces(pending, stream):
                yield chunk({"content": piece})
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception as e:  # the status line is already sent
            err = APIError(500, f"internal error ({type(e).__name__}: {e})", type="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
        else:
            yield chunk({}, stream.finish_reason)
            if include_usage:
                body = json.loads(chunk({})[6:])
                body["choices"] = []
                body["usage"] = _usage(pending.prompt_tokens, len(stream.ids))
                yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        pending.cancelled = True
