"""Run ``medtune`` commands for the MAVL recipe tests in processes forked from one pre-imported
server (torch, torchtune, transformers, matplotlib and medtune imported once per pytest process):
a CLI subprocess pays ~10 CPU-seconds of imports, a fork almost none.

A job runs ``medtune._cli.main.main(argv)`` in ``ranks`` forked children. With ``ranks > 1`` each
child gets the environment torchrun would give it (``MASTER_ADDR``/``PORT``, ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``), so the recipe's own ``init_process_group`` joins a gloo group:
what is tested is the recipe's distributed code, not torchrun's launcher (tested elsewhere).
``kill_at_step`` makes the child SIGKILL itself when the optimizer is about to take that step.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SERVER = r"""
import json, os, signal, sys
os.environ["OMP_NUM_THREADS"] = "1"
import torch, torchtune, transformers, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import medtune._cli.main as cli
import medtune.models.mavl, medtune.data.mavl_entities, medtune.training.checkpointing
import medtune.eval.classification_metrics

def child(job, rank):
    os.chdir(job["cwd"])
    log = job["log"] + (f".rank{rank}" if job["ranks"] > 1 else "")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(job.get("env", {}))
    if job["ranks"] > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]), RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE=str(job["ranks"]))
    if job.get("kill_at_step"):
        orig, calls = torch.optim.AdamW.step, [0]
        def step(self, *a, **k):
            calls[0] += 1
            if calls[0] == job["kill_at_step"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, *a, **k)
        torch.optim.AdamW.step = step
    try:
        status = cli.main(job["argv"])
    except SystemExit as e:
        status = e.code
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(status or 0) if isinstance(status, int) or status is None else 1)

for line in sys.stdin:
    job = json.loads(line)
    pids = []
    for rank in range(job["ranks"]):
        pid = os.fork()
        if pid == 0:
            child(job, rank)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
    print(json.dumps({"status": codes}), flush=True)
"""

_server: subprocess.Popen | None = None


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
        _server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, env=env, text=True, cwd=REPO)  # fmt: skip
        atexit.register(_stop)
    return _server


def _stop() -> None:
    if _server is not None and _server.poll() is None:
        _server.stdin.close()
        _server.wait(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def medtune(*argv: str, cwd: Path, ranks: int = 1, kill_at_step: int | None = None,
            env: dict | None = None) -> tuple[list[int], str]:  # fmt: skip
    """Run ``medtune <argv>``. Returns (exit status per rank, rank 0's stdout + stderr)."""
    server = _start()
    log = Path(cwd) / f"run-{time.monotonic_ns()}.log"
    job = {"argv": list(argv), "cwd": str(cwd), "log": str(log), "ranks": ranks,
           "port": _free_port(), "kill_at_step": kill_at_step, "env": env or {}}  # fmt: skip
    server.stdin.write(json.dumps(job) + "\n")
    server.stdin.flush()
    reply = server.stdout.readline()
    assert reply, "the fork server died"
    status = json.loads(reply)["status"]
    text = Path(str(log) + (".rank0" if ranks > 1 else "")).read_text()
    return status, text


def ok(*argv: str, cwd: Path, ranks: int = 1, **kw) -> str:
    """:func:`medtune`, asserting every rank exited 0. Returns rank 0's output."""
    status, text = medtune(*argv, cwd=cwd, ranks=ranks, **kw)
    if status != [0] * ranks:
        others = "".join(
            p.read_text()[-3000:] for p in sorted(Path(cwd).glob("run-*.log.rank[1-9]"))
        )
        raise AssertionError(f"exit {status}\n{text[-5000:]}\n{others}")
    return text
