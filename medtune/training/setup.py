"""Model set-up for the training recipes: build -> (shard) -> load one full state dict -> check.

The recipes call these in order, as torchtune's ``full_finetune_distributed._setup_model`` does::

    model = build_model(cfg.model, device=device, dtype=dtype, llm_on_meta=shard)
    decoder, prefix = decoder_of(model)
    full = read_llm_state(cfg.checkpointer, rank=rank, only_rank0=shard)   # None on ranks > 0
    if shard:
        shard_vlm(model, decoder)
        load_sharded(model, full, device)        # rank 0's tensors -> every rank's shards
    else:
        load_unsharded(model, full, device)
    check_on_device(model)

- The LLM decoder is built on ``meta`` when it will be sharded (:func:`medtune.models.llama3.
  build_decoders_on`; the builders honour it, nothing is patched), encoders and connectors on the
  device with the weights their builders load.
- ``full`` is one state dict in the model's own key names: the LLM weights (prefixed ``decoder.``
  in a MedVLM), plus whatever else the recipe adds (LoRA initial adapters, the trained parts of a
  resumed checkpoint or of ``init_from``).
- Sharded: only rank 0 reads the checkpoint files; the tensors go out one at a time, so host memory
  does not grow with the number of ranks. Key and shape checks run on rank 0 and their verdict is
  broadcast, so every rank stops together with the same message.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torchtune import config, training

from medtune.models.llama3 import build_decoders_on
from medtune.models.llm import image_token_id
from medtune.models.lora import adapters_to_fp32, clean_name, lora_modules
from medtune.utils.distributed import shard_module
from medtune.utils.errors import ConfigError, UserError


def build_model(
    model_cfg: DictConfig, *, device: torch.device, dtype: torch.dtype, llm_on_meta: bool
) -> nn.Module:
    """Instantiate ``model_cfg`` (a MedVLM or a bare Llama-3 decoder).

    Args:
        model_cfg: the ``model`` config (a builder ``_component_``).
        device: where encoders and connectors (and the LLM unless ``llm_on_meta``) are built.
        dtype: default dtype of the LLM's parameters (fp32 masters for a trained LLM; a frozen
            or LoRA base may be bf16).
        llm_on_meta: build the LLM decoder on ``meta`` (to be sharded and filled later).

    Returns:
        The model; encoders, connectors and LoRA adapters in fp32.
    """
    with (
        training.set_default_dtype(dtype),
        device,
        build_decoders_on("meta") if llm_on_meta else contextlib.nullcontext(),
    ):
        model = config.instantiate(model_cfg)
    if is_vlm(model):
        model.encoders.float()
        model.connectors.float()
    adapters_to_fp32(decoder_of(model)[0])
    return model


def is_vlm(model: nn.Module) -> bool:
    """A MedVLM (image encoders + connectors + decoder), not a bare Llama-3."""
    return hasattr(model, "encoders")


def decoder_of(model: nn.Module) -> tuple[nn.Module, str]:
    """``(decoder, prefix)``: the Llama-3 decoder and its key prefix in ``model.state_dict()``."""
    return (model.decoder, "decoder.") if is_vlm(model) else (model, "")


def check_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    """The tokenizer's image placeholder id must be the model's."""
    if not is_vlm(model):
        return
    tok_img = image_token_id(tokenizer)
    if tok_img != model.image_token_id:
        raise ConfigError(
            f"tokenizer: its image placeholder id is {tok_img} but the model's image_token_id is "
            f"{model.image_token_id} (tokenizer and model do not belong together)"
        )


def check_llm_mode(model: nn.Module, mode: str, recipe: str) -> None:
    """A LoRA recipe needs LoRA layers in the decoder; the others must not have any."""
    has_lora = bool(lora_modules(decoder_of(model)[0]))
    if mode == "lora" and not has_lora:
        raise ConfigError(
            "model: the LoRA recipes need a LoRA decoder (builders in medtune.models.lora)"
        )
    if mode != "lora" and has_lora:
        raise ConfigError(f"model: a LoRA model in {recipe}; use the lora_finetune recipes")


def read_llm_state(
    checkpointer_cfg: DictConfig, *, rank: int = 0, only_rank0: bool = False, prefix: str = ""
) -> dict[str, torch.Tensor] | None:
    """The LLM weights in torchtune names (plus ``prefix``) from torchtune's checkpointer.

    Args:
        checkpointer_cfg: the ``checkpointer`` config (HF or Meta layout).
        rank: this process's rank.
        only_rank0: ranks other than 0 read nothing and get None (sharded loading).
        prefix: prepended to every key (``"decoder."`` in a MedVLM).
    """
    if only_rank0 and rank != 0:
        return None
    checkpointer = config.instantiate(checkpointer_cfg)
    try:
        state = checkpointer.load_checkpoint()["model"]
    except ValueError as e:
        # torchtune's safe_torch_load wraps a truncated / foreign file's error in this ValueError
        if not str(e).startswith("Unable to load checkpoint from") or e.__cause__ is None:
            raise
        why = str(e.__cause__).strip().splitlines()[0] if str(e.__cause__).strip() else ""
        raise UserError(f"checkpointer: {str(e).strip().removesuffix('.')} ({why})") from None
    return {prefix + k: v for k, v in state.items()}


def llm_width_problem(model: nn.Module, full: dict[str, torch.Tensor], where: str) -> str | None:
    """The one line when the LLM weights ``full`` are of another width than the model's decoder.

    Every loader calls it before its key / shape checks (``_problems`` here; ``generate``, ``eval``
    and ``serve`` through :func:`medtune.training.loading.load_from_checkpoint`), so a checkpoint
    of another Llama-3 size is named in words, not by torch's size-mismatch list.

    Args:
        model: the model (MedVLM or bare decoder; meta, sharded or plain).
        full: the state dict to load, in the model's key names.
        where: the LLM checkpoint folder as the user gave it.

    Returns:
        ``"LLM checkpoint <where> has width 256, the model expects 128"``, or None.
    """
    got = [tuple(v.shape) for k, v in full.items() if k.endswith("tok_embeddings.weight")]
    own = [v for k, v in state_shapes(model).items() if k.endswith("tok_embeddings.weight")]
    if len(got) == 1 and len(own) == 1 and len(got[0]) == 2 and got[0][1] != own[0][1]:
        return f"LLM checkpoint {where} has width {got[0][1]}, the model expects {own[0][1]}"
    return None


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes by state-dict name (parameters and persistent buffers; global for meta / DTensor),
    without ``state_dict()``: torchtune's QLoRA state-dict hook dequantizes NF4 weights and copies
    them to CPU, which fails on a model built on ``meta`` (a QLoRA checkpoint being reloaded)."""
    out = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        pre = f"{mname}." if mname else ""
        for n, p in mod._parameters.items():
            if p is not None:
                out[clean_name(pre + n)] = tuple(p.shape)
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                out[clean_name(pre + n)] = tuple(b.shape)
    return out


def _problems(
    model: nn.Module, full: dict[str, torch.Tensor], source: str, prefix: str
) -> str | None:
    """Why ``full`` does not fit ``model`` (None when it does): width, unknown keys, shapes,
    missing LLM keys."""
    # callers name the source "checkpointer (<dir>)": the width line names the folder itself
    where = source.removeprefix("checkpointer (").removesuffix(")")
    if (width := llm_width_problem(model, full, where)) is not None:
        return width
    own = state_shapes(model)  # global shapes (meta/DTensor too)
    unknown = [k for k in full if k not in own]
    if unknown:
        return (
            f"{source}: {len(unknown)} tensor(s) the model does not have, e.g. {unknown[:3]} "
            "(a checkpoint of another model?)"
        )
    bad = [(k, tuple(v.shape), own[k]) for k, v in full.items() if own[k] != tuple(v.shape)]
    if bad:
        k, got, want = bad[0]
        return (
            f"{source}: LLM weights do not fit the model's decoder: {len(bad)} tensor(s) differ in "
            f"shape, e.g. '{k}' is {got} in {source} but {want} in the model (a checkpoint of "
            "another Llama-3 size or width?)"
        )
    adapters = {"lora_a", "lora_b", "magnitude"}
    missing = [
        k
        for k in own
        if k.startswith(prefix) and k not in full and not (set(k.split(".")) & adapters)
    ]
    if missing:
        return f"{source}: LLM weights missing for {len(missing)} tensor(s), e.g. {missing[:3]}"
    return None


def _agree(error: str | None) -> None:
    """Raise on every rank if rank 0 found a problem (so no rank waits for the others forever)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UserError(error)


def _rope_init(model: nn.Module, device: torch.device) -> None:
    with device:
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()


def load_unsharded(
    model: nn.Module, full: dict[str, torch.Tensor], device: torch.device, source: str
) -> None:
    """Fill a model that is not sharded from ``full`` (the model's key names).

    A decoder built on ``meta`` is first allocated on ``device`` (RoPE caches rebuilt).

    Raises:
        UserError: naming ``source`` when keys or shapes do not fit.
    """
    decoder, prefix = decoder_of(model)
    _agree(_problems(model, full, source, prefix))
    if any(p.is_meta for p in decoder.parameters()):  # only the decoder: encoders hold weights
        dtype = next(p for p in decoder.parameters() if p.is_meta).dtype
        materialize_meta(decoder, device)
        with training.set_default_dtype(dtype):
            _rope_init(decoder, device)
    own = _tensors(model)
    with torch.no_grad():
        for k, v in full.items():
            # in the parameter's dtype first (an NF4 weight quantizes from the dtype it reports),
            # as the sharded path and torchtune's loader do
            own[k].copy_(v.to(own[k].dtype))


def materialize_meta(module: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) every parameter and buffer of ``module`` still on ``meta``.

    Unlike ``module.to_empty`` it leaves tensors that already hold values alone (NF4 linears made
    on the device by :func:`medtune.training.loader.swap_nf4_linears`); a tensor shared by two
    modules stays shared.
    """
    done: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(m, kind)
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in done:
                    new = torch.empty_like(t, device=device)
                    if kind == "_parameters":
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    done[id(t)] = new
                table[name] = done[id(t)]


def shard_vlm(model: nn.Module, decoder: nn.Module) -> None:
    """FSDP2: one unit per transformer layer, per encoder and per connector, then the root.

    The root unit is the whole model (MedVLM, or the bare decoder): it holds ``tok_embeddings``,
    the final norm and ``output``, all-gathered when the model's forward starts. (Sharding the
    decoder as the root would leave ``tok_embeddings`` sharded when MedVLM embeds the prompt
    before calling ``decoder.forward``.) Only trainable parameters need a uniform dtype per unit,
    so a bf16 base with fp32 adapters shards as is.
    """
    for layer in decoder.layers:
        shard_module(layer)
    for part in (
        *getattr(model, "encoders", {}).values(),
        *getattr(model, "connectors", {}).values(),
    ):
        shard_module(part)
    shard_module(model)


def load_sharded(
    model: nn.Module, full: dict[str, torch.Tensor] | None, device: torch.device, source: str
) -> None:
    """Fill an FSDP2-sharded model from rank 0's full state dict (None on the other ranks).

    Rank 0 checks the keys and shapes (verdict broadcast), then sends one tensor at a time in the
    model's key order; each rank keeps its shard (``distribute_tensor`` with ``src_data_rank=0``:
    the other ranks' buffers are only received into). A parameter that is not sharded is
    broadcast whole; an NF4 (QLoRA) weight, which :func:`~medtune.utils.distributed.
    shard_module` leaves whole on every rank, is then quantized in place.
    Parameters not in ``full`` keep their values (encoder weights loaded by their builder).
    """
    from torch.distributed.tensor import distribute_tensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    _, prefix = decoder_of(model)
    error = _problems(model, full, source, prefix) if rank == 0 else None
    _agree(error)
    sharded = model.state_dict()  # (meta) DTensors with global shapes, the same order on every rank
    box = [sorted(full) if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    names = set(box[0])
    with training.set_default_dtype(torch.float32):
        _rope_init(model, device)
    loaded: dict[str, Any] = {}
    own = _tensors(model)
    for name, ref in sharded.items():
        if name not in names:
            continue
        param = own[name]  # (``ref`` is a dequantized copy for an NF4 weight)
        nf4 = _is_nf4(param)  # QLoRA base: kept whole on every rank (shard_module ignores NF4)
        dtype = param.dtype if nf4 else ref.dtype  # NF4 reports the dtype it was quantized from
        if rank == 0:
            value = full.pop(name).to(device=device, dtype=dtype)  # type: ignore[union-attr]
        else:
            value = torch.empty(ref.shape, dtype=dtype, device=device)
        if hasattr(ref, "device_mesh"):  # sharded: scatter from rank 0
            loaded[name] = nn.Parameter(
                distribute_tensor(value, ref.device_mesh, ref.placements),
                requires_grad=ref.requires_grad,
            )
            continue
        if dist.is_initialized():  # not sharded: every rank gets the whole tensor
            dist.broadcast(value, src=0)
        if nf4:
            with torch.no_grad():
                param.copy_(value)  # quantizes in place
        else:
            loaded[name] = value
        del value
    model.load_state_dict(loaded, strict=False, assign=True)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own parameters and buffers by state-dict name. (``state_dict()`` is not used:
    torchtune's QLoRA layers hand out dequantized copies of their NF4 weights there.)"""
    out = {clean_name(n): p for n, p in model.named_parameters()}
    out.update({clean_name(n): b for n, b in model.named_buffers()})
    return out


def _is_nf4(t: Any) -> bool:
    """A torchao NF4 tensor (QLoRA base weight)."""
    try:
        from torchao.dtypes.nf4tensor import NF4Tensor
    except ImportError:
        return False
    return isinstance(t, NF4Tensor)


def check_on_device(model: nn.Module) -> None:
    """Nothing may be left on ``meta`` after loading (a key the state dict did not cover)."""
    left = [n for n, p in model.named_parameters() if p.is_meta]
    left += [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise UserError(
            f"model: {len(left)} tensor(s) were never loaded (still on the meta device), "
            f"e.g. {left[:3]}"
        )
