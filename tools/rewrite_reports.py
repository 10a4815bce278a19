#!/usr/bin/env python
"""XrayGPT's data step: rewrite raw radiology reports into clean summaries with an LLM.

XrayGPT trains on "interactive summaries" that an LLM wrote from the MIMIC-CXR / OpenI reports
(its ``filter_cap.json``). This tool sends every report to any OpenAI-compatible server
(``medtune run serve``, vLLM, a hosted model) with the prompt below, and writes the same layout::

    python tools/rewrite_reports.py --input reports.jsonl --output dataset/openi/filter_cap.json \\
        --base-url http://127.0.0.1:8000/v1 --model medtune [--api-key-env OPENAI_API_KEY]

Input: a JSONL file of ``{"image_id": ..., "report": ...}`` rows, or a ``filter_cap.json``-style
file (``{"annotations": [{"image_id", "caption"}]}``) whose captions are the raw reports.
Output: ``{"annotations": [{"image_id", "caption"}]}`` in input order, rows refused left out.

- **Prompt** (:data:`PROMPT`, version :data:`PROMPT_VERSION`): one user turn, temperature 0.
- **Cache and resume** as the judge does (``medtune.eval.judge``): each accepted reply is appended
  to ``<output>.cache.jsonl`` keyed by (image_id, prompt hash, model); a rerun sends only the rows
  the cache lacks, so a server that fails mid-run loses nothing.
- **Refused by row**: an empty reply, or one cut by the length limit (``finish_reason:
  "length"``), is not written; the row is listed in ``<output>.refused.jsonl`` with the reason,
  and the exit status is 1. A server error (after ``--max-retries`` retries) stops the run with
  one line naming the row; rerun to resume.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from medtune.utils.errors import UserError, run_entry
from medtune.utils.jsonl import append_jsonl, read_jsonl, write_jsonl_atomic, write_text_atomic

PROMPT_VERSION = "xraygpt-summary-v1"
PROMPT = (
    "You are given a chest X-ray radiology report. Rewrite it as a short, clean summary of the "
    "findings and the impression, as a radiologist would tell them to a patient-facing colleague. "
    "Keep every clinical finding; remove comparisons with earlier studies, references to "
    "de-identified names, dates or times, and notes about who was informed. Answer with the "
    "summary only.\n\nReport:\n{report}"
)
PROMPT_HASH = hashlib.sha256(f"{PROMPT_VERSION}\n{PROMPT}".encode()).hexdigest()[:16]
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def read_reports(path: Path) -> list[dict]:
    """``[{"image_id", "report"}]`` from a JSONL file or a filter_cap.json-style file."""
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    if path.suffix == ".jsonl":
        rows = read_jsonl(path, strict=True, what="reports")
        key = "report"
    else:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))["annotations"]
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{path}: expected {{'annotations': [{{image_id, caption}}]}}"
            ) from None
        key = "caption"
    out, seen = [], set()
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not r.get("image_id") or not str(r.get(key) or "").strip():
            raise UserError(f"{path}: row {i} lacks image_id or a non-empty {key!r}")
        if r["image_id"] in seen:
            raise UserError(f"{path}: row {i}: image_id {r['image_id']!r} appears twice")
        seen.add(r["image_id"])
        out.append({"image_id": str(r["image_id"]), "report": str(r[key])})
    return out


def chat(url: str, model: str, prompt: str, *, max_tokens: int, api_key: str | None,
         timeout: float, max_retries: int, backoff: float) -> tuple[str, str | None]:  # fmt: skip
    """One chat completion: ``(content, finish_reason)``; retries 408/429/5xx and network errors."""
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]}).encode()  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for attempt in range(max_retries + 1):
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with opener.open(req, timeout=timeout) as resp:
                data = json.loads(resp.read())
            choice = data["choices"][0]
            return str(choice["message"].get("content") or ""), choice.get("finish_reason")
        except urllib.error.HTTPError as e:
            why = f"HTTP {e.code}"
            if e.code not in RETRY_STATUS:
                raise UserError(f"server {url} answered {why}") from None
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            why = f"{type(e).__name__}: {e}"
        if attempt < max_retries:
            time.sleep(backoff * 2**attempt)
    raise UserError(f"server {url} failed after {max_retries + 1} tries ({why})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rewrite_reports", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path, help="filter_cap.json to write")
    p.add_argument("--base-url", required=True, help="API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key-env", default=None)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--max-retries", type=int, default=3)
    p.add_argument("--backoff", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="only the first N reports")
    a = p.parse_args(argv)
    import os

    api_key = os.environ.get(a.api_key_env) if a.api_key_env else None
    if a.api_key_env and not api_key:
        raise UserError(f"--api-key-env {a.api_key_env}: that environment variable is not set")
    url = a.base_url.rstrip("/")
    url = url if url.endswith("/chat/completions") else url + "/chat/completions"
    reports = read_reports(a.input)[: a.limit]
    cache_path = Path(f"{a.output}.cache.jsonl")
    refused_path = Path(f"{a.output}.refused.jsonl")
    cached = {}
    if cache_path.exists():
        for r in read_jsonl(cache_path, repair=True, what="cached summaries"):
            if r.get("prompt_hash") == PROMPT_HASH and r.get("model") == a.model:
                cached[r["image_id"]] = r["caption"]
    a.output.parent.mkdir(parents=True, exist_ok=True)
    refused, sent = [], 0
    for row in reports:
        if row["image_id"] in cached:
            continue
        text, finish = chat(url, a.model, PROMPT.format(report=row["report"]),
                            max_tokens=a.max_tokens, api_key=api_key, timeout=a.timeout,
                            max_retries=a.max_retries, backoff=a.backoff)  # fmt: skip
        sent += 1
        reason = "empty reply" if not text.strip() else None
        if finish == "length":
            reason = f"truncated at --max-tokens {a.max_tokens} (finish_reason: length)"
        if reason:
            refused.append({"image_id": row["image_id"], "reason": reason, "reply": text})
            continue
        cached[row["image_id"]] = text.strip()
        append_jsonl(cache_path, {"image_id": row["image_id"], "prompt_hash": PROMPT_HASH,
                                  "model": a.model, "caption": text.strip()})  # fmt: skip
    anns = [{"image_id": r["image_id"], "caption": cached[r["image_id"]]}
            for r in reports if r["image_id"] in cached]  # fmt: skip
    write_text_atomic(a.output, json.dumps({"annotations": anns}, ensure_ascii=False, indent=1))
    write_jsonl_atomic(refused_path, refused)
    print(f"rewrite_reports: {len(anns)} of {len(reports)} summaries in {a.output} "
          f"({sent} sent, {len(reports) - sent - len(refused)} from the cache, {len(refused)} refused)")  # fmt: skip
    for r in refused:
        print(f"rewrite_reports: refused {r['image_id']}: {r['reason']}", file=sys.stderr)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(run_entry("rewrite_reports", main))
