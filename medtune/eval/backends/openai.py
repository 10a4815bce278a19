"""``model: openai``: any OpenAI-compatible chat-completions server (vLLM, SGLang, medtune serve).

Built on the judge's HTTP client (:class:`medtune.eval.judge.http.OpenAIJudge`: standard
library, ``concurrency`` requests in flight, socket timeout, retries with exponential backoff on
HTTP 408/429/5xx, refused or dropped connections and malformed replies). Each sample is one user
turn: its images as ``image_url`` data URLs (PNG; DICOM is windowed first, as the readers do),
then the text; ``system_prompt`` adds a system turn. ``max_new_tokens`` and ``temperature`` come
from the generation settings (``seed`` is sent as the request's ``seed``).

Resumable as the judge is: eval appends each chunk's rows to ``predictions.jsonl`` as soon as it
has them and skips ids already there on the next run, so a killed run loses at most the chunk in
flight and never writes a row twice. Under torchrun rank 0 sends the requests; the texts are
broadcast to the other ranks.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from medtune.eval.judge.http import JudgeHTTPError, OpenAIJudge
from medtune.utils.errors import UserError

__all__ = ["OpenAIBackend", "image_data_url"]


def image_data_url(image: Any, window: Any = None) -> str:
    """An image reference (path, DICOM, PIL, array) as a PNG data URL."""
    from medtune.data.images import load_image

    buf = io.BytesIO()
    load_image(image, window=window).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _ChatClient(OpenAIJudge):
    """The judge's client, sending a prepared ``messages`` list instead of one text prompt."""

    def _request_body(self, prompt: Any) -> bytes:  # prompt: (messages, extra fields)
        import json

        messages, fields = prompt
        body = {"model": self.model, "messages": messages, **fields}
        body.update(self.extra_body)
        return json.dumps(body).encode("utf-8")


class OpenAIBackend:
    """Answers from an OpenAI-compatible server.

    Args:
        spec: ``{"model": "openai", "base_url": "http://host:port/v1", "name": served model,
            "api_key_env": null, "concurrency": 8, "timeout_s": 120, "max_retries": 5,
            "backoff_s": 1.0, "system_prompt": null, "extra_body": {}}``.
        system_prompt: the eval config's system prompt (``spec.system_prompt`` wins).
        window: DICOM window for the data URLs.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        system_prompt: str | None = None,
        window: Any = None,
        **_: Any,
    ) -> None:
        self.identity = spec["identity"]
        self.window = window
        self.system_prompt = spec.get("system_prompt") or system_prompt
        self.client = _ChatClient(
            base_url=spec["base_url"],
            model=spec["name"],
            api_key_env=spec.get("api_key_env"),
            concurrency=int(spec.get("concurrency") or 8),
            timeout_s=float(spec.get("timeout_s") or 120.0),
            max_retries=int(spec.get("max_retries") if spec.get("max_retries") is not None else 5),
            backoff_s=float(spec.get("backoff_s") if spec.get("backoff_s") is not None else 1.0),
            extra_body=dict(spec.get("extra_body") or {}),
        )

    def request(self, sample, settings) -> tuple[list[dict], dict[str, Any]]:
        """The ``messages`` and sampling fields of one sample's request."""
        user = [m.content for m in sample.messages if m.role == "user"][-1]
        content: list[dict] = [
            {"type": "image_url", "image_url": {"url": image_data_url(i, self.window)}}
            for i in sample.images
        ]
        content.append({"type": "text", "text": user})
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        fields: dict[str, Any] = {
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "seed": settings.seed,
        }
        if settings.temperature > 0:
            fields.update(
                {
                    k: v
                    for k, v in (("top_p", settings.top_p), ("top_k", settings.top_k))
                    if v is not None
                }
            )
        return messages, fields

    def answer(self, samples: list, settings) -> list[str]:
        """Reply texts in order (rank 0 asks the server; other ranks receive them)."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            return self.client.judge([self.request(s, settings) for s in samples])
        box: list[Any] = [None, None]  # texts, or the error that stopped rank 0
        if dist.get_rank() == 0:
            try:
                box[0] = self.client.judge([self.request(s, settings) for s in samples])
            except UserError as e:
                box[1] = str(e)
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise JudgeHTTPError(box[1])
        return list(box[0])

    def close(self) -> None:
        pass
