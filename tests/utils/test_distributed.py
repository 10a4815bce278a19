"""medtune.utils.distributed: the one process-group helper and on_rank0 (run on rank 0, broadcast)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medtune.utils.distributed import init_process_group, on_rank0, world
from medtune.utils.errors import ConfigError, UserError


def test_one_process_without_a_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_process_group(torch.device("cpu"), in_one_process=False) == (0, 1)
    assert not dist.is_initialized()
    assert world() == (0, 1)
    assert on_rank0(lambda: {"a": 1}) == {"a": 1}
    with pytest.raises(UserError, match="bad row"):  # one process: fn's own error, as raised
        on_rank0(lambda: (_ for _ in ()).throw(UserError("bad row")), ConfigError)


def _rank(rank: int, store_file: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", store=dist.FileStore(store_file, 2), rank=rank, world_size=2)
    try:
        assert init_process_group(torch.device("cpu")) == (rank, 2)  # joins the existing group
        # rank 0's result on every rank, even where fn would give something else
        got = on_rank0(lambda: {"rank": dist.get_rank()})
        try:  # a user error on rank 0 stops every rank with rank 0's message
            on_rank0(
                lambda: (_ for _ in ()).throw(UserError(f"bad file on rank {rank}")), ConfigError
            )
            err = None
        except ConfigError as e:
            err = str(e)
        with open(f"{out}.{rank}", "w") as f:
            f.write(f"{got['rank']}|{err}")
    finally:
        dist.destroy_process_group()


def test_on_rank0_gives_rank0s_result_and_error_to_every_rank(tmp_path):
    # forked, not spawned: a spawned rank re-imports torch and this module (seconds of CPU) to
    # run two collectives; each forked rank builds its own gloo group from the file store
    args = (str(tmp_path / "store"), str(tmp_path / "out"))
    mp.start_processes(_rank, args=args, nprocs=2, start_method="fork")
    for rank in (0, 1):
        assert (tmp_path / f"out.{rank}").read_text() == "0|bad file on rank 0"
