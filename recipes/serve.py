"""Serve a trained MedVLM (or a plain Llama-3) over an OpenAI-compatible API, with a web page.

    medtune run serve --config default checkpoint=outputs/run1/epoch_2            # 127.0.0.1:8000
    medtune run serve --config default checkpoint=outputs/run1/epoch_2 host=0.0.0.0 port=9000 \\
        api_key_env=MEDTUNE_API_KEY
    medtune run serve --config demo                 # the demo checkpoint on the tiny assets

Then open http://127.0.0.1:8000/ (upload a PNG/JPEG/DICOM image, pick a DICOM window, ask), or
use any OpenAI client::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="medtune", max_tokens=32, temperature=0, messages=[
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
            {"type": "text", "text": "Which side is the lesion on?"}]}])

Features (all set in the config):

- **Model**: ``checkpoint`` is a medtune checkpoint folder (``output_dir/epoch_k`` of a training
  recipe: ``config.yaml`` + ``model.safetensors``), rebuilt with
  :func:`medtune.training.loading.load_from_checkpoint` (``checkpoint_overrides`` patches its saved
  config, e.g. a moved ``assets_dir``; ``llm_dtype``, ``device``). Or ``llm``: a plain Llama-3
  (``tokenizer`` / ``model`` / ``checkpointer`` ``_component_`` nodes, as the local judge takes),
  served text-only, e.g. as the ``openai_compatible`` judge of ``vqa_judge``. ``model_name`` is
  the name in ``/v1/models`` (default: ``medtune``).
- **API** (:mod:`medtune.serve.app`): ``POST /v1/chat/completions`` (text and ``image_url`` parts
  as ``data:`` URLs: PNG, JPEG, ``data:application/dicom;base64,...``; ``max_tokens``,
  ``temperature``, ``top_p``, ``stop``, ``seed``, ``n=1``; ``stream: true`` as server-sent events;
  ``usage``; medtune's ``window`` field windows DICOM images), ``GET /v1/models``, ``GET /health``,
  and the page at ``GET /``. Answers go through :func:`medtune.inference.answer`, the path eval
  and generate use.
- **Batching**: concurrent requests are batched into one generation, up to ``max_batch_size``,
  the oldest waiting at most ``max_wait_ms``; a greedy answer equals the one the request gets
  alone. ``max_batch_size=1`` serves one at a time.
- **Limits**: ``max_body_mb`` (413 beyond), ``max_images`` per request, ``max_image_pixels``,
  ``max_queue`` waiting requests (503 with ``Retry-After`` beyond, at once), ``max_seq_len``
  (default the model's context; longer prompts get 400), ``default_max_tokens`` when a request
  sets none. Bad requests get HTTP 400 with an OpenAI error object; the server keeps serving.
- **Safety**: binds ``host`` (127.0.0.1 unless told otherwise); images are read only from the
  request, never from a path or URL a client names; ``api_key_env`` names an environment variable
  holding the API key (``Authorization: Bearer``; 401 without it). The key never goes in a config.
- ``system_prompt`` is prepended to every conversation; ``log_level`` is uvicorn's.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medtune.utils.config import cfg_get, check_keys, one_of, positive
from medtune.utils.errors import ConfigError, run_entry

SUPPORTS_DISTRIBUTED = False

KNOWN_KEYS = {
    "output_dir",
    "assets_dir",
    "checkpoint",
    "checkpoint_overrides",
    "llm",
    "device",
    "llm_dtype",
    "model_name",
    "host",
    "port",
    "api_key_env",
    "max_batch_size",
    "max_wait_ms",
    "max_queue",
    "max_body_mb",
    "max_images",
    "max_image_pixels",
    "max_seq_len",
    "default_max_tokens",
    "system_prompt",
    "log_level",
}


def _log(msg: str) -> None:
    print(f"serve: {msg}", flush=True)


def load_plain_llm(node: Any, device: torch.device, dtype: torch.dtype):
    """A bare Llama-3 from ``tokenizer`` / ``model`` / ``checkpointer`` nodes -> (model, tokenizer),
    through the one loader (:func:`medtune.training.loader.load_model`)."""
    from medtune.training.loader import load_model
    from medtune.training.setup import read_llm_state

    for part in ("tokenizer", "model", "checkpointer"):
        if node.get(part) is None:
            raise ConfigError(f"llm.{part}: missing (expected a _component_ node)")
    tokenizer = config.instantiate(node.tokenizer)
    model = load_model(
        node.model,
        read_llm_state(node.checkpointer),
        device=device,
        dtype=dtype,
        source=f"llm.checkpointer ({node.checkpointer.get('checkpoint_dir')})",
        everything_on_meta=True,
    )
    model.eval().requires_grad_(False)
    return model, tokenizer


def build_app(cfg: DictConfig):
    """Load the model named by the config and build the app (no server started).

    Returns:
        ``(app, host, port)``.
    """
    from medtune.models.llama3 import decoder_dtype
    from medtune.serve import Engine, Limits, create_app
    from medtune.utils.distributed import resolve_device

    check_keys(cfg, KNOWN_KEYS, "serve")
    checkpoint = cfg_get(cfg, "checkpoint", str, None)
    if (checkpoint is None) == (cfg.get("llm") is None):
        raise ConfigError(
            "checkpoint: set checkpoint=<run>/epoch_<k> (a medtune checkpoint folder) or an llm "
            "section (a plain Llama-3), exactly one of them"
        )
    host = cfg_get(cfg, "host", str, "127.0.0.1")
    port = cfg_get(cfg, "port", int, 8000, check=(lambda v: 0 <= v < 65536, "must be 0..65535"))
    key_env = cfg_get(cfg, "api_key_env", str, None)
    api_key = None
    if key_env:
        api_key = os.environ.get(key_env)
        if not api_key:
            raise ConfigError(
                f"api_key_env: the environment variable {key_env!r} is not set (export it, or "
                "set api_key_env=null to serve without a key)"
            )
    limits = Limits(
        max_body_bytes=int(cfg_get(cfg, "max_body_mb", float, 16.0, check=positive()) * 2**20),
        max_images=cfg_get(cfg, "max_images", int, 4, check=positive()),
        max_image_pixels=cfg_get(cfg, "max_image_pixels", int, 4096 * 4096, check=positive()),
        default_max_tokens=cfg_get(cfg, "default_max_tokens", int, 256, check=positive()),
    )
    batching = {
        "max_batch_size": cfg_get(cfg, "max_batch_size", int, 8, check=positive()),
        "max_wait_ms": cfg_get(cfg, "max_wait_ms", float, 10.0, check=(lambda v: v >= 0, ">= 0")),
        "max_queue": cfg_get(cfg, "max_queue", int, 64, check=positive()),
    }
    cfg_get(
        cfg, "log_level", str, "info", check=one_of("critical", "error", "warning", "info", "debug")
    )
    device = resolve_device(cfg_get(cfg, "device", str, "auto"))
    llm_dtype = cfg_get(cfg, "llm_dtype", str, None)
    if checkpoint is not None:
        from medtune.training.loading import load_from_checkpoint

        node = cfg.get("checkpoint_overrides")
        overrides = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else {}
        _log(f"loading {checkpoint}")
        model, tokenizer, _ = load_from_checkpoint(checkpoint, device, llm_dtype, overrides)
    else:
        _log("loading a plain Llama-3 (text only)")
        model, tokenizer = load_plain_llm(cfg.llm, device, decoder_dtype(llm_dtype or "fp32"))
    engine = Engine(
        model,
        tokenizer,
        name=cfg_get(cfg, "model_name", str, "medtune"),
        max_seq_len=cfg_get(cfg, "max_seq_len", int, None, check=positive()),
        system_prompt=cfg_get(cfg, "system_prompt", str, None),
    )
    app = create_app(engine, limits=limits, api_key=api_key, **batching)
    return app, host, port


@config.parse
def recipe_main(cfg: DictConfig) -> int:
    """Entry point: ``python recipes/serve.py --config CONFIG [key=value ...]``."""
    from medtune.serve import serve

    app, host, port = build_app(cfg)
    log_level = cfg_get(cfg, "log_level", str, "info")
    _log(
        f"serving {app.state.engine.name} on http://{host}:{port}/ (Ctrl-C or SIGTERM stops it "
        "after answering the requests in flight)"
    )
    return serve(app, host, port, log_level)


if __name__ == "__main__":
    sys.exit(run_entry("serve", recipe_main))
