"""Bad requests get an OpenAI error object with the right status, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import pytest
from PIL import Image

from medtune.data.images import load_image
from medtune.serve import create_app
from medtune.serve.images import decode_image
from medtune.serve.protocol import APIError, Limits

from .conftest import image_message, png_url, running


def post(url: str, body, *, raw: bytes | None = None, headers=None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data,
        {"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _jpeg_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(buf, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


OK_IMAGE = png_url(Image.new("RGB", (16, 16), (90, 90, 90)))
PNG_BYTES = base64.b64decode(OK_IMAGE.split(",", 1)[1])

CASES = [
    # (name, body or raw bytes, status, param, code)
    ("not json", b"{not json", 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None, None),
    ("no messages", {"model": "m"}, 400, "messages", "invalid_type"),
    ("messages not a list", {"messages": "hi"}, 400, "messages", "invalid_type"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None),
    (
        "content number",
        {"messages": [{"role": "user", "content": 3}]},
        400,
        "messages[0].content",
        None,
    ),
    (
        "max_tokens string",
        {"messages": user("x"), "max_tokens": "5"},
        400,
        "max_tokens",
        "invalid_type",
    ),
    (
        "max_tokens zero",
        {"messages": user("x"), "max_tokens": 0},
        400,
        "max_tokens",
        "invalid_value",
    ),
    ("temperature high", {"messages": user("x"), "temperature": 3}, 400, "temperature", None),
    ("top_p bool", {"messages": user("x"), "top_p": True}, 400, "top_p", "invalid_type"),
    ("stream string", {"messages": user("x"), "stream": "yes"}, 400, "stream", "invalid_type"),
    ("n=2", {"messages": user("x"), "n": 2}, 400, "n", "unsupported_value"),
    ("stop list of ints", {"messages": user("x"), "stop": [1]}, 400, "stop", "invalid_type"),
    ("seed float", {"messages": user("x"), "seed": 1.5}, 400, "seed", "invalid_type"),
    ("tools", {"messages": user("x"), "tools": [{"type": "function"}]}, 400, "tools", None),
    (
        "last is assistant",
        {"messages": [*user("x"), {"role": "assistant", "content": "y"}]},
        400,
        "messages",
        None,
    ),
    ("marker in text", {"messages": user("look <image> here")}, 400, "messages[0].content", None),
    (
        "http url",
        {"messages": image_message("http://example.com/a.png", "q")},
        400,
        "messages[0].content[0].image_url",
        "invalid_image_url",
    ),
    (
        "file url",
        {"messages": image_message("file:///etc/passwd", "q")},
        400,
        "messages[0].content[0].image_url",
        "invalid_image_url",
    ),
    (
        "a path",
        {"messages": image_message("/etc/hostname", "q")},
        400,
        "messages[0].content[0].image_url",
        "invalid_image_url",
    ),
    (
        "not base64",
        {"messages": image_message("data:image/png;base64,@@@", "q")},
        400,
        "messages[0].content[0].image_url",
        None,
    ),
    (
        "png garbage",
        {
            "messages": image_message(
                "data:image/png;base64," + base64.b64encode(b"garbage!").decode(), "q"
            )
        },
        400,
        "messages[0].content[0].image_url",
        "invalid_image",
    ),
    (
        "png said jpeg",
        {
            "messages": image_message(
                "data:image/jpeg;base64," + base64.b64encode(PNG_BYTES).decode(), "q"
            )
        },
        400,
        "messages[0].content[0].image_url",
        "invalid_image",
    ),
    (
        "gif",
        {"messages": image_message("data:image/gif;base64,R0lGODlh", "q")},
        400,
        "messages[0].content[0].image_url",
        "invalid_image",
    ),
    (
        "dicom garbage",
        {
            "messages": image_message(
                "data:application/dicom;base64," + base64.b64encode(b"\0" * 200).decode(), "q"
            )
        },
        400,
        "messages[0].content[0].image_url",
        "invalid_image",
    ),
    ("bad window", {"messages": user("x"), "window": "sideways"}, 400, "window", "invalid_value"),
    (
        "image in assistant turn",
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "image_url", "image_url": {"url": OK_IMAGE}}],
                },
                *user("x"),
            ]
        },
        400,
        "messages[0].content[0]",
        None,
    ),
    (
        "too many images",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": OK_IMAGE}}] * 3,
                }
            ]
        },
        400,
        "messages[0].content[2]",
        "too_many_images",
    ),
    (
        "image too large",
        {"messages": image_message(png_url(Image.new("L", (300, 300))), "q")},
        400,
        "messages[0].content[0].image_url",
        "image_too_large",
    ),
    (
        "prompt longer than context",
        {"messages": user(" ".join(f"x{i}" for i in range(600)))},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "max_tokens past context",
        {"messages": user("hello"), "max_tokens": 500},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
]


@pytest.fixture(scope="module")
def strict_server(engine):
    limits = Limits(max_body_bytes=200_000, max_images=2, max_image_pixels=200 * 200)
    app = create_app(engine, limits=limits, max_wait_ms=0)
    with running(app) as url:
        yield url


@pytest.mark.parametrize("name, body, status, param, code", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_an_error_object(strict_server, name, body, status, param, code):
    raw = body if isinstance(body, bytes) else None
    got, reply = post(strict_server, body, raw=raw)
    assert got == status, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def test_server_keeps_serving_after_errors(strict_server):
    for _, body, *_ in CASES[:6]:
        post(strict_server, body, raw=body if isinstance(body, bytes) else None)
    status, reply = post(strict_server, {"messages": user("hello"), "max_tokens": 3})
    assert status == 200 and reply["usage"]["completion_tokens"] == 3
    status, reply = post(
        strict_server,
        {"messages": image_message(_jpeg_url(), "colour?"), "max_tokens": 2},
    )
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"


def test_body_too_large_is_413(strict_server):
    big = {"messages": user("x" * 300_000)}
    status, reply = post(strict_server, big)
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    # the same refused without a Content-Length (chunked upload): counted while reading
    req = urllib.request.Request(
        f"{strict_server}/v1/chat/completions",
        iter([json.dumps(big).encode()]),
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 413


def test_unknown_route_and_method(strict_server):
    for path, method in (("/v1/completions", "POST"), ("/v1/chat/completions", "GET")):
        req = urllib.request.Request(f"{strict_server}{path}", method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code in (404, 405)
        assert "message" in json.loads(e.value.read())["error"]


def test_text_only_model_refuses_images(tiny_assets, tokenizer):
    """A plain Llama-3 takes no images: 400, not a crash."""
    from medtune.models.llama3 import llama3_from_hf_config
    from medtune.serve import Engine

    llm = llama3_from_hf_config(f"{tiny_assets}/llama3_tiny/config.json").eval()
    app = create_app(Engine(llm, tokenizer, name="plain"), max_wait_ms=0)
    with running(app) as url:
        status, reply = post(url, {"messages": image_message(OK_IMAGE, "q")})
        assert status == 400 and reply["error"]["code"] == "images_not_supported"
        status, reply = post(url, {"messages": user("hello"), "max_tokens": 2})
        assert status == 200 and reply["usage"]["completion_tokens"] == 2


def test_dicom_is_windowed_as_the_readers_do(ct_dicom):
    url = "data:application/dicom;base64," + base64.b64encode(ct_dicom.read_bytes()).decode()
    for window in (None, "lung", (40.0, 80.0)):
        got = decode_image(url, "p", window, max_pixels=1 << 24)
        want = load_image(ct_dicom, window=window)
        assert got.mode == "RGB" and got.tobytes() == want.tobytes()
    assert decode_image(url, "p", "lung", max_pixels=1 << 24).tobytes() != (
        decode_image(url, "p", None, max_pixels=1 << 24).tobytes()
    )


def test_png_is_decoded_as_the_readers_do(tmp_path):
    im = Image.fromarray(
        (__import__("numpy").arange(64 * 64).reshape(64, 64) * 16).astype("uint16")
    )
    path = tmp_path / "deep.png"
    im.save(path)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    assert decode_image(url, "p", max_pixels=1 << 24).tobytes() == load_image(path).tobytes()
    with pytest.raises(APIError) as e:
        decode_image(url, "p", max_pixels=100)
    assert e.value.status == 400 and e.value.code == "image_too_large"
