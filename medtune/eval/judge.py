"""LLM-as-judge for VQA predictions (DESIGN §3 "Judge"; issue 7).

Pieces, each usable alone:

- the prompt: :data:`DEFAULT_PROMPT_TEMPLATE` (versioned by :data:`PROMPT_VERSION`), rendered per
  predictions row by :func:`render_prompt`; :func:`prompt_sha256` is stored with every verdict;
- the parser: :func:`parse_verdict`, strict (first word RIGHT or WRONG, else ``UNPARSED``);
- backends, one interface (:class:`JudgeBackend`: ``name`` and ``judge(prompts) -> raw texts``):
  :class:`OpenAIJudge` (any OpenAI-compatible ``/v1/chat/completions`` server, standard library
  only) and :class:`LocalJudge` (an injected ``generate_texts`` callable);
- the verdict cache: :class:`VerdictStore`, an append-only ``verdicts.jsonl`` keyed by
  (judge name, prompt hash, row key), flushed per verdict, so a killed run resumes with no verdict
  lost or duplicated;
- the loop: :func:`run_judge`; the summary: :func:`summarize` and :func:`summary_markdown`.

No torch at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from medtune.eval.judge_http import JudgeConfigError, JudgeHTTPError, OpenAIJudge
from medtune.eval.predictions import PredictionsError
from medtune.eval.vqa_metrics import answer_type_of, closed_strict, normalize

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "PROMPT_VERSION",
    "JudgeBackend",
    "JudgeConfigError",
    "JudgeHTTPError",
    "LocalJudge",
    "OpenAIJudge",
    "ShardedGenerate",
    "VerdictStore",
    "VerdictsFileError",
    "build_local_generate_fn",
    "build_local_judge",
    "build_sharded_generate_fn",
    "cohen_kappa",
    "parse_verdict",
    "prompt_sha256",
    "render_prompt",
    "row_key",
    "run_judge",
    "summarize",
    "summary_markdown",
]

RIGHT, WRONG, UNPARSED = "RIGHT", "WRONG", "UNPARSED"
VERDICTS = (RIGHT, WRONG, UNPARSED)

PROMPT_VERSION = "medtune-vqa-judge-v1"
# One user turn, in the form medcap used with Llama-3-70B-Instruct: question, our answer, the
# correct answer, and a request for one word. Fields: {question}, {prediction}, {answer}.
DEFAULT_PROMPT_TEMPLATE = (
    "You are checking answers to questions about medical images.\n"
    "\n"
    "Question: {question}\n"
    "Our answer: {prediction}\n"
    "Correct answer: {answer}\n"
    "\n"
    "Does our answer mean the same as the correct answer? Reply with only one word: RIGHT if it "
    "does, WRONG if it does not."
)


# ---------------------------------------------------------------------------------------------
# Prompt and parser
# ---------------------------------------------------------------------------------------------


def prompt_sha256(template: str) -> str:
    """SHA-256 (hex) of the prompt template's UTF-8 text; stored with every verdict."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


DEFAULT_PROMPT_SHA256 = prompt_sha256(DEFAULT_PROMPT_TEMPLATE)


def render_prompt(template: str, row: Mapping[str, Any]) -> str:
    """Fill the template's ``{question}``, ``{prediction}`` and ``{answer}`` from a row.

    Other row fields are available by name too (``{dataset}``, ``{answer_type}``, ...).

    Args:
        template: a ``str.format`` template.
        row: a predictions row.

    Returns:
        The judge prompt (one user turn).

    Raises:
        KeyError: the template names a field the row lacks.
    """
    fields = {k: ("" if v is None else v) for k, v in row.items()}
    for key in ("question", "prediction", "answer"):
        fields[key] = str(fields.get(key, ""))
    return template.format_map(fields)


_EDGE_NON_ALNUM = re.compile(r"^[\W_]+|[\W_]+$")


def parse_verdict(text: str | None) -> str:
    """Strict verdict parser: the first word, case-insensitive, punctuation stripped.

    ``"Right."`` -> RIGHT; ``"WRONG - the right answer is X"`` -> WRONG; ``"RIGHT\\nWRONG"`` ->
    RIGHT; ``"not right"``, ``""``, ``"RIGHT/WRONG"`` -> UNPARSED. Anything else is UNPARSED,
    never RIGHT.

    Args:
        text: the judge's raw reply.

    Returns:
        ``"RIGHT"``, ``"WRONG"`` or ``"UNPARSED"``.
    """
    if not text:
        return UNPARSED
    words = text.split()
    if not words:
        return UNPARSED
    word = _EDGE_NON_ALNUM.sub("", words[0]).upper()
    return word if word in (RIGHT, WRONG) else UNPARSED


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


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
    a :class:`ShardedGenerate` (under torchrun), rank 0 calls :meth:`judge` and the other ranks
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


def _instantiate(node: Any) -> Any:
    """``torchtune.config.instantiate`` for a config node that may arrive as a plain dict."""
    from omegaconf import DictConfig, OmegaConf
    from torchtune import config as tt_config

    return tt_config.instantiate(node if isinstance(node, DictConfig) else OmegaConf.create(node))


def _load_decoder(
    model_cfg: Any, state: dict[str, Any], device: Any, dtype: Any, quantize: str | None
) -> Any:
    """Build the judge model on the meta device and fill it from ``state`` on ``device``.

    Nothing full-size is ever allocated twice: parameters are assigned from the checkpoint
    tensors (cast to ``dtype``). With ``quantize="nf4"`` every ``nn.Linear`` inside the decoder's
    layers becomes torchtune's FrozenNF4Linear holding the checkpoint weight in NF4 (torchao),
    one linear at a time, as QLoRA holds a base model; embeddings, norms and the output projection
    stay in ``dtype``. NF4 needs weight dims that are multiples of 256.
    """
    import torch
    from torchtune import training

    with training.set_default_dtype(dtype), torch.device("meta"):
        model = _instantiate(model_cfg)
    state = dict(state)
    if quantize == "nf4":
        from torchtune.modules.low_precision import FrozenNF4Linear

        decoder = getattr(model, "decoder", model)
        prefix = "decoder." if decoder is not model else ""
        for layer_idx, layer in enumerate(decoder.layers):
            for parent_name, parent in list(layer.named_modules()):
                for child_name, child in list(parent.named_children()):
                    if type(child) is not torch.nn.Linear:
                        continue
                    path = ".".join(
                        p for p in (f"{prefix}layers.{layer_idx}", parent_name, child_name) if p
                    )
                    nf4 = FrozenNF4Linear(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        device=device,
                        dtype=dtype,
                    )
                    weights = {"weight": state.pop(f"{path}.weight").to(device=device, dtype=dtype)}
                    if child.bias is not None:
                        weights["bias"] = state.pop(f"{path}.bias").to(device=device, dtype=dtype)
                    nf4.load_state_dict(weights)  # NF4 copy_ quantizes the weight
                    setattr(parent, child_name, nf4)
    state = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in state.items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"judge checkpoint has keys the model lacks: {unexpected[:5]}")
    # Buffers that are not in checkpoints (RoPE caches) are rebuilt on the device.
    with device:
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
    still_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"judge checkpoint lacks weights for: {still_meta[:5]} ({missing[:5]})")
    return model


def _generate_texts_fn(
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    max_new_tokens: int,
    sync_next: Callable[[Any], Any] | None = None,
) -> Callable[[list[str]], list[str]]:
    """``generate_texts(prompts) -> texts``: chat-format ids, greedy batched generation, decode."""
    from medtune.generation import generate
    from medtune.models.llama3 import encode_messages

    pad_id = int(getattr(tokenizer, "pad_id", 0))
    stop_tokens = list(tokenizer.stop_tokens)

    def generate_texts(prompts: list[str]) -> list[str]:
        ids = [
            encode_messages(tokenizer, [("user", [p])], add_generation_prompt=True)[0]
            for p in prompts
        ]
        texts: list[str] = []
        for start in range(0, len(ids), batch_size):
            out = generate(
                model,
                ids[start : start + batch_size],
                pad_id=pad_id,
                stop_tokens=stop_tokens,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                sync_next=sync_next,
            )
            texts += [tokenizer.decode(t, skip_special_tokens=True) for t in out]
        return texts

    return generate_texts


def _judge_settings(cfg: Mapping[str, Any], device: Any) -> tuple[Any, str | None, int, int]:
    """(dtype, quantize, max_new_tokens, batch_size) from the ``judge`` config section."""
    from medtune.models.llama3 import decoder_dtype

    dtype = decoder_dtype(cfg.get("dtype") or ("bf16" if device.type == "cuda" else "fp32"))
    quantize = cfg.get("quantize")
    if quantize not in (None, "nf4"):
        raise ValueError(f"judge.quantize must be null or nf4, got {quantize!r}")
    return dtype, quantize, int(cfg.get("max_new_tokens", 8)), max(1, int(cfg.get("batch_size", 8)))


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

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return build_sharded_generate_fn(cfg)
    device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype, quantize, max_new_tokens, batch_size = _judge_settings(cfg, device)

    tokenizer = _instantiate(cfg["tokenizer"])
    checkpointer = _instantiate(cfg["checkpointer"])
    state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    model = _load_decoder(cfg["model"], state, device, dtype, quantize)
    del state
    model.eval()
    model.requires_grad_(False)
    return _generate_texts_fn(
        model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens
    )


# ---------------------------------------------------------------------------------------------
# Sharded local judge (torchrun, FSDP2)
# ---------------------------------------------------------------------------------------------


def _broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled; for small control messages)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _load_full_state_sharded(
    model: Any, state: dict[str, Any] | None, device: Any, rank: int
) -> None:
    """Fill an FSDP2-sharded model that sits on the meta device from rank 0's full state dict.

    Only rank 0 holds the checkpoint (``state``; None on the other ranks). The keys are checked
    on rank 0 (strict: none missing, none unexpected) and the outcome is broadcast, so every rank
    raises together. Then, one tensor at a time in the model's own key order (the same on every
    rank), rank 0 moves the full tensor to ``device`` in the parameter's dtype and
    ``distribute_tensor`` scatters its shards (its default ``src_data_rank=0``: the other ranks
    pass an uninitialised buffer of the same shape, whose data is never read); a parameter that
    is not sharded is broadcast whole. Parameters are then assigned, as torchtune's
    ``load_from_full_model_state_dict`` does.

    Memory: rank 0 holds the checkpoint in host memory (about 140 GB for 70B in bf16) and every
    rank holds at most one full tensor on ``device`` at a time (for 70B the 2.1 GB embedding)
    besides its shards. torchtune's ``load_from_full_model_state_dict`` on this stack (torch 2.14
    with torchtune 0.6.1 takes its fallback path) would need the full checkpoint in host memory
    on every rank (8 x 140 GB for 70B on one 8-GPU node) and read it N times, although
    ``distribute_tensor`` only uses rank 0's copy.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    sharded = model.state_dict()  # meta (D)Tensors, global shapes
    error = None
    if rank == 0:
        assert state is not None
        missing = [k for k in sharded if k not in state]
        unexpected = [k for k in state if k not in sharded]
        if missing or unexpected:
            error = (
                f"judge checkpoint does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    error = _broadcast_object(error)
    if error:
        raise ValueError(error)
    loaded: dict[str, Any] = {}
    for name, meta in sharded.items():
        if rank == 0:
            full = state.pop(name).to(device=device, dtype=meta.dtype)  # type: ignore[union-attr]
        else:
            full = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        if hasattr(meta, "device_mesh"):
            value = distribute_tensor(full, meta.device_mesh, meta.placements)
        else:
            dist.broadcast(full, src=0)
            value = full
        loaded[name] = value  # assign=True wraps parameters in nn.Parameter again
        del full
    model.load_state_dict(loaded, strict=True, assign=True)


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
        from medtune.training.distributed import barrier, destroy

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
    (:func:`medtune.training.distributed.shard_decoder`) on a 1-D mesh of all ranks, and gets its
    shards from the checkpoint read on rank 0 only (:func:`_load_full_state_sharded`). Greedy
    decoding; see :class:`ShardedGenerate` for the lock-step rules.

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

    from medtune.training.distributed import (
        destroy,
        init_distributed,
        resolve_device,
        shard_decoder,
    )

    device = resolve_device(cfg.get("device") or "auto")
    dtype, quantize, max_new_tokens, batch_size = _judge_settings(cfg, device)
    if quantize is not None:
        raise ValueError(
            "judge.quantize=nf4 runs in one process (70B in NF4 fits one 80 GB GPU); with "
            "--nproc_per_node the judge is sharded in judge.dtype: set judge.quantize=null"
        )
    rank, world_size = init_distributed(device)
    try:
        tokenizer = _instantiate(cfg["tokenizer"])
        with training.set_default_dtype(dtype), torch.device("meta"):
            model = _instantiate(cfg["model"])
        decoder = getattr(model, "decoder", model)
        mesh = init_device_mesh(device.type, (world_size,))
        shard_decoder(decoder, mesh)
        if decoder is not model:
            from medtune.training.distributed import shard_module

            shard_module(model, mesh)
        state, error = None, None
        if rank == 0:  # only rank 0 reads the checkpoint (see _load_full_state_sharded)
            try:
                state = _instantiate(cfg["checkpointer"]).load_checkpoint()[training.MODEL_KEY]
            except Exception as e:  # report on every rank, not only here
                error = f"judge checkpoint could not be loaded on rank 0: {type(e).__name__}: {e}"
        error = _broadcast_object(error)
        if error:
            raise ValueError(error)
        _load_full_state_sharded(model, state, device, rank)
        del state
        with device:  # RoPE caches are buffers outside the checkpoint: rebuild them off meta
            for module in model.modules():
                if hasattr(module, "rope_init"):
                    module.rope_init()
        training.validate_no_params_on_meta_device(model)
        still_meta = [n for n, b in model.named_buffers() if b.is_meta]
        if still_meta:
            raise ValueError(f"judge model buffers left on the meta device: {still_meta[:5]}")
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

    fn = _generate_texts_fn(
        model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, sync_next=sync_next
    )
    return ShardedGenerate(fn, rank, world_size, numel)


def build_local_judge(name: str = "local", **cfg: Any) -> LocalJudge:
    """Config entry point of the local backend: :func:`build_local_generate_fn` in a LocalJudge.

    Args:
        name: the judge's name in the verdict cache.
        **cfg: the rest of the ``judge`` config section, passed to :func:`build_local_generate_fn`.
    """
    return LocalJudge(build_local_generate_fn(cfg), name=name)


# ---------------------------------------------------------------------------------------------
# Verdict cache
# ---------------------------------------------------------------------------------------------


def row_key(row: Mapping[str, Any]) -> str:
    """The cache key of a predictions row: ``checkpoint|dataset|split|id``.

    The id alone is only unique within a dataset, and the same question appears once per
    checkpoint when several predictions files are judged together.
    """
    return "|".join(str(row.get(k, "")) for k in ("checkpoint", "dataset", "split", "id"))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class VerdictsFileError(ValueError):
    """``verdicts.jsonl`` holds a line that is not a verdict row (names file and line)."""


class VerdictStore:
    """Append-only ``verdicts.jsonl``, keyed by (judge, prompt_sha256, key); last row wins.

    Every :meth:`append` writes one JSON line and flushes it, so a killed run loses at most the
    verdict being written. On open, a torn last line (no newline) is cut off. :meth:`compact`
    rewrites the file with exactly one row per cache key (atomically, via a temporary file).

    Args:
        path: the JSONL file (created with its folder if missing).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.n_lines = 0
        self._load()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    @staticmethod
    def cache_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
        """(judge, prompt_sha256, key) of a verdict row."""
        return (str(row["judge"]), str(row["prompt_sha256"]), str(row["key"]))

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A killed writer left a torn line: drop it (its verdict will be judged again).
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
            data = data[:cut]
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = self.cache_key(row)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise VerdictsFileError(
                    f"{self.path}:{lineno}: not a verdict row ({e}); move the file away to start over"
                ) from e
            self._rows[key] = row
            self.n_lines += 1

    def get(self, judge: str, prompt_hash: str, key: str) -> dict[str, Any] | None:
        """The cached verdict row, or None."""
        return self._rows.get((judge, prompt_hash, key))

    def append(self, row: Mapping[str, Any]) -> None:
        """Write one verdict row and flush it."""
        row = dict(row)
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        self._rows[self.cache_key(row)] = row
        self.n_lines += 1

    def compact(self) -> None:
        """Rewrite the file with one row per cache key, if it holds superseded rows."""
        if self.n_lines == len(self._rows):
            return
        self._fh.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in self._rows.values():
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self.n_lines = len(self._rows)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        """Flush to disk and close the file."""
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> VerdictStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The judge loop
# ---------------------------------------------------------------------------------------------


def _verdict_row(
    row: Mapping[str, Any],
    key: str,
    judge_name: str,
    prompt_hash: str,
    prompt: str,
    raw: str,
    verdict: str,
    attempts: int,
) -> dict[str, Any]:
    return {
        "id": row.get("id"),
        "dataset": row.get("dataset"),
        "split": row.get("split"),
        "checkpoint": row.get("checkpoint"),
        "answer_type": answer_type_of(row),
        "verdict": verdict,
        "raw": raw,
        "judge": judge_name,
        "prompt_sha256": prompt_hash,
        "prompt_version": PROMPT_VERSION if prompt_hash == DEFAULT_PROMPT_SHA256 else None,
        "key": key,
        "input_sha256": _sha256(prompt),
        "attempts": attempts,
    }


def run_judge(
    rows: Sequence[Mapping[str, Any]],
    backend: JudgeBackend,
    store: VerdictStore,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    batch_size: int = 32,
    retry_unparsed: int = 1,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Judge every row, reusing cached verdicts; return one verdict row per input row.

    A cached verdict is reused when its (judge, prompt hash, row key) matches and the rendered
    prompt is unchanged (``input_sha256``: the prediction or answer did not change). UNPARSED
    replies are sent again ``retry_unparsed`` times, then counted as UNPARSED.

    Args:
        rows: predictions rows (DESIGN §3 schema).
        backend: the judge.
        store: the verdict cache (verdicts are appended and flushed one by one).
        template: the prompt template.
        batch_size: prompts per ``backend.judge`` call.
        retry_unparsed: how many times an UNPARSED reply is retried.
        log: progress messages (e.g. ``print``); None for silence.

    Returns:
        The verdict rows, in the order of ``rows``.

    Raises:
        PredictionsError: two rows share a row key (see :func:`row_key`).
    """
    prompt_hash = prompt_sha256(template)
    name = backend.name
    keys = [row_key(r) for r in rows]
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise PredictionsError(f"duplicate predictions row (checkpoint|dataset|split|id): {k}")
        seen.add(k)
    prompts = [render_prompt(template, r) for r in rows]
    pending = []
    for i, (k, p) in enumerate(zip(keys, prompts)):
        cached = store.get(name, prompt_hash, k)
        if cached is None or cached.get("input_sha256") != _sha256(p):
            pending.append(i)
    if log:
        log(
            f"judge {name}: {len(rows)} rows, {len(rows) - len(pending)} cached, "
            f"{len(pending)} to judge"
        )
    done = 0
    for start in range(0, len(pending), max(1, batch_size)):
        batch = pending[start : start + max(1, batch_size)]
        raws = list(backend.judge([prompts[i] for i in batch]))
        if len(raws) != len(batch):
            raise RuntimeError(f"judge {name} returned {len(raws)} replies for {len(batch)}")
        verdicts = [parse_verdict(r) for r in raws]
        attempts = [1] * len(batch)
        for _ in range(retry_unparsed):
            again = [j for j, v in enumerate(verdicts) if v == UNPARSED]
            if not again:
                break
            raws2 = backend.judge([prompts[batch[j]] for j in again])
            for j, raw in zip(again, raws2):
                raws[j], verdicts[j] = raw, parse_verdict(raw)
                attempts[j] += 1
        for j, i in enumerate(batch):
            store.append(
                _verdict_row(
                    rows[i],
                    keys[i],
                    name,
                    prompt_hash,
                    prompts[i],
                    raws[j],
                    verdicts[j],
                    attempts[j],
                )
            )
        done += len(batch)
        if log:
            log(f"judge {name}: {done}/{len(pending)} judged")
    store.compact()
    return [store.get(name, prompt_hash, k) for k in keys]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def cohen_kappa(pairs: Iterable[tuple[bool, bool]]) -> dict[str, Any]:
    """Agreement of two binary raters.

    Args:
        pairs: (rater A says right, rater B says right) per item.

    Returns:
        ``n``, ``agreement_percent`` (100 * observed agreement), ``cohen_kappa`` ((po - pe) /
        (1 - pe); None when pe == 1, i.e. both raters constant and equal, or n == 0) and the four
        cell counts ``both_right``, ``both_wrong``, ``a_right_b_wrong``, ``a_wrong_b_right``.
    """
    cells = {"both_right": 0, "both_wrong": 0, "a_right_b_wrong": 0, "a_wrong_b_right": 0}
    for a, b in pairs:
        if a and b:
            cells["both_right"] += 1
        elif not a and not b:
            cells["both_wrong"] += 1
        elif a:
            cells["a_right_b_wrong"] += 1
        else:
            cells["a_wrong_b_right"] += 1
    n = sum(cells.values())
    out: dict[str, Any] = {"n": n, "agreement_percent": None, "cohen_kappa": None}
    if n:
        po = (cells["both_right"] + cells["both_wrong"]) / n
        pa = (cells["both_right"] + cells["a_right_b_wrong"]) / n
        pb = (cells["both_right"] + cells["a_wrong_b_right"]) / n
        pe = pa * pb + (1 - pa) * (1 - pb)
        out["agreement_percent"] = 100.0 * po
        out["cohen_kappa"] = None if pe >= 1.0 else (po - pe) / (1 - pe)
    out.update(cells)
    return out


def _block(pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> dict[str, Any]:
    counts = dict.fromkeys(VERDICTS, 0)
    agree = []
    for row, verdict in pairs:
        v = verdict["verdict"]
        counts[v] += 1
        if v != UNPARSED and answer_type_of(row) == "CLOSED" and normalize(row.get("answer")):
            agree.append((v == RIGHT, closed_strict(row.get("prediction"), row.get("answer"))))
    judged = counts[RIGHT] + counts[WRONG]
    kappa = cohen_kappa(agree)
    return {
        "n": len(pairs),
        "judged_accuracy": counts[RIGHT] / judged if judged else None,
        "n_right": counts[RIGHT],
        "n_wrong": counts[WRONG],
        "n_unparsed": counts[UNPARSED],
        "agreement_with_closed_accuracy_strict": {
            "n": kappa["n"],
            "agreement_percent": kappa["agreement_percent"],
            "cohen_kappa": kappa["cohen_kappa"],
            "both_right": kappa["both_right"],
            "both_wrong": kappa["both_wrong"],
            "judge_right_strict_wrong": kappa["a_right_b_wrong"],
            "judge_wrong_strict_right": kappa["a_wrong_b_right"],
        },
    }


SUMMARY_RULES = {
    "judged_accuracy": "n_right / (n_right + n_wrong); UNPARSED verdicts are excluded from the "
    "denominator and never counted as right",
    "verdict": "first word of the judge's reply, case-insensitive, punctuation stripped: RIGHT or "
    "WRONG; anything else UNPARSED (retried once)",
    "agreement_with_closed_accuracy_strict": "CLOSED rows with a non-empty answer and a RIGHT/WRONG "
    "verdict: percent agreement and Cohen's kappa between the judge and closed_accuracy_strict",
}


def summarize(
    rows: Sequence[Mapping[str, Any]],
    verdicts: Sequence[Mapping[str, Any]],
    judge_name: str,
    template: str = DEFAULT_PROMPT_TEMPLATE,
    predictions_files: Sequence[str] = (),
) -> dict[str, Any]:
    """``summary.json`` content: overall, per dataset, per answer type and per checkpoint.

    Args:
        rows: predictions rows.
        verdicts: their verdict rows (same order), from :func:`run_judge`.
        judge_name: the backend's name.
        template: the prompt template used.
        predictions_files: input files, recorded for provenance.

    Returns:
        A JSON-able dict (see :data:`SUMMARY_RULES`).
    """
    pairs = list(zip(rows, verdicts))
    out: dict[str, Any] = {
        "judge": judge_name,
        "prompt_sha256": prompt_sha256(template),
        "prompt_version": PROMPT_VERSION if template == DEFAULT_PROMPT_TEMPLATE else None,
        "predictions": list(predictions_files),
    }
    out.update(_block(pairs))
    for key, get in (
        ("by_dataset", lambda r: str(r.get("dataset"))),
        ("by_answer_type", lambda r: answer_type_of(r) or "UNKNOWN"),
        ("by_checkpoint", lambda r: str(r.get("checkpoint"))),
    ):
        groups: dict[str, list] = {}
        for row, v in pairs:
            groups.setdefault(get(row), []).append((row, v))
        out[key] = {g: _block(groups[g]) for g in sorted(groups)}
    out["rules"] = dict(SUMMARY_RULES)
    return out


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{100 * x:.1f}" if pct else f"{x:.3f}"
    return str(x)


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """A markdown rendering of :func:`summarize`'s output (one table, all groups)."""
    lines = [
        "# VQA judge summary",
        "",
        f"- judge: `{summary['judge']}`",
        f"- prompt sha256: `{summary['prompt_sha256']}`"
        + (f" ({summary['prompt_version']})" if summary.get("prompt_version") else ""),
        f"- predictions: {', '.join(f'`{p}`' for p in summary.get('predictions', [])) or '-'}",
        "",
        "judged accuracy = RIGHT / (RIGHT + WRONG), in percent; agreement and Cohen's kappa are "
        "with `closed_accuracy_strict` on CLOSED rows.",
        "",
        "| group | n | right | wrong | unparsed | judged accuracy (%) | agreement (%) | kappa |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def line(label: str, b: Mapping[str, Any]) -> str:
        agr = b["agreement_with_closed_accuracy_strict"]
        pct = agr["agreement_percent"]
        return (
            f"| {label} | {b['n']} | {b['n_right']} | {b['n_wrong']} | {b['n_unparsed']} | "
            f"{_fmt(b['judged_accuracy'], pct=True)} | {'-' if pct is None else f'{pct:.1f}'} | "
            f"{_fmt(agr['cohen_kappa'])} |"
        )

    lines.append(line("all", summary))
    for key, label in (
        ("by_dataset", "dataset"),
        ("by_answer_type", "answer type"),
        ("by_checkpoint", "checkpoint"),
    ):
        for group, block in summary.get(key, {}).items():
            lines.append(line(f"{label}: {group}", block))
    return "\n".join(lines) + "\n"
