"""tools/rewrite_reports.py against a scripted OpenAI-compatible server (empty and truncated
replies refused by row, a failure mid-run resumed from the cache) and against ``medtune serve``
on the tiny model."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medtune.utils.errors import run_entry

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import rewrite_reports  # noqa: E402

REPORTS = [
    ("a1", "Heart size normal. No effusion. Compared with the prior study of 2019."),
    ("a2", "EMPTY please"),
    ("a3", "LONG report"),
    ("a4", "Mild cardiomegaly. Dr. X was informed."),
    ("a5", "Lungs clear."),
]


class _Script:
    def __init__(self, fail_after: int | None = None):
        self.fail_after, self.n, self.prompts = fail_after, 0, []


def _server(script: _Script):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.n += 1
            if script.fail_after is not None and script.n > script.fail_after:
                self.send_response(500)
                self.end_headers()
                return
            prompt = body["messages"][0]["content"]
            script.prompts.append(prompt)
            report = prompt.rsplit("Report:\n", 1)[1]
            text, finish = f"Summary: {report.split('.')[0]}.", "stop"
            if "EMPTY" in report:
                text = "  "
            if "LONG" in report:
                finish = "length"
            out = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish}]}  # fmt: skip
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def _tool(*argv: str, capsys) -> tuple[int, str, str]:
    status = run_entry("rewrite_reports", lambda: rewrite_reports.main(list(argv)))
    out = capsys.readouterr()
    return status, out.out, out.err


def _input(tmp_path: Path) -> Path:
    p = tmp_path / "reports.jsonl"
    p.write_text("".join(json.dumps({"image_id": i, "report": r}) + "\n" for i, r in REPORTS))
    return p


def test_refuses_by_row_and_resumes_after_a_failure(tmp_path, capsys):
    inp, out = _input(tmp_path), tmp_path / "openi" / "filter_cap.json"
    script = _Script(fail_after=2)  # the server dies after two answers
    srv, url = _server(script)
    args = ["--input", str(inp), "--output", str(out), "--base-url", url, "--model", "m",
            "--max-retries", "1", "--backoff", "0"]  # fmt: skip
    status, _, err = _tool(*args, capsys=capsys)
    assert status == 1 and "failed after 2 tries" in err and "HTTP 500" in err
    cached = [json.loads(x) for x in Path(f"{out}.cache.jsonl").read_text().splitlines()]
    assert [c["image_id"] for c in cached] == ["a1"]  # a2 came back empty: not cached
    srv.shutdown()
    script2 = _Script()
    srv, url = _server(script2)
    args[args.index("--base-url") + 1] = url
    status, text, err = _tool(*args, capsys=capsys)
    srv.shutdown()
    assert status == 1  # refused rows make the run fail
    assert len(script2.prompts) == 4  # a1 came from the cache
    assert all(rewrite_reports.PROMPT.split("{report}")[0] in p for p in script2.prompts)
    anns = json.loads(out.read_text())["annotations"]
    assert [a["image_id"] for a in anns] == ["a1", "a4", "a5"]
    assert anns[0]["caption"] == "Summary: Heart size normal."
    refused = {json.loads(x)["image_id"]: json.loads(x)["reason"]
               for x in Path(f"{out}.refused.jsonl").read_text().splitlines()}  # fmt: skip
    assert set(refused) == {"a2", "a3"}
    assert "empty" in refused["a2"] and "truncated" in refused["a3"]
    assert "refused a3" in err
    # the output reads back with medtune's XrayGPT reader layout
    assert set(json.loads(out.read_text())) == {"annotations"}


def test_bad_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "r.jsonl"
    bad.write_text(json.dumps({"image_id": "x"}) + "\n")
    status, _, err = _tool("--input", str(bad), "--output", str(tmp_path / "o.json"),
                           "--base-url", "http://127.0.0.1:9/v1", "--model", "m", capsys=capsys)  # fmt: skip
    assert status == 1 and "row 1 lacks image_id or a non-empty 'report'" in err


@pytest.mark.slow
def test_against_medtune_serve(tiny_assets, tmp_path, capsys):
    """The real server: with a 2-token limit the random tiny model's replies are cut, and the
    tool refuses every row as truncated (medtune serve reports finish_reason 'length')."""
    import torch

    from medtune.models.builders import tiny_medvlm
    from medtune.models.llama3 import llama3_tokenizer
    from medtune.serve import Engine, create_app
    from tests.serve.conftest import running

    tok = llama3_tokenizer(f"{tiny_assets}/llama3_tiny/original/tokenizer.model",
                           f"{tiny_assets}/llama3_tiny/tokenizer.json")  # fmt: skip
    torch.manual_seed(0)
    engine = Engine(tiny_medvlm(str(tiny_assets)).eval(), tok, name="tiny")
    out = tmp_path / "filter_cap.json"
    with running(create_app(engine, max_batch_size=4, max_wait_ms=10)) as base:
        status, text, err = _tool("--input", str(_input(tmp_path)), "--output", str(out),
                                  "--base-url", base + "/v1", "--model", "tiny", "--max-tokens", "2",
                                  capsys=capsys)  # fmt: skip
    refused = [json.loads(x) for x in Path(f"{out}.refused.jsonl").read_text().splitlines()]
    assert status == 1 and len(refused) == 5
    assert all("truncated" in r["reason"] or "empty" in r["reason"] for r in refused)
    assert json.loads(out.read_text()) == {"annotations": []}
