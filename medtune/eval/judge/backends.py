"""Judge backends: the interface, and the local Llama-3 judge through medtune's inference path.

One interface (:class:`JudgeBackend`: ``name`` and ``judge(prompts) -> raw texts``). The HTTP
backend is :class:`medtune.eval.judge.http.OpenAIJudge`; the local one is :class:`LocalJudge`
around a ``generate_texts`` callable built by :func:`build_local_generate_fn` (one process, bf16
or NF4) or, under torchrun, :func:`medtune.eval.judge.sharded.build_sharded_generate_fn` (FSDP2).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from medtune.eval.judge.local_model import generate_texts_fn, instantiate_node, judge_settings
from medtune.eval.judge.sharded import build_sharded_generate_fn


class JudgeBackend(Protocol):
    """What :func:`run_judge` needs from a judge: a stable name and a batch call."""

    name: str

    def judge(self, prompts: list[str]) -> list[str]:
        """Return the raw reply text for each prompt (one user turn each), in order."""
        ...


class LocalJudge:
    """A judge around an injected ``generate_texts(prompts) -> texts`` callable.

    The callable owns the model (e.g. a torchtune Llama-3 through medtune's generation, greedy);
    this class only checks the contract and names the judge for the cache. When the callable is
    a :class:`~medtune.eval.judge.sharded.ShardedGenerate` (under torchrun), rank 0 calls :meth:`judge` and the other ranks
    call :meth:`follow`; :meth:`close` ends the run on every rank.

    Args:
        generate_texts: maps a list of user-turn prompts to the same number of reply texts.
        name: the judge's name in the verdict cache (e.g. ``local:llama3_70b_instruct_nf4``).
    """

    def __init__(self, generate_texts: Callable[[list[str]], list[str]], name: str = "local"):
        self.generate_texts = generate_texts
        self.name = name

    @property
    def rank(self) -> int:
        """This process's rank (0 unless the model is sharded over several processes)."""
        return int(getattr(self.generate_texts, "rank", 0))

    def judge(self, prompts: list[str]) -> list[str]:
        """Generate one reply per prompt."""
        if not prompts:
            return []
        texts = list(self.generate_texts(list(prompts)))
        if len(texts) != len(prompts):
            raise RuntimeError(
                f"judge {self.name!r}: generate_texts returned {len(texts)} texts for "
                f"{len(prompts)} prompts"
            )
        return [str(t) for t in texts]

    def follow(self) -> int:
        """Ranks other than 0 of a sharded judge: run rank 0's batches until it closes.

        Returns:
            The number of batches followed.
        """
        follow = getattr(self.generate_texts, "follow", None)
        if follow is None:
            raise RuntimeError(f"judge {self.name!r} is not sharded: there is nothing to follow")
        return int(follow())

    def close(self) -> None:
        """Release the model's processes (sharded: stop the followers, barrier, destroy group)."""
        close = getattr(self.generate_texts, "close", None)
        if callable(close):
            close()


def build_local_generate_fn(cfg: Mapping[str, Any]) -> Callable[[list[str]], list[str]]:
    """Build ``generate_texts(prompts) -> texts`` for a local torchtune Llama-3 Instruct judge.

    Each prompt becomes one user turn in the Llama-3 chat format (token ids, with an open
    assistant header); replies are generated greedily by :func:`medtune.generation.generate`
    (batched, left-padded, KV cache) and decoded without special tokens.

    Under torchrun with more than one process (``WORLD_SIZE > 1``) the model is sharded with FSDP2
    instead and a :class:`ShardedGenerate` is returned (see there for how ranks stay in lock-step).

    Args:
        cfg: the ``judge`` config section:
            ``tokenizer`` / ``model`` / ``checkpointer`` (``_component_`` nodes: e.g.
            ``medtune.models.llama3.llama3_tokenizer``, ``torchtune.models.llama3.llama3_70b``
            or ``medtune.models.llama3.llama3_from_hf_config``, a torchtune checkpointer);
            ``device`` (default cuda when available; under torchrun, each rank's local GPU),
            ``dtype`` (``bf16`` | ``fp32`` | ``fp16``, default bf16 on CUDA, fp32 on CPU),
            ``quantize`` (null or ``nf4``; one process only), ``max_new_tokens`` (default 8),
            ``batch_size`` (prompts per generate call, default 8).

    Returns:
        The callable.

    Raises:
        ValueError: an unknown ``quantize`` value, ``nf4`` with several processes, or a
            checkpoint whose keys do not match the model.
    """
    import torch
    from torchtune import training

    from medtune.training.loader import load_model  # here: importing the judge needs no torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return build_sharded_generate_fn(cfg)
    device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype, quantize, max_new_tokens, batch_size = judge_settings(cfg, device)

    tokenizer = instantiate_node(cfg["tokenizer"])
    checkpointer = instantiate_node(cfg["checkpointer"])
    state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    model = load_model(
        cfg["model"],
        state,
        device=device,
        dtype=dtype,
        source="judge checkpoint",
        everything_on_meta=True,
        quantize=quantize,
    )
    del state
    model.eval()
    model.requires_grad_(False)
    return generate_texts_fn(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens)


def build_local_judge(name: str = "local", **cfg: Any) -> LocalJudge:
    """Config entry point of the local backend: :func:`build_local_generate_fn` in a LocalJudge.

    Args:
        name: the judge's name in the verdict cache.
        **cfg: the rest of the ``judge`` config section, passed to :func:`build_local_generate_fn`.
    """
    return LocalJudge(build_local_generate_fn(cfg), name=name)
