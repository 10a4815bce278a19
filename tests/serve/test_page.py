"""``medtune run serve --config demo`` in a subprocess, and its web page in headless Chromium.

The page is driven the way a user would: upload the demo image, ask, read the streamed answer
(equal to the API's answer to the same greedy request), reload (the conversation stays in the
tab), open a second tab (its own empty conversation), then a DICOM with a window preset. A
screenshot is written to the test's temp dir. Chromium is Debian's package (``make test``
installs it); playwright drives it through ``executable_path`` (no browser download).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from openai import OpenAI

from medtune.testing.forkserver import signals_as_from_a_shell

from .conftest import image_message

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
QUESTION = "Which side is the lesion on?"


@pytest.fixture(scope="module")
def demo_checkpoint(tiny_assets, tmp_path_factory) -> Path:
    """A checkpoint folder of the demo model as ``vision_finetune --config demo`` writes it (its
    initial weights: the page needs a model to serve, not a trained one)."""
    from medtune.testing.checkpoints import untrained_checkpoint

    config = Path(__file__).resolve().parents[2] / "recipes/configs/vision_finetune/demo.yaml"
    return untrained_checkpoint(
        config, tmp_path_factory.mktemp("demo_run"), assets_dir=str(tiny_assets)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(tiny_assets, demo_checkpoint, tmp_path_factory):
    """``medtune run serve --config demo`` as a user runs it; stopped with Ctrl-C (SIGINT)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    cmd = [sys.executable, "-m", "medtune._cli.main", "run", "serve", "--config", "demo"]
    cmd += [f"checkpoint={demo_checkpoint}", f"assets_dir={tiny_assets}", f"port={port}"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            preexec_fn=signals_as_from_a_shell,  # Ctrl-C reaches it as it would from a shell
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _api_answer(url: str, image_url: str, history=(), **extra) -> str:
    c = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(
        model="medtune-demo",
        messages=[*history, *image_message(image_url, QUESTION)],
        max_tokens=8,
        temperature=0,
        extra_body=extra or None,
    )
    return r.choices[0].message.content


def _demo_image(assets: Path) -> Path:
    return sorted((assets / "tiny_slake/Slake1.0/imgs").glob("*/source.png"))[0]


def _data_url(path: Path, media: str) -> str:
    return f"data:{media};base64," + base64.b64encode(path.read_bytes()).decode()


def _ask(page, image: Path, question: str, window: str | None = None) -> str:
    n_done = page.locator('.assistant[data-done="1"]').count()
    page.set_input_files("#image", str(image))
    if window:
        page.select_option("#window", window)
    page.fill("#max_tokens", "8")
    page.fill("#question", question)
    page.click("#send")
    done = page.locator('.assistant[data-done="1"]')
    done.nth(n_done).wait_for(timeout=60_000)
    assert page.locator(".error").count() == 0, page.inner_text("#chat")
    return done.nth(n_done).locator(".text").inner_text()


def test_demo_config_serves_the_api(demo_server, tiny_assets):
    url, _, _ = demo_server
    image = _demo_image(tiny_assets)
    models = OpenAI(base_url=f"{url}/v1", api_key="unused").models.list()
    assert [m.id for m in models.data] == ["medtune-demo"]
    text = _api_answer(url, _data_url(image, "image/png"))
    assert text.strip(), "the demo model gave an empty answer"


def test_web_page_in_headless_chromium(demo_server, tiny_assets, ct_dicom, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not found at {CHROMIUM} (make test installs it: make browser)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) missing")
    url, proc, log = demo_server
    image = _demo_image(tiny_assets)
    want = _api_answer(url, _data_url(image, "image/png"))
    assert want.strip()
    # the page's second question carries the first turn as history
    history = [*image_message(_data_url(image, "image/png"), QUESTION)]
    history.append({"role": "assistant", "content": want})
    dicom_url = _data_url(ct_dicom, "application/dicom")
    want_dicom = _api_answer(url, dicom_url, history, window="lung")

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function(
                "document.getElementById('model').textContent === 'medtune-demo'"
            )
            assert page.locator("#window option").count() > 3  # the DICOM window presets
            assert _ask(page, image, QUESTION) == want
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            page.reload()  # the conversation is kept in the tab
            page.wait_for_selector(".assistant")
            assert page.locator(".msg").count() == 2
            assert page.locator(".assistant .text").first.inner_text() == want

            other = browser.new_page()  # another tab: its own conversation
            other.goto(url + "/")
            other.wait_for_function("document.getElementById('model').textContent !== '…'")
            assert other.locator(".msg").count() == 0
            other.close()

            got = _ask(page, ct_dicom, QUESTION, window="lung")
            assert got == want_dicom
            assert "DICOM: CT_small.dcm" in page.inner_text("#chat")
            page.screenshot(path=str(tmp_path / "page_dicom.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 1000
    print(f"screenshots: {tmp_path / 'page.png'} {tmp_path / 'page_dicom.png'}")

    proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down, then the one-line "interrupted"
    assert proc.wait(30) == 130, log.read_text()
    text = log.read_text()
    assert "serving medtune-demo on http://127.0.0.1:" in text
    assert "Application shutdown complete" in text and "Traceback" not in text
    assert text.rstrip().endswith("serve: interrupted")
