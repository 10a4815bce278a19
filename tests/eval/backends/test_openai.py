"""``model: openai`` against ``medtune serve --config demo`` (the serve recipe's own ``build_app``
on a tiny trained checkpoint), behind a proxy that drops connections mid-run; and one eval run
with all three backends (medtune, hf, openai) landing in one table."""

from __future__ import annotations

import csv
import importlib.util
import json
import runpy
import socket
import threading
import urllib.request
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medtune._cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[3]


def _load_running():
    spec = importlib.util.spec_from_file_location(
        "_serve_conftest", REPO / "tests/serve/conftest.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.running  # uvicorn in a thread on a free port


def _cli(*argv: str) -> int:
    try:
        status = main(list(argv))
    except SystemExit as e:
        status = e.code
    return int(status or 0)


class Proxy:
    """Forwards POSTs to ``upstream``; closes the connection unanswered on the requests numbered
    in ``drop`` (1-based) and answers HTTP 400 from request ``fail_from`` on (when set)."""

    def __init__(self, upstream: str, drop=(), fail_from: int | None = None):
        self.upstream, self.drop, self.fail_from = upstream, set(drop), fail_from
        self.n = 0
        self.dropped = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    proxy.n += 1
                    n = proxy.n
                if n in proxy.drop:
                    proxy.dropped += 1
                    self.close_connection = True
                    self.connection.shutdown(
                        socket.SHUT_RDWR
                    )  # the client sees a dropped connection
                    return
                if proxy.fail_from is not None and n >= proxy.fail_from:
                    self.send_response(400)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"no")
                    return
                req = urllib.request.Request(proxy.upstream + self.path, data=body,
                                             headers={"Content-Type": "application/json"})  # fmt: skip
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(req, timeout=120) as r:
                    data, status = r.read(), r.status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @contextmanager
    def serving(self):
        t = threading.Thread(target=self.server.serve_forever, daemon=True)
        t.start()
        try:
            yield f"http://127.0.0.1:{self.server.server_address[1]}"
        finally:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture(scope="module")
def checkpoint(tiny_assets, tmp_path_factory) -> Path:
    """A tiny vision_finetune checkpoint (2 steps), as the demo's."""
    out = tmp_path_factory.mktemp("run")
    assert _cli("run", "vision_finetune", "--config", "demo", f"assets_dir={tiny_assets}",
                f"output_dir={out}", "epochs=1", "max_steps_per_epoch=2", "batch_size=8",
                "log_every_n_steps=100") == 0  # fmt: skip
    return out / "epoch_0"


@pytest.fixture(scope="module")
def served(checkpoint, tiny_assets):
    """``medtune run serve --config demo checkpoint=...``: its build_app, served in a thread."""
    serve = runpy.run_path(str(REPO / "recipes" / "serve.py"))
    cfg = OmegaConf.load(REPO / "recipes/configs/serve/demo.yaml")
    cfg.checkpoint, cfg.assets_dir, cfg.max_wait_ms = str(checkpoint), str(tiny_assets), 20
    app, _, _ = serve["build_app"](cfg)
    with _load_running()(app) as url:
        yield url


def _args(demo_assets, out, url, *more):
    return ["run", "eval", "--config", "demo_backends", f"assets_dir={demo_assets}",
            f"output_dir={out}", "checkpoints.qwen2_vl=null", f"checkpoints.served.base_url={url}/v1",
            "checkpoints.served.backoff_s=0.05", "datasets.pmc_vqa=null", "datasets.mmmu_med=null",
            "generation.max_new_tokens=4", *more]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_three_backends_one_table_through_dropped_connections(
    served, checkpoint, demo_assets, tmp_path
):
    proxy = Proxy(served, drop=(2, 5))
    out = tmp_path / "eval"
    with proxy.serving() as url:
        status = _cli(*_args(demo_assets, out, url, f"checkpoints.tuned={checkpoint}"))
    assert status == 0
    assert proxy.dropped == 2  # two requests died mid-run and were retried
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["checkpoint"], r["model"]) for r in table[::3]] == [
        ("tuned", "medtune"), ("llava", "hf"), ("served", "openai")
    ]  # fmt: skip
    assert {r["dataset"] for r in table} == {"pathvqa", "omnimedvqa", "medxpertqa_mm"}
    doc = json.loads((out / "results.json").read_text())
    assert doc["checkpoints"]["served"] == f"openai:medtune-demo@{url}/v1"
    assert any(g["model"] == "openai" and g["group"] == "modality" for g in doc["groups"])
    for ds, n in (("pathvqa", 6), ("omnimedvqa", 5), ("medxpertqa_mm", 3)):
        served_rows = _rows(out / "served" / ds / "predictions.jsonl")
        ids = [r["id"] for r in served_rows]
        assert len(ids) == n and len(set(ids)) == n  # no row lost, none twice
        local = {r["id"]: r["prediction"] for r in _rows(out / "tuned" / ds / "predictions.jsonl")}
        # the same checkpoint over HTTP (greedy) answers as the local medtune backend
        assert {r["id"]: r["prediction"] for r in served_rows} == local


def test_resume_after_server_failure(served, demo_assets, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["checkpoints.tuned=null", "checkpoints.llava=null", "datasets.omnimedvqa=null",
            "datasets.medxpertqa_mm=null", "batch_size=2", "checkpoints.served.concurrency=2"]  # fmt: skip
    proxy = Proxy(served, fail_from=4)  # chunk 1 (requests 1-2) answered, chunk 2 refused
    with proxy.serving() as url:
        status = _cli(*_args(demo_assets, out, url, *args))
        err = capsys.readouterr().err
        assert status == 1 and "HTTP 400" in err and "Traceback" not in err
        pred = out / "served" / "pathvqa" / "predictions.jsonl"
        first = _rows(pred)
        assert len(first) == 2
        proxy.fail_from, asked = None, proxy.n  # the server recovers; the same command again
        assert _cli(*_args(demo_assets, out, url, *args)) == 0
    assert proxy.n - asked == 6 - 2  # only the missing questions were asked again
    rows = _rows(pred)
    assert Counter(r["id"] for r in rows) == Counter(f"pathvqa-test-{i}" for i in range(6))
    assert rows[:2] == first
