"""The ``openai`` judge backend: any OpenAI-compatible ``/v1/chat/completions`` server.

Standard library only (``urllib.request`` and a thread pool): vLLM's OpenAI server, a hosted
model, anything that speaks the chat-completions protocol. Each prompt is sent as one user turn at
temperature 0. Requests run ``concurrency`` at a time; each has a socket timeout and is retried
with exponential backoff (bounded by ``max_retries``) on HTTP 408/429/5xx, connection errors,
timeouts and malformed replies (not JSON, or no ``choices[0].message``). Other HTTP errors (400,
401, 404, ...) fail at once with the server's message.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from medtune.utils.errors import UserError

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class JudgeHTTPError(UserError, RuntimeError):
    """The judge server could not give a usable reply (after the allowed retries)."""


class JudgeConfigError(UserError, ValueError):
    """The judge's settings cannot work (no model name, an API key variable that is not set)."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _chat_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + "/chat/completions"


class OpenAIJudge:
    """A judge served by an OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is
            appended unless already there).
        model: the model name the server expects.
        api_key_env: name of the environment variable holding the API key (sent as a Bearer
            token); None for a server without authentication (a local vLLM).
        name: the judge's name in the verdict cache; default ``openai:<model>``.
        temperature: sampling temperature (0 for a reproducible judge).
        max_tokens: reply length cap (the verdict is one word; a few tokens of slack).
        concurrency: requests in flight at once (threads).
        timeout_s: socket timeout per request, seconds.
        max_retries: retries per prompt after the first attempt (so ``max_retries + 1`` tries).
        backoff_s: first retry delay; doubled each retry (with up to 10% jitter).
        max_backoff_s: cap on one delay (also caps a server's ``Retry-After``).
        system_prompt: optional system turn before the user turn (none by default: the form
            medcap used is a single user turn).
        extra_body: extra JSON fields for the request (e.g. ``{"seed": 0}``).
        sleep: the sleep function (tests pass a fake).

    Raises:
        JudgeConfigError: ``api_key_env`` names a variable that is not set, or ``model`` is empty.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        name: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 8,
        concurrency: int = 4,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        system_prompt: str | None = None,
        extra_body: dict[str, Any] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not model:
            raise JudgeConfigError("judge.model must name the served model")
        self.url = _chat_url(base_url)
        self.model = model
        self.name = name or f"openai:{model}"
        self.api_key: str | None = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise JudgeConfigError(
                    f"judge.api_key_env is {api_key_env!r} but that environment variable is not "
                    "set (export it, or set judge.api_key_env=null for a server without auth)"
                )
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.concurrency = max(1, int(concurrency))
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.system_prompt = system_prompt
        self.extra_body = dict(extra_body or {})
        self._sleep = sleep
        host = urllib.parse.urlsplit(self.url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in _LOCAL_HOSTS else []
        self._opener = urllib.request.build_opener(*handlers)

    # -- one request ---------------------------------------------------------------------------

    def _request_body(self, prompt: str) -> bytes:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        body.update(self.extra_body)
        return json.dumps(body).encode("utf-8")

    def _post(self, prompt: str) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(
            self.url, data=self._request_body(prompt), headers=headers, method="POST"
        )
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace") if e.fp else ""
            if e.code in RETRY_STATUS:
                retry_after = None
                value = e.headers.get("Retry-After") if e.headers else None
                if value:
                    try:
                        retry_after = float(value)
                    except ValueError:
                        retry_after = None
                raise _Retryable(f"HTTP {e.code} {detail}".strip(), retry_after) from e
            raise JudgeHTTPError(
                f"judge server {self.url} answered HTTP {e.code}: {detail or e.reason}"
            ) from e
        except (OSError, http.client.HTTPException) as e:
            # URLError (refused, DNS), TimeoutError, ConnectionError and torn responses.
            reason = getattr(e, "reason", None) or e
            raise _Retryable(f"{type(e).__name__}: {reason}") from e
        try:
            data = json.loads(raw)
            message = data["choices"][0]["message"]
            content = message.get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise _Retryable(f"malformed reply ({type(e).__name__}): {raw[:200]!r}") from e
        return "" if content is None else str(content)

    def complete(self, prompt: str) -> str:
        """Send one prompt (with retries) and return the reply text.

        Raises:
            JudgeHTTPError: a non-retryable HTTP error, or every try failed.
        """
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(prompt)
            except _Retryable as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                delay = min(self.max_backoff_s, self.backoff_s * (2**attempt))
                if e.retry_after is not None:
                    delay = max(delay, min(self.max_backoff_s, e.retry_after))
                self._sleep(delay * (1 + 0.1 * random.random()))
        raise JudgeHTTPError(
            f"judge server {self.url} gave no usable reply after {self.max_retries + 1} tries; "
            f"last error: {last}"
        )

    # -- the backend interface ------------------------------------------------------------------

    def judge(self, prompts: list[str]) -> list[str]:
        """Reply texts for ``prompts`` (order kept), ``concurrency`` requests at a time.

        Raises:
            JudgeHTTPError: any prompt failed (after retries); requests not started are cancelled.
        """
        prompts = list(prompts)
        if not prompts:
            return []
        if self.concurrency == 1 or len(prompts) == 1:
            return [self.complete(p) for p in prompts]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts)))
        try:
            futures = [pool.submit(self.complete, p) for p in prompts]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
