"""Fixtures for the server tests: a random tiny MedVLM behind a real uvicorn server on 127.0.0.1.

The server runs in a thread of the test process on a socket bound to a free port before uvicorn
starts (no port race), and is always stopped.
"""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import uvicorn

from medtune.testing.datasets import make_medical_image


@contextmanager
def running(app, host: str = "127.0.0.1"):
    """Serve ``app`` with uvicorn in a thread; yields the base URL (``http://127.0.0.1:PORT``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url: str, question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]


@pytest.fixture(scope="session")
def tokenizer(tiny_assets):
    from medtune.models.llama3 import llama3_tokenizer

    return llama3_tokenizer(
        f"{tiny_assets}/llama3_tiny/original/tokenizer.model",
        f"{tiny_assets}/llama3_tiny/tokenizer.json",
    )


@pytest.fixture(scope="session")
def vlm(tiny_assets):
    """A randomly initialised tiny MedVLM (the API tests need a model, not a trained one)."""
    from medtune.models.builders import tiny_medvlm

    torch.manual_seed(0)
    return tiny_medvlm(str(tiny_assets)).eval()


@pytest.fixture(scope="session")
def engine(vlm, tokenizer):
    from medtune.serve import Engine

    return Engine(vlm, tokenizer, name="tiny-medvlm")


@pytest.fixture(scope="session")
def vlm_server(engine):
    """(base_url, app): batches of up to 8, waiting up to 300 ms for company."""
    from medtune.serve import create_app

    app = create_app(engine, max_batch_size=8, max_wait_ms=300)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="session")
def scans() -> list[str]:
    """Six PNG data URLs of different synthetic scans."""
    return [
        png_url(make_medical_image(i, modality=m, lesion=side))
        for i, (m, side) in enumerate(
            [("CT", "left"), ("MRI", "right"), ("X-Ray", None)] * 2, start=1
        )
    ]


@pytest.fixture(scope="session")
def ct_dicom() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))
