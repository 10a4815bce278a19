"""Run the app with uvicorn until SIGINT / SIGTERM, drain what is in flight, and exit cleanly.

uvicorn (0.29 and later) stops accepting connections on SIGINT / SIGTERM, lets every open request
finish (streams included; the batcher keeps running until the last connection closes, then the
app's lifespan stops it), and then raises the signal again so that the process dies of it. For
SIGTERM that is exit status 143, which service managers and ``docker stop`` report as a failure:
:func:`serve` keeps the drain and drops that re-raise, so a drained SIGTERM shutdown returns 0.
Ctrl-C (SIGINT) is raised again as before (the entry wrapper prints ``serve: interrupted``, exit
130); a second Ctrl-C forces the exit.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn


class _Server(uvicorn.Server):
    received: list[int]

    def handle_exit(self, sig: int, frame) -> None:
        self.received.append(sig)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        self.received = []
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread (tests run the server in a thread)
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        if signal.SIGINT in self.received:  # Ctrl-C: KeyboardInterrupt, as without medtune
            signal.raise_signal(signal.SIGINT)


def serve(app, host: str, port: int, log_level: str = "info", sockets=None) -> int:
    """Serve ``app`` on ``host:port`` until SIGINT / SIGTERM, after draining in-flight requests.

    Args:
        app: the app of :func:`medtune.serve.create_app`.
        host, port: where to listen (the recipe's default is 127.0.0.1:8000).
        log_level: uvicorn's.
        sockets: already bound sockets to serve on instead (tests: no port race).

    Returns:
        0 after a drained SIGTERM shutdown; 1 when the server could not start (e.g. the port is
        taken). Ctrl-C raises KeyboardInterrupt after the drain.
    """
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    server.run(sockets=sockets)
    return 0 if server.started else 1
