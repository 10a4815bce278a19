"""OpenAI chat-completions requests -> a :class:`ChatRequest`, and the error object of the API.

Only what the server can honour is accepted: ``n=1``, no tools, no logprobs, no penalties. Fields
the OpenAI API knows but that do not change the answer (``user``, ``metadata``, ``store``, ...) and
unknown fields are ignored, as OpenAI-compatible servers do; a known field of the wrong type is an
HTTP 400 naming it (``param``). Images come only from the request itself: ``image_url`` content
parts must be ``data:`` URLs (see :mod:`medtune.serve.images`); the server never fetches a URL or
opens a path a client names.

medtune extension: ``window`` (a name in :data:`medtune.data.images.NAMED_WINDOWS` or
``[center, width]``) windows the request's DICOM images, as ``window`` does in the recipes; with
the official client pass it in ``extra_body``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from medtune.data.images import NAMED_WINDOWS
from medtune.data.sample import IMAGE_MARKER, Message, Sample

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: HTTP status (400 bad request, 401, 413, 503, ...).
        message: one line saying what is wrong and what is expected.
        type: OpenAI error type (``invalid_request_error``, ``server_error``, ...).
        param: the request field at fault (dotted / indexed path), or None.
        code: a short machine-readable code, or None.
        headers: extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """An HTTP 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


@dataclass
class Limits:
    """Bounds on what one request may ask (see the ``serve`` recipe's config)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_images: int = 4
    max_image_pixels: int = 4096 * 4096
    max_messages: int = 64
    max_stop: int = 4
    default_max_tokens: int = 256


@dataclass
class ChatRequest:
    """One parsed chat-completions request.

    Attributes:
        sample: the conversation with its decoded images (PIL) and ``<image>`` markers where the
            image parts were.
        model: the ``model`` field as sent.
        max_tokens: the cap on generated tokens, or None (the server's default, within context).
        temperature: 0 = greedy.
        top_p: nucleus mass, or None.
        stop: strings that end the answer (not included in it).
        seed: the sampling seed, or None.
        stream: answer as server-sent events.
        include_usage: ``stream_options.include_usage``: a last chunk with ``usage``.
    """

    sample: Sample
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, key: str, lo: float, hi: float, *, integer: bool = False) -> Any:
    """``body[key]`` (None when absent or null) checked for type and range."""
    value = body.get(key)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "an integer" if integer else "a number"
        raise bad(f"'{key}' must be {what}, got {type(value).__name__}", key, "invalid_type")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise bad(f"'{key}' must be between {lo:g} and {hi:g}, got {value}", key, "invalid_value")
    return value


def _window(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in NAMED_WINDOWS:
            raise bad(
                f"'window' must be one of {sorted(NAMED_WINDOWS)} or [center, width], "
                f"got {value!r}",
                "window",
                "invalid_value",
            )
        return value
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if not ok or not value[1] > 0:
        raise bad("'window' must be a name or [center, width] with width > 0", "window")
    return (float(value[0]), float(value[1]))


def _refuse_unsupported(body: dict) -> None:
    """400 for features the server cannot honour, instead of silently ignoring them."""
    n = _number(body, "n", 1, 1e9, integer=True)
    if n not in (None, 1):
        raise bad("only n=1 is supported", "n", "unsupported_value")
    for key in ("tools", "functions", "audio"):
        if body.get(key):
            raise bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")
    if body.get("logprobs"):
        raise bad("'logprobs' is not supported by this server", "logprobs", "unsupported_parameter")
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, -2.0, 2.0) not in (None, 0, 0.0):
            raise bad(f"'{key}' is not supported (only 0)", key, "unsupported_value")
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported", "logit_bias", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("only response_format {'type': 'text'} is supported", "response_format")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad("only modalities ['text'] is supported", "modalities", "unsupported_value")


def _stop(body: dict, limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
    if len(stop) > limits.max_stop:
        raise bad(f"'stop' takes at most {limits.max_stop} strings", "stop", "invalid_value")
    return stop


def parse_chat_request(
    body: Any, *, limits: Limits, decode_image, takes_images: bool
) -> ChatRequest:
    """Validate a decoded JSON body and build the request.

    Args:
        body: the JSON value of the request body.
        limits: the server's bounds.
        decode_image: ``(url, param, window) -> PIL image`` (raises :class:`APIError`).
        takes_images: False for a text-only model (image parts are then refused).

    Returns:
        The :class:`ChatRequest`.

    Raises:
        APIError: HTTP 400 naming the field at fault.
    """
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise bad("'model' must be a string", "model", "invalid_type")
    _refuse_unsupported(body)
    window = _window(body.get("window"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages", "invalid_type")
    if len(messages) > limits.max_messages:
        raise bad(f"at most {limits.max_messages} messages per request", "messages")
    images: list[Image.Image] = []
    turns: list[Message] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(f"{where} must be an object", where, "invalid_type")
        role = msg.get("role")
        if role not in ROLES:
            raise bad(
                f"{where}.role must be one of {sorted(ROLES)}, got {role!r}",
                f"{where}.role",
                "invalid_value",
            )
        text = _content(
            msg.get("content"), f"{where}.content", role, images, limits, window, decode_image
        )
        if text is None:
            continue
        turns.append(Message(ROLES[role], text))
    if images and not takes_images:
        raise bad(
            "this model takes no images (a text-only Llama-3); send text content only",
            "messages",
            "images_not_supported",
        )
    if not turns or turns[-1].role == "assistant":
        raise bad("the last message must be a user or system turn", "messages", "invalid_value")
    if not any(t.role == "user" for t in turns):
        raise bad("'messages' needs at least one user turn", "messages", "invalid_value")
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 31, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 1 << 31, integer=True)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0:
        raise bad("'top_p' must be > 0", "top_p", "invalid_value")
    seed = _number(body, "seed", -(1 << 63), (1 << 63) - 1, integer=True)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = bool((options or {}).get("include_usage", False))
    return ChatRequest(
        sample=Sample("request", images, turns, {}),
        model=model,
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=None if top_p is None or top_p >= 1.0 else float(top_p),
        stop=_stop(body, limits),
        seed=seed,
        stream=stream,
        include_usage=include_usage,
    )


def _content(
    content: Any, where: str, role: str, images: list, limits: Limits, window: Any, decode_image
) -> str | None:
    """A message's content -> text with ``<image>`` where its image parts were (images appended)."""
    if content is None:
        if role == "assistant":
            return None  # an assistant turn that only called tools: nothing to show the model
        raise bad(f"{where} is missing", where, "invalid_type")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise bad(f"{where} must be a string or a list of content parts", where, "invalid_type")
    out: list[str] = []
    for j, part in enumerate(parts):
        here = f"{where}[{j}]" if not isinstance(content, str) else where
        if not isinstance(part, dict):
            raise bad(f"{here} must be an object", here, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"{here}.text must be a string", f"{here}.text", "invalid_type")
            if IMAGE_MARKER in text:
                # the marker would be taken for an image position: refuse rather than guess
                raise bad(
                    f"{here}: text may not contain {IMAGE_MARKER!r} (send images as image_url parts)",
                    here,
                    "invalid_value",
                )
            out.append(text)
        elif kind == "image_url":
            if role != "user":
                raise bad(f"{here}: images are allowed in user messages only", here)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise bad(f"{here}.image_url.url must be a string", f"{here}.image_url")
            if len(images) >= limits.max_images:
                raise bad(
                    f"at most {limits.max_images} images per request",
                    here,
                    "too_many_images",
                )
            images.append(decode_image(url, f"{here}.image_url", window))
            out.append(IMAGE_MARKER)
        else:
            raise bad(
                f"{here}.type must be 'text' or 'image_url', got {kind!r}",
                f"{here}.type",
                "invalid_value",
            )
    return "".join(out)
