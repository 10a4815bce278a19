"""``medtune serve``: an OpenAI-compatible chat-completions server and a web page for a MedVLM.

:func:`create_app` builds the FastAPI app around an :class:`Engine` (a loaded model);
``recipes/serve.py`` loads a checkpoint and runs it with :func:`serve` (uvicorn; SIGTERM drains
the requests in flight and exits 0).
"""

from medtune.serve.app import create_app
from medtune.serve.engine import Engine
from medtune.serve.protocol import APIError, Limits
from medtune.serve.server import serve

__all__ = ["APIError", "Engine", "Limits", "create_app", "serve"]
