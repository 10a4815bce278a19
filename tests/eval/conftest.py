"""Fixtures for tests/eval: a scripted OpenAI-compatible server on 127.0.0.1 and predictions."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

_FIELD = re.compile(r"^(Our answer|Correct answer): (.*)$", re.MULTILINE)


def default_reply(prompt: str) -> str:
    """RIGHT when 'Our answer' equals 'Correct answer' (case-insensitive), else WRONG."""
    fields = dict(_FIELD.findall(prompt))
    ours = fields.get("Our answer", "").strip().lower()
    correct = fields.get("Correct answer", "").strip().lower()
    return "RIGHT" if ours == correct else "WRONG - the correct answer is " + correct


class ScriptedServer:
    """An OpenAI-compatible ``/v1/chat/completions`` server with scripted misbehaviour.

    ``script`` is a list of actions consumed one per request (then ``reply_fn`` answers):
    ``("ok", text)``, ``("status", code)``, ``("status", code, retry_after)``, ``("malformed",)``
    (200 with a body that is not JSON), ``("nochoices",)`` (JSON without choices),
    ``("sleep", seconds, text)``, ``("drop",)`` (close the connection without a reply).
    ``on_request(n, prompt)`` runs before each reply (n counts from 1); when it returns
    ``"abort"`` the request gets no reply.
    """

    def __init__(self):
        self.script: list[tuple] = []
        self.reply_fn = default_reply
        self.on_request = None
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code, body: bytes, headers=None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    server.requests.append(
                        {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                    )
                    n = len(server.requests)
                    action = server.script.pop(0) if server.script else None
                if server.on_request is not None and server.on_request(n, prompt) == "abort":
                    self.close_connection = True
                    return  # no reply (e.g. the client was just killed)
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                    return
                if action is None:
                    action = ("ok", server.reply_fn(prompt))
                kind = action[0]
                if kind == "sleep":
                    time.sleep(action[1])
                    action = ("ok", action[2])
                    kind = "ok"
                if kind == "ok":
                    reply = {
                        "id": f"cmpl-{n}",
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": action[1]},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                    self._send(200, json.dumps(reply).encode())
                elif kind == "status":
                    headers = {"Retry-After": str(action[2])} if len(action) > 2 else None
                    self._send(action[1], b'{"error": {"message": "scripted"}}', headers)
                elif kind == "malformed":
                    self._send(200, b"{not json")
                elif kind == "nochoices":
                    self._send(200, b'{"object": "chat.completion"}')
                elif kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                else:  # pragma: no cover
                    raise ValueError(kind)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def n_requests(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def judge_server():
    server = ScriptedServer()
    yield server
    server.close()


def pred_row(i, answer, prediction, answer_type="CLOSED", dataset="slake", checkpoint="ck1"):
    return {
        "id": i,
        "dataset": dataset,
        "split": "test",
        "image": f"img{i}.png",
        "question": f"Question {i}?",
        "answer": answer,
        "answer_type": answer_type,
        "prediction": prediction,
        "checkpoint": checkpoint,
        "generation": {"max_new_tokens": 16},
    }


@pytest.fixture
def pred_rows():
    """Ten rows: CLOSED and OPEN, two datasets, some right, some wrong."""
    return [
        pred_row(0, "yes", "yes"),
        pred_row(1, "no", "yes"),
        pred_row(2, "left", "left"),
        pred_row(3, "no", "no"),
        pred_row(4, "liver", "liver", "OPEN"),
        pred_row(5, "liver", "kidney", "OPEN"),
        pred_row(6, "yes", "yes", dataset="vqa_rad"),
        pred_row(7, "yes", "no", dataset="vqa_rad"),
        pred_row(8, "ct", "ct", "OPEN", dataset="vqa_rad"),
        pred_row(9, "mri", "x-ray", "OPEN", dataset="vqa_rad"),
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
