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
    """``generate_texts(prompts) -> texts``: each prompt one user turn through the model transform,
    greedy and batched by :func:`medtune.inference.answer` (every rank runs every batch: a sharded
    model needs all ranks in each forward, so the prompts are not split across ranks)."""
    from medtune.data.model_transform import medvlm_transform
    from medtune.data.sample import Message, Sample
    from medtune.generation import GenerationConfig
    from medtune.inference import answer

    transform = medvlm_transform(model, tokenizer)
    settings = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)

    def generate_texts(prompts: list[str]) -> list[str]:
        samples = [Sample(str(i), [], [Message("user", p)], {}) for i, p in enumerate(prompts)]
        out = answer(
            model,
            transform,
            samples,
            settings,
            tokenizer=tokenizer,
            batch_size=batch_size,
            data_parallel=False,
            sync_next=sync_next,
        )
        return [a.text for a in out]

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
        from medtune.eval.judge.sharded import build_sharded_generate_fn

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


def build_local_judge(name: str = "local", **cfg: Any) -> LocalJudge:
    """Config entry point of the local backend: :func:`build_local_generate_fn` in a LocalJudge.

    Args:
        name: the judge's name in the verdict cache.
        **cfg: the rest of the ``judge`` config section, passed to :func:`build_local_generate_fn`.
    """
    return LocalJudge(build_local_generate_fn(cfg), name=name)
