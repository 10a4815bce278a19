#!/usr/bin/env python
"""``medtune serve`` throughput: batched server vs one request at a time, from one run.

32 chat requests (each a different synthetic scan and question, greedy, ``--max-tokens`` 16 new
tokens) are sent by 8 concurrent clients (the official ``openai`` client, 4 requests each) to

1. the server with batching (``max_batch_size=8``, ``max_wait_ms=10``), and
2. the same server one request at a time (``max_batch_size=1``),

both running the demo-size model (the tiny MedVLM of the generated assets: open_clip ViT + tiny
Llama-3; random weights, so every answer runs to ``--max-tokens``) in this process with uvicorn on
127.0.0.1. Printed: requests/s and p50/p95 latency of each, and batched/one-at-a-time ratios. The
run fails (exit 1) if a request is lost or any batched answer differs from its one-at-a-time
answer.

Usage::

    python benchmarks/bench_serve.py [--requests 32] [--clients 8] [--max-tokens 16] [--assets DIR]
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn
from openai import OpenAI

from medtune.models.builders import tiny_medvlm
from medtune.models.llama3 import llama3_tokenizer
from medtune.serve import Engine, create_app
from medtune.testing.assets import make_tiny_assets
from medtune.testing.datasets import make_medical_image


class Served:
    """The app under uvicorn in a thread, on a socket bound before start (no port race)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def requests(n: int) -> list[list[dict]]:
    """``n`` different image + question conversations."""
    out = []
    modalities = ["CT", "MRI", "X-Ray"]
    for i in range(n):
        buf = io.BytesIO()
        make_medical_image(
            i, modality=modalities[i % 3], lesion=("left", "right", None)[i % 3]
        ).save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        question = f"Question {i}: " + "which side is the lesion on? " * (1 + i % 4)
        out.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": question},
                    ],
                }
            ]
        )
    return out


def run(engine, convs, *, clients: int, max_tokens: int, max_batch_size: int) -> dict:
    """Send every conversation through ``clients`` concurrent clients; time each request."""
    app = create_app(engine, max_batch_size=max_batch_size, max_wait_ms=10, max_queue=len(convs))
    with Served(app) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

        def one(i: int) -> tuple[int, str | None, float]:
            t0 = time.perf_counter()
            try:
                r = client.chat.completions.create(
                    model="m", messages=convs[i], max_tokens=max_tokens, temperature=0
                )
                text = r.choices[0].message.content
            except Exception as e:  # counted as lost
                print(f"request {i} failed: {type(e).__name__}: {e}", file=sys.stderr)
                text = None
            return i, text, time.perf_counter() - t0

        one(0)  # warm-up (not timed)
        t0 = time.perf_counter()
        # each client sends its share one after the other, as a client waiting for replies does
        shares = [list(range(c, len(convs), clients)) for c in range(clients)]
        with ThreadPoolExecutor(clients) as pool:
            results = [r for part in pool.map(lambda s: [one(i) for i in s], shares) for r in part]
        wall = time.perf_counter() - t0
        sizes = app.state.batcher.batch_sizes[1:]
    lat = sorted(r[2] for r in results)
    return {
        "answers": {i: t for i, t, _ in results},
        "wall": wall,
        "rps": len(convs) / wall,
        "p50": statistics.median(lat),
        "p95": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "batches": sizes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--assets", type=Path, default=Path(tempfile.gettempdir()) / "medtune-bench-assets"
    )
    args = p.parse_args(argv)

    assets = make_tiny_assets(args.assets)  # reused when already built
    torch.manual_seed(0)
    model = tiny_medvlm(str(assets.root)).eval()
    tok = llama3_tokenizer(
        str(assets.root / "llama3_tiny/original/tokenizer.model"),
        str(assets.root / "llama3_tiny/tokenizer.json"),
    )
    engine = Engine(model, tok, name="demo-size")
    convs = requests(args.requests)
    print(
        f"{args.requests} requests from {args.clients} clients, {args.max_tokens} new tokens each, "
        f"torch threads {torch.get_num_threads()}"
    )
    seq = run(engine, convs, clients=args.clients, max_tokens=args.max_tokens, max_batch_size=1)
    bat = run(
        engine, convs, clients=args.clients, max_tokens=args.max_tokens, max_batch_size=args.clients
    )
    for name, r in (("one at a time", seq), ("batched", bat)):
        print(
            f"{name:14s} {r['rps']:6.2f} req/s  p50 {r['p50'] * 1000:7.0f} ms  "
            f"p95 {r['p95'] * 1000:7.0f} ms  wall {r['wall']:.2f} s  "
            f"batches {len(r['batches'])} (largest {max(r['batches'], default=0)})"
        )
    print(f"batched/one_at_a_time requests/s = {bat['rps'] / seq['rps']:.2f}x")
    print(f"batched/one_at_a_time p50 latency = {bat['p50'] / seq['p50']:.2f}x")
    print(f"batched/one_at_a_time p95 latency = {bat['p95'] / seq['p95']:.2f}x")
    lost = sum(1 for r in (seq, bat) for t in r["answers"].values() if t is None)
    lost += sum(args.requests - len(r["answers"]) for r in (seq, bat))
    differ = [i for i in range(args.requests) if bat["answers"].get(i) != seq["answers"].get(i)]
    print(f"lost requests: {lost}; batched answers different from one-at-a-time: {len(differ)}")
    return 1 if lost or differ else 0


if __name__ == "__main__":
    sys.exit(main())
