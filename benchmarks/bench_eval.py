#!/usr/bin/env python
"""eval's answer backends side by side, from one run: questions/s and ratios.

1. ``model: medtune`` vs ``model: hf`` on the same weights: a tiny MedVLM trained one step (the
   demo's open_clip ViT + tiny Llama-3, ``feature_layer=-1`` so that it exports exactly) and its
   ``medtune export hf`` folder (a ``LlavaForConditionalGeneration``), answering the same
   multiple-choice questions (the benchmark fixtures' prompts, repeated to ``--questions``) in
   batches of ``--batch-size``, greedy, ``--max-tokens`` new tokens.
2. ``model: openai`` against ``medtune serve --config demo`` (the serve recipe's ``build_app`` on
   that checkpoint, uvicorn on 127.0.0.1 in this process) at 1 vs 8 concurrent requests.

Printed: questions/s of each, the ratios, and how many answers agree with the medtune backend's
(greedy: the export and the server should give the same text; a difference is reported, not
hidden). Answers stop at the stop token or ``--max-tokens``; the same lengths on every backend.

Usage::

    python benchmarks/bench_eval.py [--questions 32] [--batch-size 8] [--max-tokens 8] [--work DIR]
"""

from __future__ import annotations

import argparse
import runpy
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch
import uvicorn
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


class Served:
    """An ASGI app under uvicorn in a thread, on a socket bound before start (no port race)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def _cli(*argv: str) -> None:
    from medtune._cli.main import main

    try:
        status = main(list(argv))
    except SystemExit as e:
        status = e.code
    if status:
        raise SystemExit(f"bench_eval: `medtune {' '.join(argv)}` failed ({status})")


def questions(bench: Path, n: int):
    """``n`` multiple-choice samples with MedEvalKit's prompt, cycling over the fixtures."""
    from medtune.data.benchmarks import medxpertqa, omnimedvqa, pmc_vqa
    from medtune.data.sample import Message, Sample
    from medtune.eval.mcq import mcq_prompt

    base = [
        *pmc_vqa(bench / "PMC-VQA"),
        *omnimedvqa(bench / "OmniMedVQA"),
        *[s for s in medxpertqa(bench / "MedXpertQA") if len(s.images) == 1],
    ]
    out = []
    for i in range(n):
        s = base[i % len(base)]
        text = mcq_prompt(s.meta["question"], s.meta["choices"])
        out.append(Sample(f"q{i}", list(s.images), [Message("user", text)], dict(s.meta)))
    return out


def timed(backend, samples, settings) -> tuple[float, list[str]]:
    backend.answer(samples[:2], settings)  # warm-up (first-call allocations, HTTP connection)
    t0 = time.perf_counter()
    texts = backend.answer(samples, settings)
    return len(samples) / (time.perf_counter() - t0), texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--work", default=None, help="folder for assets, checkpoint, export")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_eval_"))

    from medtune.eval.backends import build_backend, parse_spec
    from medtune.generation import GenerationConfig
    from medtune.testing.assets import make_tiny_assets
    from medtune.testing.benchmarks import make_benchmark_fixtures
    from medtune.training.export_llava import export_hf

    assets = make_tiny_assets(work / "assets", n_train=32, n_val=8, n_test=8).root
    bench = make_benchmark_fixtures(work / "benchmarks")
    ckpt = work / "run" / "epoch_0"
    if not (ckpt / "model.safetensors").is_file():
        _cli("run", "vision_finetune", "--config", "demo", f"assets_dir={assets}",
             f"output_dir={work / 'run'}", "epochs=1", "max_steps_per_epoch=1", "batch_size=8",
             "log_every_n_steps=100", "model.feature_layer=-1")  # fmt: skip
    hf_dir = work / "hf"
    if not (hf_dir / "config.json").is_file():
        export_hf(ckpt, hf_dir)

    samples = questions(bench, args.questions)
    settings = GenerationConfig(max_new_tokens=args.max_tokens)  # min_new_tokens: not an API field
    common = {"device": "cpu", "batch_size": args.batch_size}
    rows = []
    medtune = build_backend(parse_spec("tuned", str(ckpt)), **common)
    qps_m, ref = timed(medtune, samples, settings)
    rows.append(("medtune (checkpoint)", qps_m, ref))
    hf = build_backend(parse_spec("hf", {"model": "hf", "path": str(hf_dir)}), **common)
    qps_h, texts = timed(hf, samples, settings)
    rows.append(("hf (exported LLaVA)", qps_h, texts))

    serve = runpy.run_path(str(REPO / "recipes" / "serve.py"))
    cfg = OmegaConf.load(REPO / "recipes" / "configs" / "serve" / "demo.yaml")
    cfg.checkpoint, cfg.assets_dir, cfg.max_batch_size, cfg.max_wait_ms = (
        str(ckpt),
        str(assets),
        8,
        10,
    )
    app, _, _ = serve["build_app"](cfg)
    qps_o = {}
    with Served(app) as srv:
        for conc in (1, 8):
            spec = {"model": "openai", "base_url": srv.url, "name": str(cfg.model_name),
                    "concurrency": conc}  # fmt: skip
            backend = build_backend(parse_spec("served", spec))
            qps_o[conc], texts = timed(backend, samples, settings)
            rows.append((f"openai (medtune serve), {conc} concurrent", qps_o[conc], texts))

    print(f"\n{args.questions} multiple-choice questions, batch {args.batch_size}, "
          f"{args.max_tokens} new tokens, greedy, CPU ({torch.get_num_threads()} threads)\n")  # fmt: skip
    print(f"{'backend':42s} {'questions/s':>12s} {'same text as medtune':>22s}")
    for name, qps, texts in rows:
        same = sum(a == b for a, b in zip(texts, ref))
        print(f"{name:42s} {qps:12.2f} {same:>15d}/{len(ref)}")
    print(f"\nratio medtune / hf (same weights):          {qps_m / qps_h:6.2f}x")
    print(f"ratio openai 8 / 1 concurrent requests:      {qps_o[8] / qps_o[1]:6.2f}x")


if __name__ == "__main__":
    main()
