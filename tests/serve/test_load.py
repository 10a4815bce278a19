"""``medtune serve`` under load and faults, on 127.0.0.1 only, bounded in time.

- 32 concurrent clients, a tenth of them faulty (one disconnects mid-stream, one sends its request
  and hangs up before the answer, one sends an oversized body, one malformed JSON): every
  well-formed request gets exactly the answer it gets alone (text, finish reason, usage),
  ``/health`` answers all along, the queue is empty afterwards, and the process RSS after three
  such rounds is within ``RSS_MARGIN`` of the RSS after the first (no growth per request).
- SIGTERM to a real ``medtune run serve --config demo`` process while requests wait in its
  batcher: each of them is answered in full, then the process exits 0.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from medtune.serve import Limits, create_app
from medtune.testing.forkserver import signals_as_from_a_shell

from .conftest import image_message, running

REPO = Path(__file__).resolve().parents[2]
N_CLIENTS = 32
MAX_BODY = 256 * 1024
RSS_MARGIN = (
    16 * 2**20
)  # bytes: three rounds of 32 clients may not grow the process by more (measured: +0.8 MiB)
TIMEOUT = 60


def _post(base: str, body: bytes, *, hang_up: str | None = None) -> tuple[int, dict | str | None]:
    """POST /v1/chat/completions over a fresh connection.

    Args:
        hang_up: ``"mid_stream"``: close after the first event; ``"before_answer"``: close right
            after sending.

    Returns:
        (status, JSON body | streamed text | None when hung up).
    """
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        if hang_up == "before_answer":
            conn.sock.shutdown(socket.SHUT_RDWR)
            return 0, None
        resp = conn.getresponse()
        if hang_up == "mid_stream":
            resp.fp.readline()  # the first event's line, then gone
            conn.sock.shutdown(socket.SHUT_RDWR)
            return resp.status, None
        raw = resp.read().decode()
        if resp.getheader("content-type", "").startswith("text/event-stream"):
            return resp.status, _sse_text(raw)
        return resp.status, json.loads(raw)
    finally:
        conn.close()


def _sse_text(raw: str) -> dict:
    """The streamed answer as the fields the non-streamed one has."""
    text, finish, usage = "", None, None
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", raw[-300:]
    for ev in map(json.loads, events[:-1]):
        assert "error" not in ev, ev
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev["choices"]:
            text += ch["delta"].get("content") or ""
            finish = ch["finish_reason"] or finish
    return {"text": text, "finish": finish, "usage": usage}


def _answer(status: int, body) -> tuple:
    assert status == 200, body
    if "choices" in body:  # not streamed
        choice = body["choices"][0]
        return choice["message"]["content"], choice["finish_reason"], body["usage"]
    return body["text"], body["finish"], body["usage"]


def _requests(scans: list[str]) -> list[bytes]:
    """28 well-formed requests: greedy and seeded sampling, streamed or not, 6 images."""
    out = []
    for i in range(N_CLIENTS - 4):
        body = {
            "messages": image_message(scans[i % len(scans)], f"Question {i}: which side?"),
            "max_tokens": 3 + i % 6,
            "temperature": 0,
            "stream": bool(i % 2),
        }
        if i % 2:
            body["stream_options"] = {"include_usage": True}
        if i % 7 == 3:  # sampled with a seed: runs alone, so its draws are reproducible
            body.update(temperature=0.9, seed=100 + i)
        out.append(json.dumps(body).encode())
    return out


def _faults(scans: list[str]) -> list[tuple[bytes, str | None, int]]:
    """(body, hang_up, expected status) for the faulty tenth."""
    long = json.dumps(
        {"messages": image_message(scans[0], "Tell me."), "max_tokens": 8, "stream": True}
    ).encode()
    return [
        (long, "mid_stream", 200),
        (long.replace(b'"stream": true', b'"stream": false'), "before_answer", 0),
        (b'{"messages": [], "pad": "' + b"x" * (MAX_BODY + 1) + b'"}', None, 413),
        (b'{"messages": [{"role": "user", "content": "hi"}', None, 400),
    ]


@pytest.fixture(scope="module")
def load_server(engine):
    app = create_app(
        engine,
        limits=Limits(max_body_bytes=MAX_BODY, default_max_tokens=8),
        max_batch_size=8,
        max_wait_ms=20,
        max_queue=64,
    )
    with running(app) as url:
        yield url, app


def _health(url: str) -> dict:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


def _round(url: str, goods: list[bytes], faults) -> list[tuple]:
    """All clients at once (a barrier), with /health polled throughout; the good answers."""
    jobs = [(b, None, None) for b in goods] + list(faults)
    order = list(range(len(jobs)))
    order = order[::3] + order[1::3] + order[2::3]  # faults among the good ones
    barrier = threading.Barrier(len(jobs))
    stop, health = threading.Event(), []

    def poll():
        while not stop.is_set():
            health.append(_health(url)["status"])
            time.sleep(0.02)

    def one(i):
        body, hang_up, want = jobs[i]
        barrier.wait(TIMEOUT)
        status, got = _post(url, body, hang_up=hang_up)
        if want is not None:
            assert status == want, (i, status, got)
            if want in (400, 413):
                assert set(got["error"]) >= {"message", "type", "code"}, got
        return status, got

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = dict(zip(order, pool.map(one, order)))
    finally:
        stop.set()
        poller.join(TIMEOUT)
    assert health and set(health) == {"ok"}
    return [_answer(*results[i]) for i in range(len(goods))]


@pytest.mark.slow
def test_32_clients_with_faults_answer_as_alone_with_bounded_memory(load_server, scans):
    url, app = load_server
    goods, faults = _requests(scans), _faults(scans)
    assert len(goods) + len(faults) == N_CLIENTS
    alone = [_answer(*_post(url, b)) for b in goods]
    assert len({a[0] for a in alone}) > 1  # different inputs, different answers
    proc = psutil.Process()
    rss = []
    for _ in range(3):
        assert _round(url, goods, faults) == alone
        # the server hands every request back: nothing waits or runs once the clients are done
        for _ in range(200):
            h = _health(url)
            if h["waiting"] == 0 and h["running"] == 0:
                break
            time.sleep(0.02)
        assert h["waiting"] == 0 and h["running"] == 0, h
        rss.append(proc.memory_info().rss)
    assert max(app.state.batcher.batch_sizes) > 1  # the load was batched
    print(f"RSS after each round (MiB): {[round(r / 2**20, 1) for r in rss]}")
    assert rss[-1] - rss[0] < RSS_MARGIN, [r / 2**20 for r in rss]
    assert _answer(*_post(url, goods[0])) == alone[0]  # and still serving


# ------------------------------------------------------------------------------------- SIGTERM


@pytest.fixture(scope="module")
def demo_checkpoint(tiny_assets, tmp_path_factory) -> Path:
    """A checkpoint folder of the demo model (as vision_finetune/demo writes it, untrained)."""
    from medtune.testing.checkpoints import untrained_checkpoint

    config = REPO / "recipes/configs/vision_finetune/demo.yaml"
    return untrained_checkpoint(config, tmp_path_factory.mktemp("run"), assets_dir=str(tiny_assets))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(
    demo_checkpoint, tiny_assets, scans, tmp_path
):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "medtune._cli.main",
        "run",
        "serve",
        "--config",
        "demo",
        f"assets_dir={tiny_assets}",
        f"checkpoint={demo_checkpoint}",
        f"port={port}",
        "max_wait_ms=2000",  # the requests wait in the batcher long enough to be in flight
        "log_level=warning",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=signals_as_from_a_shell,  # SIGTERM reaches it as it would from a shell
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                _health(url)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        bodies = _requests(scans)[:4]
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(_post, url, b) for b in bodies]
            for _ in range(300):  # until all four wait in the batcher
                if _health(url)["waiting"] == len(bodies):
                    break
                time.sleep(0.01)
            assert _health(url)["waiting"] == len(bodies)
            proc.send_signal(signal.SIGTERM)
            drained = [_answer(*f.result(TIMEOUT)) for f in futures]
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all(usage["completion_tokens"] >= 1 for _, _, usage in drained), drained
    with pytest.raises(OSError):  # nothing listens any more
        _health(url)
    # the drained answers are the model's: the same requests, answered by the in-process engine
    from medtune.training.loading import load_from_checkpoint

    from .conftest import running as run_app

    model, tokenizer, _ = load_from_checkpoint(demo_checkpoint)
    from medtune.serve import Engine

    with run_app(create_app(Engine(model, tokenizer, name="medtune-demo"))) as again:
        assert [_answer(*_post(again, b)) for b in bodies] == drained
