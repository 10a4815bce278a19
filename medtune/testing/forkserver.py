"""Run the ``medtune`` CLI in forked copies of one pre-imported process (the integration tests).

A fresh ``medtune run ...`` process spends 10-15 CPU-seconds importing torch, torchtune, open_clip,
timm, transformers and medtune before the tiny recipe under test does a second of work; the test
suite starts a few hundred of them. :class:`ForkServer` starts one Python process that imports all
of that once, then forks a child per command: the child is the command exactly as the console
script would run it (``medtune._cli.main.main(argv)`` in the given folder, with the given
environment, stdin from ``/dev/null``, stdout and stderr to files, ``atexit`` handlers run, the exit
status passed on), minus the imports. ``nproc`` runs a distributed command as torchrun's
``--standalone`` launch would: one forked child per rank with ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` set, each running the recipe in-process (what
torchrun's worker does), their outputs concatenated in rank order.

What it does not do: run anything that must start a new interpreter (those tests keep their
subprocess; ``medtune run --nproc_per_node N`` still goes through torchrun when asked for
literally). Forking is safe because nothing in the server starts a thread or touches OpenMP before
the fork (imports only); each child sets its own thread count from ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["CHILD_CPU_SECONDS", "ForkServer", "signals_as_from_a_shell", "write_kill_wrapper"]

#: CPU-seconds (user + system) of every command run by any ForkServer of this process, their
#: workers included: a fresh process's CPU shows in getrusage(RUSAGE_CHILDREN), a forked
#: command's does not (the server reaps it), so per-test CPU accounting adds this
CHILD_CPU_SECONDS = [0.0]

#: modules every recipe run would import; a missing optional one is skipped
PRELOAD = (
    "torch",
    "torchvision",
    "torchtune",
    "torchtune.training",
    "torchtune.models.llama3",
    "torchtune.modules.peft",
    "open_clip",
    "timm",
    "transformers",
    "safetensors.torch",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "sklearn.metrics",
    "PIL.Image",
    "omegaconf",
    "pydicom",  # medtune.data.dicom imports it on first use: every SLAKE-fixture run
    "tiktoken",
    "sentencepiece",
)

_SERVER = r"""
import atexit, importlib, json, os, pkgutil, signal, sys, traceback
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception:
        pass
import medtune
# every medtune module (recipes import them; a fresh process would pay this per run); the
# server runs no code of theirs beyond the import
for info in pkgutil.walk_packages(medtune.__path__, "medtune."):
    if info.name.startswith(("medtune.serve", "medtune._recipes")):
        continue  # the ASGI stack is imported by the serve tests only, in their own process
    try:
        importlib.import_module(info.name)
    except Exception:
        pass
import medtune._cli.main as cli

def child(job, rank_env):
    from medtune.testing.forkserver import signals_as_from_a_shell

    signals_as_from_a_shell()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # what Python installs at start-up
    os.chdir(job["cwd"])
    for k, v in {**job["env"], **rank_env}.items():
        if k == "_SUFFIX":
            continue
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for p in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    if os.environ.get("OMP_NUM_THREADS"):
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(job["out"] + rank_env.get("_SUFFIX", ""), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(job["err"] + rank_env.get("_SUFFIX", ""), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.argv = ["medtune", *job["argv"]]
    try:
        status = cli.main(job["argv"])
    except SystemExit as e:
        status = e.code
    except BaseException:
        traceback.print_exc()
        status = 1
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)

print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pids = []
    for rank_env in job["ranks"]:
        pid = os.fork()
        if pid == 0:
            child(job, rank_env)
        pids.append(pid)
    print(json.dumps({"pids": pids}), flush=True)
    codes, cpu = [], 0.0
    for p in pids:
        _, status, usage = os.wait4(p, 0)
        codes.append(os.waitstatus_to_exitcode(status))
        cpu += usage.ru_utime + usage.ru_stime
    print(json.dumps({"codes": codes, "cpu": cpu}), flush=True)
"""


# Runs the recipe script in this interpreter and dies before its K-th AdamW update
_KILL_WRAPPER = """
import os, runpy, signal, sys
import torch

K = int(os.environ["MEDTUNE_TEST_KILL_AT_STEP"])
_orig, _calls = torch.optim.AdamW.step, [0]

def step(self, *a, **k):
    _calls[0] += 1
    if _calls[0] == K:
        {die}
    return _orig(self, *a, **k)

torch.optim.AdamW.step = step
sys.argv = [{recipe!r}, *sys.argv[1:]]
runpy.run_path({recipe!r}, run_name="__main__")
"""


def write_kill_wrapper(recipe: Path, folder: Path, exit_code: int | None = None) -> Path:
    """Write a script that runs ``recipe`` and dies before its K-th optimizer (AdamW) update.

    K comes from the environment variable ``MEDTUNE_TEST_KILL_AT_STEP``. The script is
    ``folder/kill/<recipe name>.py``: named as the recipe, so that ``medtune run <script>
    --config <name>`` finds the recipe's configs, and in a folder of its own, so that the recipe's
    name run from ``folder`` does not resolve to it.

    Args:
        recipe: the recipe script (``recipes/<name>.py``).
        folder: where the ``kill`` folder goes.
        exit_code: None: the process SIGKILLs itself (no cleanup, no atexit, no flush); else it
            flushes stdout and leaves with ``os._exit(exit_code)``.

    Returns:
        The script's path.
    """
    if exit_code is None:
        die = "os.kill(os.getpid(), signal.SIGKILL)"
    else:
        die = f"sys.stdout.flush()\n        os._exit({int(exit_code)})"
    path = Path(folder) / "kill" / Path(recipe).name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_KILL_WRAPPER.format(recipe=str(recipe), die=die))
    return path


def signals_as_from_a_shell() -> None:
    """SIGINT and SIGTERM at their defaults and unblocked, as in a process a shell starts.

    Use as ``subprocess.Popen(..., preexec_fn=signals_as_from_a_shell)`` in tests that signal the
    process they start: an ignored or blocked signal is inherited across fork and exec, and a
    test process can have one (seen: a serve process started from an xdist worker exited 0 on
    SIGINT because SIGINT reached it ignored or blocked).
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ForkServer:
    """One pre-imported interpreter that runs ``medtune <argv>`` commands in forked children.

    Args:
        env: environment of the server (and so of every child before its own ``env``).
        preload: modules to import before the first fork.

    Use one per test process (a session fixture); commands run one at a time.
    """

    def __init__(self, env: Mapping[str, str] | None = None, preload: Sequence[str] = PRELOAD):
        self._dir = Path(tempfile.mkdtemp(prefix="medtune-forkserver-"))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, json.dumps(list(preload))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # import-time chatter (torchao's cpp-extension line) goes to a file, read on failure
            stderr=open(self._dir / "server.err", "w"),  # noqa: SIM115 (the child owns the fd)
            env=dict(env if env is not None else os.environ),
            bufsize=0,
        )
        self._n = 0
        self._buf = b""
        #: pids of the command running now, one per rank (for ``kill_when`` callbacks that send
        #: their own signal); empty between commands
        self.running: list[int] = []
        self._read()  # {"ready": true} once the imports are done

    def run(
        self,
        *argv: str,
        cwd: str | os.PathLike = ".",
        env: Mapping[str, str | None] | None = None,
        nproc: int = 1,
        timeout: float = 600,
        kill_when: Callable[[], bool] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``medtune *argv`` in a forked child; like ``subprocess.run(capture_output=True)``.

        Args:
            argv: the CLI arguments (``"run", "vision_finetune", "--config", "demo", ...``).
            cwd: the child's working folder.
            env: variables to set in the child (``None`` removes one).
            nproc: run as that many ranks of one standalone process group (see the module doc).
            timeout: seconds before the child is killed and ``subprocess.TimeoutExpired`` raised.
            kill_when: polled every 5 ms while the command runs; once it returns True every
                child is SIGKILLed (the command's return code is then ``-9``).

        Returns:
            A CompletedProcess with ``returncode`` (the first non-zero rank's, negative for a
            signal), ``stdout`` and ``stderr`` (ranks concatenated in rank order).
        """
        self._n += 1
        out, err = self._dir / f"{self._n}.out", self._dir / f"{self._n}.err"
        ranks = [{}]
        if nproc > 1:
            port = str(_free_port())
            ranks = [
                {
                    "RANK": str(r),
                    "LOCAL_RANK": str(r),
                    "GROUP_RANK": "0",
                    "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc),
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "_SUFFIX": f".{r}",
                }
                for r in range(nproc)
            ]
        job = {
            "argv": list(argv),
            "cwd": str(cwd),
            "env": dict(env or {}),
            "out": str(out),
            "err": str(err),
            "ranks": ranks,
        }
        self._proc.stdin.write((json.dumps(job) + "\n").encode())
        pids = json.loads(self._read())["pids"]
        self.running = list(pids)
        deadline = time.monotonic() + timeout
        timed_out = False
        # the server answers when every child has exited; meanwhile watch the clock / condition
        while b"\n" not in self._buf and not select.select([self._proc.stdout], [], [], 0.005)[0]:
            if (kill_when is not None and kill_when()) or time.monotonic() > deadline:
                timed_out = time.monotonic() > deadline
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
        done = json.loads(self._read())
        self.running = []
        codes = done["codes"]
        CHILD_CPU_SECONDS[0] += done["cpu"]
        suffixes = [r.get("_SUFFIX", "") for r in ranks]
        stdout = "".join(_read_text(Path(f"{out}{s}")) for s in suffixes)
        stderr = "".join(_read_text(Path(f"{err}{s}")) for s in suffixes)
        if timed_out:
            raise subprocess.TimeoutExpired(["medtune", *argv], timeout, stdout, stderr)
        code = next((c for c in codes if c != 0), 0)
        return subprocess.CompletedProcess(["medtune", *argv], code, stdout, stderr)

    def run_command(
        self,
        cmd: Sequence[str],
        cwd: str | os.PathLike = ".",
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess:
        """A drop-in for ``subprocess.run([MEDTUNE, ...], capture_output=True, text=True)``.

        ``cmd[0]`` is the ``medtune`` console script (or ``python -m medtune._cli.main``);
        ``run --nproc_per_node N`` becomes ``nproc=N`` (the only torchrun flag understood here);
        ``env`` is a whole environment as subprocess takes it (its ``PYTHONPATH`` entries are put
        on the child's ``sys.path``).
        """
        cmd = [str(c) for c in cmd]
        if cmd[:3] == [sys.executable, "-m", "medtune._cli.main"]:
            argv = cmd[3:]
        elif Path(cmd[0]).name == "medtune":
            argv = cmd[1:]
        else:
            raise ValueError(f"not a medtune command: {cmd[:3]}")
        nproc = 1
        if argv[:2] == ["run", "--nproc_per_node"]:
            nproc, argv = int(argv[2]), ["run", *argv[3:]]
        return self.run(*argv, cwd=cwd, env=env, nproc=nproc, timeout=timeout)

    def _read(self) -> str:
        """One line of the server's answers (unbuffered pipe: select() sees what is unread)."""
        while b"\n" not in self._buf:
            chunk = os.read(self._proc.stdout.fileno(), 65536)
            if not chunk:
                log = _read_text(self._dir / "server.err")[-3000:]
                raise RuntimeError(f"the medtune fork server exited:\n{log}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        """Stop the server (it exits when its stdin closes)."""
        with contextlib.suppress(Exception):
            self._proc.stdin.close()
            self._proc.wait(30)
        for f in self._dir.glob("*"):
            f.unlink()
        with contextlib.suppress(OSError):
            self._dir.rmdir()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
