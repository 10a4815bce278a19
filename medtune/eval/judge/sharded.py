"""The local judge sharded with FSDP2 over the processes of a torchrun launch.

Rank 0 reads the checkpoint once and scatters the shards; rank 0 leads the judge loop and the other
ranks follow its batches in lock-step (see :class:`ShardedGenerate`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from medtune.eval.judge.local_model import generate_texts_fn, instantiate_node, judge_settings


def _broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small control messages)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardedGenerate:
    """``generate_texts`` of a judge sharded with FSDP2 over the processes of a torchrun launch.

    FSDP2 all-gathers each layer's weights inside its forward, so every rank must run the same
    forwards in the same order. Two rules keep the ranks in lock-step:

    - **Rank 0 leads.** Only rank 0 runs the judge loop (it alone reads and writes the verdict
      cache, so only it knows which rows are pending and which UNPARSED replies to retry). Each
      call on rank 0 first broadcasts its prompts; the other ranks sit in :meth:`follow`,
      receive the same prompts and run the same batches. :meth:`close` on rank 0 sends the stop
      message that ends :meth:`follow`, then all ranks meet at a barrier and destroy the process
      group.
    - **Rank 0's tokens win.** Greedy decoding on identical inputs would give identical tokens on
      every rank in exact arithmetic, but nothing guarantees bitwise-equal kernels (e.g. a
      different reduction order can flip a near-tie argmax), and a rank whose row stopped one step
      earlier would leave the others blocked in an all-gather. So every decode step broadcasts
      rank 0's next tokens (``generate(..., sync_next=...)``: ``batch`` int64 per step, negligible
      next to the per-layer all-gathers); all ranks feed the same tokens and stop at the same step.

    Args:
        generate_texts: the per-process generate function (called with ``sync_next`` wired in).
        rank: this process's rank.
        world_size: the number of processes.
        numel: (elements of this rank's parameter shards, elements of all parameters).
    """

    def __init__(
        self,
        generate_texts: Callable[[list[str]], list[str]],
        rank: int,
        world_size: int = 1,
        numel: tuple[int, int] = (0, 0),
    ):
        self._generate_texts = generate_texts
        self.rank = rank
        self.world_size = world_size
        self.local_numel, self.total_numel = numel  # this rank's parameter shards, all parameters
        self._stopped = False
        self._inside = False  # True while a generate call is in flight (broken if it raised)

    def _run(self, prompts: list[str]) -> list[str]:
        self._inside = True
        texts = self._generate_texts(prompts)
        self._inside = False
        return texts

    def __call__(self, prompts: list[str]) -> list[str]:
        """Rank 0: send ``prompts`` to the other ranks, then generate with them."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 calls the sharded judge; the other ranks call follow()")
        if self._stopped:
            raise RuntimeError("the sharded judge is closed")
        prompts = list(prompts)
        _broadcast_object(prompts)
        return self._run(prompts)

    def follow(self) -> int:
        """Ranks other than 0: take part in rank 0's generate calls until it closes.

        Returns:
            The number of batches of prompts followed.
        """
        if self.rank == 0:
            raise RuntimeError("rank 0 leads the sharded judge; it does not follow")
        n = 0
        while True:
            prompts = _broadcast_object(None)
            if prompts is None:
                self._stopped = True
                return n
            self._run(prompts)
            n += 1

    def close(self) -> None:
        """Release the followers (rank 0), meet at a barrier and destroy the process group.

        After a generate call that raised midway the ranks are no longer in step: no collective
        is attempted then (torchrun ends the other ranks when this one exits with an error).
        """
        from medtune.utils.distributed import barrier, destroy

        if not self._inside:
            if self.rank == 0 and not self._stopped:
                _broadcast_object(None)
            self._stopped = True
            barrier()
        destroy()


def build_sharded_generate_fn(cfg: Mapping[str, Any]) -> ShardedGenerate:
    """The local judge sharded with FSDP2 over the processes of a torchrun launch.

    Each process initialises the process group (gloo on CPU, NCCL on CUDA, one GPU per local
    rank), builds the decoder on the meta device, shards it per layer then at the root
    (:func:`medtune.utils.distributed.shard_decoder`) on a 1-D mesh of all ranks, and gets its
    shards from the checkpoint read on rank 0 only (:func:`medtune.training.setup.load_sharded`).
    Greedy decoding; see :class:`ShardedGenerate` for the lock-step rules.

    Args:
        cfg: the ``judge`` section, as for :func:`build_local_generate_fn` (``quantize`` must be
            null: NF4 is the one-GPU path).

    Returns:
        The :class:`ShardedGenerate` (call it on rank 0; :meth:`ShardedGenerate.follow` elsewhere).
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torchtune import training

    from medtune.utils.distributed import (
        destroy,
        init_process_group,
        resolve_device,
        shard_decoder,
    )

    device = resolve_device(cfg.get("device") or "auto")
    dtype, quantize, max_new_tokens, batch_size = judge_settings(cfg, device)
    if quantize is not None:
        raise ValueError(
            "judge.quantize=nf4 runs in one process (70B in NF4 fits one 80 GB GPU); with "
            "--nproc_per_node the judge is sharded in judge.dtype: set judge.quantize=null"
        )
    rank, world_size = init_process_group(device, in_one_process=False)
    try:
        tokenizer = instantiate_node(cfg["tokenizer"])
        with training.set_default_dtype(dtype), torch.device("meta"):
            model = instantiate_node(cfg["model"])
        decoder = getattr(model, "decoder", model)
        mesh = init_device_mesh(device.type, (world_size,))
        shard_decoder(decoder, mesh)
        if decoder is not model:
            from medtune.utils.distributed import shard_module

            shard_module(model, mesh)
        state, error = None, None
        if rank == 0:  # only rank 0 reads the checkpoint (load_sharded sends the shards)
            try:
                state = instantiate_node(cfg["checkpointer"]).load_checkpoint()[training.MODEL_KEY]
            except Exception as e:  # report on every rank, not only here
                error = f"judge checkpoint could not be loaded on rank 0: {type(e).__name__}: {e}"
        error = _broadcast_object(error)
        if error:
            raise ValueError(error)
        # rank 0's tensors -> every rank's shards, one at a time (the trainers' loader); RoPE
        # caches are rebuilt off meta, and nothing may be left on meta
        from medtune.training.setup import check_on_device, load_sharded

        with training.set_default_dtype(dtype):
            load_sharded(model, state, device, "judge checkpoint")
        del state
        check_on_device(model)
        model.eval()
        model.requires_grad_(False)
        params = list(model.parameters())
        numel = (
            sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params),
            sum(p.numel() for p in params),
        )
    except BaseException:
        destroy()
        raise

    def sync_next(nxt: torch.Tensor) -> torch.Tensor:
        dist.broadcast(nxt, src=0)  # in place: every rank now holds rank 0's tokens
        return nxt

    fn = generate_texts_fn(
        model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, sync_next=sync_next
    )
    return ShardedGenerate(fn, rank, world_size, numel)
