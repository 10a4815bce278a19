"""The training loop shared by vision_finetune and the full and LoRA fine-tuning recipes (single
device and FSDP2).

``recipes/vision_finetune.py`` and ``recipes/{full,lora}_finetune_{single_device,distributed}.py``
are thin: each sets the LLM mode (``frozen``, ``full`` or ``lora``) and whether it runs under FSDP2,
and documents its config. Everything else lives here so the five recipes cannot drift apart.

Model set-up:

- single device: the model is built on the device (LLM in fp32 for ``full``; in ``llm_dtype`` or
  NF4 for ``lora``) and the LLM weights are copied in with ``load_state_dict``.
- distributed: the LLM decoder is built on the ``meta`` device (:func:`decoders_on_meta`), encoders
  and connectors on the device; each transformer layer, then the decoder, is ``fully_shard``-ed
  (FSDP2), trainable encoders/connectors are sharded too, and one full state dict (LLM weights +
  LoRA init + resumed trained parts) is loaded shard by shard with torchtune's
  ``training.load_from_full_model_state_dict``. QLoRA decoders are built on the device instead:
  torchao's ``to_nf4`` cannot run on ``meta``.

LoRA adapters start from a seeded CPU generator (:func:`adapter_init_state`): ``lora_a`` Kaiming
uniform, ``lora_b`` zero, DoRA ``magnitude`` the row norms of the base weight. The same full
tensors are used on any number of ranks, so 1 and N processes start from the same model.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import config, training
from tqdm import tqdm

from medtune.data.chat import IGNORE_INDEX, VisionChatDataset
from medtune.data.collate import collate_vision_chat
from medtune.models.llama3 import IMAGE_TOKEN, decoder_dtype
from medtune.models.medvlm import output_at
from medtune.training import checkpointing as ckpt
from medtune.training import export
from medtune.training.distributed import (
    all_reduce_sum,
    barrier,
    init_process_group,
    resolve_device,
    shard_module,
)
from medtune.training.export import is_adapter_key
from medtune.training.memory import estimate_memory, format_memory
from medtune.training.params import model_parts, parameter_table, set_trainable

KNOWN_KEYS = {
    "output_dir",
    "assets_dir",
    "data_dir",
    "model_dir",
    "encoder_dir",
    "tokenizer",
    "model",
    "checkpointer",
    "trainable",
    "llm_dtype",
    "autocast",
    "device",
    "dataset",
    "val_dataset",
    "prompt_template",
    "system_prompt",
    "augment",
    "blank_images",
    "max_seq_len",
    "seed",
    "shuffle",
    "batch_size",
    "epochs",
    "max_steps_per_epoch",
    "gradient_accumulation_steps",
    "optimizer",
    "lr",
    "warmup_steps",
    "clip_grad_norm",
    "enable_activation_checkpointing",
    "metric_logger",
    "log_every_n_steps",
    "num_workers",
    "resume_from_checkpoint",
    "save_every_n_steps",
    "window",
    "save_merged",
}
"""Config keys every full/LoRA recipe understands."""

_LLAMA3_BUILDERS = (
    "llama3",
    "llama3_1",
    "llama3_8b",
    "llama3_70b",
    "llama3_1_8b",
    "llama3_1_70b",
    "llama3_tiny",
    "llama3_from_hf_config",
)


@contextlib.contextmanager
def decoders_on_meta() -> Iterator[None]:
    """Build every Llama-3 decoder on the ``meta`` device while inside; encoders and connectors are
    built where the caller's device context says.

    Covers :mod:`medtune.models.lora` (through its ``build_decoders_on``) and the decoder builders
    of :mod:`medtune.models.llama3` (named builders in :mod:`medtune.models.builders` call those
    through the module, so wrapping the module attributes reaches them).
    """
    import medtune.models.llama3 as l3
    from medtune.models.lora import build_decoders_on

    def on_meta(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with torch.device("meta"):
                return fn(*args, **kwargs)

        return wrapper

    saved = {name: getattr(l3, name) for name in _LLAMA3_BUILDERS}
    try:
        for name, fn in saved.items():
            setattr(l3, name, on_meta(fn))
        with build_decoders_on("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(l3, name, fn)


def answer_loss_sum(
    forward: Callable[[], torch.Tensor],
    decoder: nn.Module,
    labels: torch.Tensor,
    autocast: bool,
    select: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the answer tokens of a batch, and their count: the loss of every
    medtune training recipe (and of ``benchmarks/bench_vision_finetune.py``).

    Args:
        forward: runs the model on the batch and returns its logits.
        decoder: the Llama-3 decoder inside the model (its output layer is restricted to the
            answer positions with :func:`~medtune.models.medvlm.output_at`).
        labels: [b, s] token ids, ``IGNORE_INDEX`` where there is no loss; the target at position
            t is ``labels[:, t + 1]``.
        autocast: run ``forward`` under bf16 autocast on the labels' device.
        select: compute logits only at the answer positions (False: at every position).

    Returns:
        ``(loss_sum [], n_tokens [])``.
    """
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    keep = targets != IGNORE_INDEX  # [b, s]
    with (
        torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=autocast),
        output_at(decoder, keep) if select else contextlib.nullcontext(),
    ):
        logits = forward()
    if logits.dim() == 3:  # every position (no selection, or no output module): [b, s, vocab]
        logits = logits[keep]
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")  # logits [n_keep, vocab]
    return loss, keep.sum()


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> every torchtune ``LoRALinear`` / ``DoRALinear`` in ``model``."""
    from torchtune.modules.peft import DoRALinear, LoRALinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}


def adapter_init_state(
    model: nn.Module, base: dict[str, torch.Tensor], seed: int
) -> dict[str, torch.Tensor]:
    """Full (unsharded) initial adapter tensors for every LoRA layer of ``model``, from ``seed``.

    Args:
        model: holds the LoRA layers (their parameters may be on ``meta`` or sharded).
        base: the full base state dict (same key names as ``model``), for DoRA magnitudes.
        seed: seeds a CPU generator; layers are visited in ``named_modules`` order.

    Returns:
        ``{name.lora_a.weight: [r, in] Kaiming uniform, name.lora_b.weight: [out, r] zeros,
        name.magnitude: [out] (DoRA) ||W||_row}``, float32 on CPU.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in lora_modules(model).items():
        a = torch.empty(tuple(m.lora_a.weight.shape), dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        out[f"{name}.lora_a.weight"] = a
        out[f"{name}.lora_b.weight"] = torch.zeros(
            tuple(m.lora_b.weight.shape), dtype=torch.float32
        )
        if hasattr(m, "magnitude"):
            w = base[f"{name}.weight"].float()
            out[f"{name}.magnitude"] = torch.linalg.norm(
                w, dim=1
            )  # lora_b = 0: ||W + s*B@A|| = ||W||
    return out


def clean_name(name: str) -> str:
    """A parameter name without activation-checkpointing wrapper parts (as ``state_dict`` names it)."""
    return name.replace("._checkpoint_wrapped_module", "").replace(
        "_checkpoint_wrapped_module.", ""
    )


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def run(recipe_cls: type[FinetuneRecipe], cfg: DictConfig) -> None:
    """Set up, train and clean up a recipe; bad input (config, data, weights) is printed as one
    ``<recipe>: error: ...`` line and exit status 1 (``MEDTUNE_TRACEBACK=1`` shows the traceback)."""
    import sys

    try:
        recipe = recipe_cls(cfg)
        recipe.setup()
        recipe.train()
        recipe.cleanup()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("MEDTUNE_TRACEBACK"):
            raise
        print(
            f"{recipe_cls.name}: error: {e}\n(set MEDTUNE_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


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


def drop_images(source: list | dict) -> list:
    """Text-only copies of samples: no images, ``<image>`` markers removed (text-only SFT of the
    LLM on a VQA set, or a question-only baseline).

    Args:
        source: samples, or the config of any medtune reader (a nested ``_component_``).

    Returns:
        New :class:`~medtune.data.sample.Sample` objects with ``images=[]``.
    """
    import dataclasses

    from medtune.data.sample import IMAGE_MARKER

    if isinstance(source, dict):  # torchtune does not instantiate nested components
        source = config.instantiate(OmegaConf.create(source))
    out = []
    for s in source:
        msgs = [
            dataclasses.replace(m, content=m.content.replace(IMAGE_MARKER, "").strip())
            for m in s.messages
        ]
        out.append(dataclasses.replace(s, images=[], messages=msgs))
    return out


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch with ``seed`` (the same seed on every rank: identical init)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rope_init(decoder: nn.Module, device: torch.device) -> None:
    with device:
        for m in decoder.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()


class _SkipSampler(torch.utils.data.Sampler):
    """A distributed sampler's indices after skipping the first ``skip`` (resume mid-epoch)."""

    def __init__(self, base: DistributedSampler):
        self.base, self.skip = base, 0

    def __iter__(self):
        return iter(list(self.base)[self.skip :])

    def __len__(self) -> int:
        return len(self.base) - self.skip


class FinetuneRecipe:
    """Full, LoRA or frozen-LLM (vision-only) tuning of a MedVLM (or a bare Llama-3 for text-only SFT).

    Subclasses set :attr:`name`, :attr:`llm_mode` (``"full" | "lora" | "frozen"``) and :attr:`distributed`.
    See ``recipes/full_finetune_single_device.py`` for the user's manual.
    """

    name = "finetune"
    llm_mode = "full"
    distributed = False
    known_keys = KNOWN_KEYS
    vlm_only = False  # True: a bare Llama-3 (text-only SFT) is refused

    def __init__(self, cfg: DictConfig) -> None:
        unknown = sorted(set(cfg.keys()) - set(self.known_keys))
        if unknown:
            raise ValueError(
                f"config key(s) not known to {self.name}: {', '.join(unknown)} "
                f"(known: {', '.join(sorted(self.known_keys))})"
            )
        self.cfg = cfg
        self.device = resolve_device(cfg.get("device", "auto"))
        if self.distributed:
            self.rank, self.world_size = init_process_group(self.device)
        else:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError(
                    f"{self.name} runs on one device; use the _distributed recipe under torchrun"
                )
            self.rank, self.world_size = 0, 1
        self.is_rank_zero = self.rank == 0
        self.output_dir = Path(cfg.output_dir)
        llm_dtype = decoder_dtype(cfg.get("llm_dtype", "fp32"))
        # trained LLM weights are fp32 masters; a frozen LoRA base may sit in bf16
        self.base_dtype = torch.float32 if self.llm_mode == "full" else llm_dtype
        lora_mixed = self.llm_mode == "lora" and self.base_dtype != torch.float32
        self.autocast = (
            bool(cfg.get("autocast", False)) and self.device.type == "cuda"
        ) or lora_mixed
        self.seed = int(cfg.get("seed", 0))
        seed_everything(self.seed)  # the same on every rank (torchtune's set_seed adds the rank)
        self.batch_size = int(cfg.batch_size)
        self.epochs = int(cfg.epochs)
        self.accum = int(cfg.get("gradient_accumulation_steps", 1))
        self.max_steps_per_epoch = cfg.get("max_steps_per_epoch")
        self.log_every = int(cfg.get("log_every_n_steps", 1))
        self.save_every = cfg.get("save_every_n_steps")
        self.clip = cfg.get("clip_grad_norm")
        self.epoch, self.global_step, self.batches_done = 0, 0, 0
        self.loss_history: list[float] = []
        self._resume_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Tokenizer, model, data, optimizer, schedule; resume; print the tables and memory estimate."""
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.get("resume_from_checkpoint", False):
            self._resume_state = ckpt.load_recipe_state(self.output_dir)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.model = self._setup_model()
        self.metric_logger = (
            config.instantiate(cfg.metric_logger)
            if self.is_rank_zero and cfg.get("metric_logger")
            else None
        )
        self.train_ds, self.train_loader, self.sampler = self._setup_data(cfg.dataset, train=True)
        val = cfg.get(
            "val_dataset"
        )  # ``val_dataset=null`` on the command line leaves {_component_: None}
        self.val_loader = (
            self._setup_data(val, train=False)[1] if val and val.get("_component_") else None
        )
        n_batches = len(self.train_loader)
        if self.max_steps_per_epoch is not None:
            n_batches = min(n_batches, int(self.max_steps_per_epoch) * self.accum)
        self.steps_per_epoch = max(1, n_batches // self.accum)
        self.total_steps = self.steps_per_epoch * self.epochs
        self.optimizer = self._setup_optimizer()
        self.scheduler = training.lr_schedulers.get_cosine_schedule_with_warmup(
            self.optimizer,
            num_warmup_steps=int(cfg.get("warmup_steps", 0)),
            num_training_steps=self.total_steps,
        )
        if self._resume_state is not None:
            self._resume_recipe_state(self._resume_state)
        mem = estimate_memory(self.model, self.optimizer, world_size=self.world_size)
        if self.is_rank_zero:
            print(parameter_table(self.model, dict(cfg.trainable)), flush=True)
            print(format_memory(mem, self.world_size), flush=True)
            print(
                f"{self.name}: {len(self.train_ds)} training samples, {self.steps_per_epoch} steps/epoch x "
                f"{self.epochs} epochs, global batch {self.batch_size * self.world_size * self.accum} "
                f"({self.world_size} process(es), device {self.device})",
                flush=True,
            )

    def _allowed(self) -> dict[str, tuple[str, ...]]:
        return {
            "encoder": ("full", "frozen"),
            "connector": ("full", "frozen"),
            "llm": (self.llm_mode,),
        }

    def _llm_state(self) -> dict[str, torch.Tensor]:
        """The LLM's weights (torchtune names) from the checkpointer, or, when resuming a full run,
        from the checkpoint's ``llm/`` HF export."""
        cfg = self.cfg
        ck = cfg.checkpointer
        if self._resume_state is not None and self.llm_mode == "full":
            folder = self.output_dir / self._resume_state["checkpoint"] / export.LLM_DIR
            ck = OmegaConf.merge(
                ck, {"checkpoint_dir": str(folder), "checkpoint_files": [export.HF_MODEL_FILE]}
            )
        return config.instantiate(ck).load_checkpoint()["model"]

    def _resumed_trained(self) -> dict[str, torch.Tensor]:
        if self._resume_state is None:
            return {}
        from safetensors.torch import load_file

        return load_file(str(self.output_dir / self._resume_state["checkpoint"] / ckpt.MODEL_FILE))

    def _setup_model(self) -> nn.Module:
        cfg = self.cfg
        spec = dict(cfg.trainable)
        quantized = self.llm_mode == "lora" and bool(cfg.model.get("quantize_base", False))
        on_meta = (
            not quantized
        )  # torchao cannot quantize on meta: QLoRA decoders are built on the device
        with (
            training.set_default_dtype(self.base_dtype),
            self.device,
            decoders_on_meta() if on_meta else contextlib.nullcontext(),
        ):
            model = config.instantiate(cfg.model)
        self.is_vlm = hasattr(model, "encoders")
        if self.vlm_only and not self.is_vlm:
            raise ValueError(
                f"model: {self.name} needs a MedVLM (a builder from medtune.models.builders)"
            )
        decoder = model.decoder if self.is_vlm else model
        self.dec_prefix = "decoder." if self.is_vlm else ""
        if self.is_vlm:
            tok_img = self.tokenizer.special_tokens.get(IMAGE_TOKEN)
            if tok_img != model.image_token_id:
                raise ValueError(
                    f"tokenizer's {IMAGE_TOKEN} id is {tok_img} but the model's image_token_id is "
                    f"{model.image_token_id}: tokenizer and model do not belong together"
                )
            model.encoders.float()
            model.connectors.float()
        if self.llm_mode == "lora" and not lora_modules(decoder):
            raise ValueError(
                "model: the LoRA recipes need a LoRA decoder (builders in medtune.models.lora)"
            )
        if self.llm_mode != "lora" and lora_modules(decoder):
            raise ValueError(f"model: a LoRA model in {self.name}; use the lora_finetune recipes")
        for m in lora_modules(decoder).values():  # adapters: fp32 masters over a bf16 / NF4 base
            m.lora_a.float()
            m.lora_b.float()
            if hasattr(m, "magnitude"):
                m.magnitude.data = m.magnitude.data.float()
        set_trainable(model, spec, allowed=self._allowed())
        base = self._llm_state()
        start = dict(self._resumed_trained())
        if self.llm_mode == "lora" and not any(is_adapter_key(k) for k in start):
            start.update(_prefixed(adapter_init_state(decoder, base, self.seed), self.dec_prefix))
        if cfg.get("enable_activation_checkpointing", False):
            from torchtune.modules import TransformerSelfAttentionLayer

            training.set_activation_checkpointing(
                decoder, auto_wrap_policy={TransformerSelfAttentionLayer}
            )
            for enc in getattr(model, "encoders", {}).values():
                enc.set_grad_checkpointing(True)
        self._check_start(model, start)
        if self._shard_llm():
            self._shard_and_load(model, decoder, base, start)
        else:
            self._load_single(model, decoder, base, start)
            if self.distributed:
                self._wrap_unsharded(model)
        self.trained_names = [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]
        if not self.trained_names:
            raise ValueError("trainable: nothing to train")
        return model

    def _shard_llm(self) -> bool:
        """Whether the LLM is FSDP2-sharded: always under the distributed full/LoRA recipes."""
        return self.distributed

    def _wrap_unsharded(self, model: nn.Module) -> None:
        """FSDP2-wrap what must be wrapped when the LLM is not sharded (vision_finetune overrides)."""
        raise NotImplementedError

    def _check_start(self, model: nn.Module, start: dict[str, torch.Tensor]) -> None:
        """Trained parts loaded from a checkpoint must name parameters of this model, in its shapes."""
        own = {clean_name(n): tuple(p.shape) for n, p in model.named_parameters()}
        ckpt.check_trained(start, own, "checkpoint")

    def _check_llm_shapes(self, model: nn.Module, full: dict[str, torch.Tensor]) -> None:
        own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        bad = [
            (k, tuple(v.shape), own[k])
            for k, v in full.items()
            if k in own and own[k] != tuple(v.shape)
        ]
        if bad:
            k, got, want = bad[0]
            raise ValueError(
                f"checkpointer: LLM weights do not fit the model's decoder: {len(bad)} tensor(s) differ "
                f"in shape, e.g. '{k}' is {got} in {self.cfg.checkpointer.checkpoint_dir} but {want} in "
                "the model (a checkpoint of another Llama-3 size or width?)"
            )

    def _check_llm_keys(self, missing, unexpected) -> None:
        missing = [k for k in missing if not is_adapter_key(k)]
        if missing or unexpected:
            raise ValueError(
                f"checkpointer: LLM weights do not fit the model's decoder "
                f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
            )

    def _load_single(self, model, decoder, base, start) -> None:
        if any(p.is_meta for p in decoder.parameters()):
            decoder.to_empty(device=self.device)
            _rope_init(decoder, self.device)
        self._check_llm_shapes(decoder, base)
        missing, unexpected = decoder.load_state_dict(base, strict=False)
        self._check_llm_keys(missing, unexpected)
        del base
        with torch.no_grad():
            own = {clean_name(n): p for n, p in model.named_parameters()}
            for k, v in start.items():
                own[k].copy_(v)

    def _shard_and_load(self, model, decoder, base, start) -> None:
        shard_vlm(model, decoder)
        with training.set_default_dtype(self.base_dtype):
            _rope_init(decoder, self.device)
        full = _prefixed(base, self.dec_prefix)
        del base
        self._check_llm_shapes(model, full)
        full.update(start)
        own = {clean_name(n): p for n, p in model.named_parameters()}
        with torch.no_grad():  # parameters not sharded (frozen encoder/connector): plain copy
            for k in [k for k, p in own.items() if k in full and not hasattr(p, "device_mesh")]:
                if not own[k].is_meta:
                    own[k].copy_(full.pop(k))
        missing, unexpected = training.load_from_full_model_state_dict(
            model, full, self.device, strict=False
        )
        self._check_llm_keys([k for k in missing if k.startswith(self.dec_prefix)], unexpected)
        training.validate_no_params_on_meta_device(model)

    def _setup_data(self, ds_cfg: DictConfig, train: bool):
        cfg = self.cfg
        samples = config.instantiate(ds_cfg)
        if self.is_vlm:
            img_id, n_img, tfs = (
                self.model.image_token_id,
                self.model.tokens_per_image,
                self.model.image_transforms,
            )
        else:  # text-only SFT with a bare decoder: a sample with images is an error (see _loss_sum)
            img_id, n_img, tfs = self.tokenizer.special_tokens[IMAGE_TOKEN], 0, {}
        template = cfg.get("prompt_template")
        ds = VisionChatDataset(
            samples,
            self.tokenizer,
            image_token_id=img_id,
            tokens_per_image=n_img,
            transforms=tfs,
            train=train,
            augment=OmegaConf.to_container(cfg.augment) if train and cfg.get("augment") else None,
            prompt_template=OmegaConf.to_container(template)
            if OmegaConf.is_list(template)
            else template,
            system_prompt=cfg.get("system_prompt"),
            seed=self.seed,
            max_seq_len=cfg.get("max_seq_len"),
            blank_images=bool(cfg.get("blank_images", False)),
            window=cfg.get("window"),
        )
        base = DistributedSampler(
            ds,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=train and cfg.get("shuffle", True),
            seed=self.seed,
            drop_last=False,
        )
        sampler = _SkipSampler(base)
        loader = DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=int(cfg.get("num_workers", 0)),
            collate_fn=functools.partial(collate_vision_chat, pad_id=self.tokenizer.pad_id),
        )
        return ds, loader, sampler

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        lrs = cfg.get("lr", {})
        groups = []
        for part, module in model_parts(self.model).items():
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                if part not in lrs:
                    raise ValueError(
                        f"lr.{part}: missing learning rate for the trained part '{part}'"
                    )
                groups.append({"params": params, "lr": float(lrs[part]), "name": part})
        try:
            return config.instantiate(cfg.optimizer, groups)
        except (ImportError, ModuleNotFoundError) as e:
            opt_cfg = {
                k: v
                for k, v in cfg.optimizer.items()
                if k not in ("_component_", "optim_bits", "is_paged")
            }
            print(
                f"optimizer: {cfg.optimizer._component_} unavailable ({e}); falling back to torch.optim.AdamW",
                flush=True,
            )
            return torch.optim.AdamW(groups, **opt_cfg)

    # ------------------------------------------------------------------ checkpoints
    def _resume_recipe_state(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        # strict=False: trainable parameters that never get a gradient (e.g. the pooled head of an
        # encoder used for patch tokens) have no AdamW state, in the uninterrupted run either
        opts = StateDictOptions(full_state_dict=True, strict=False)
        if self.distributed:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the schedule's length comes from this run's config (a run may be resumed with more epochs)
        step = self.scheduler.last_epoch
        for group, fn, base in zip(
            self.optimizer.param_groups, self.scheduler.lr_lambdas, self.scheduler.base_lrs
        ):
            group["lr"] = base * fn(step)
        self.epoch, self.global_step, self.batches_done = (
            state["epoch"],
            state["global_step"],
            state["batches_done"],
        )
        self.loss_history = list(state.get("loss_history", []))
        torch.set_rng_state(state["rng"]["torch"])
        if self.is_rank_zero:
            print(
                f"resumed from {self.output_dir / state['checkpoint']} at epoch {self.epoch}, "
                f"step {self.global_step} ({self.batches_done} batches into the epoch)",
                flush=True,
            )

    def _gather_state(self) -> dict[str, torch.Tensor]:
        """Full CPU state dict of the model (collective under FSDP; NF4 dequantized)."""
        if self.distributed:
            return training.gather_cpu_state_dict(self.model, self.is_rank_zero, device=self.device)
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def _optimizer_state(self) -> dict[str, Any]:
        if not self.distributed:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            self.model,
            self.optimizer,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )

    def save_checkpoint(self, tag: str) -> None:
        """Write ``output_dir/<tag>/`` and ``output_dir/recipe_state.pt``.

        ``<tag>/model.safetensors`` holds the trained parts that are not the base LLM (encoder,
        connector; LoRA adapters), MedVLM key names. Full runs add ``llm/`` (HF layout); LoRA runs
        add ``adapter/`` (PEFT layout) and, with ``save_merged``, ``merged/`` (HF layout).
        """
        full = self._gather_state()
        optim = self._optimizer_state()
        if self.is_rank_zero:
            folder = self.output_dir / tag
            trained = set(self.trained_names)
            parts = {
                k: v.contiguous()
                for k, v in full.items()
                if k in trained and not (self.llm_mode == "full" and k.startswith(self.dec_prefix))
            }
            cfg_yaml = OmegaConf.to_yaml(self.cfg, resolve=True)
            hf_config = Path(self.cfg.checkpointer.checkpoint_dir) / "config.json"
            dec = {
                k[len(self.dec_prefix) :]: v
                for k, v in full.items()
                if k.startswith(self.dec_prefix)
            }
            if self.llm_mode == "full":
                export.save_hf(dec, folder / export.LLM_DIR, hf_config)
                out_cfg = OmegaConf.to_container(self.cfg, resolve=True)
                out_cfg["checkpointer"].update(
                    checkpoint_dir=str(folder / export.LLM_DIR),
                    checkpoint_files=[export.HF_MODEL_FILE],
                )
                cfg_yaml = OmegaConf.to_yaml(OmegaConf.create(out_cfg))
            elif self.llm_mode == "lora":
                from medtune.models.lora import lora_settings

                settings = lora_settings(self.model)
                export.save_peft_adapter(
                    dec,
                    settings,
                    folder / export.ADAPTER_DIR,
                    hf_config,
                    base_model=str(self.cfg.checkpointer.checkpoint_dir),
                )
                if self.cfg.get("save_merged", False):
                    export.save_hf(
                        export.merge_lora(dec, settings), folder / export.MERGED_DIR, hf_config
                    )
            ckpt.save_trained(parts, folder, cfg_yaml)
            ckpt.save_recipe_state(
                self.output_dir,
                {
                    "checkpoint": tag,
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                    "batches_done": self.batches_done,
                    "optimizer": optim,
                    "scheduler": self.scheduler.state_dict(),
                    "rng": {"torch": torch.get_rng_state()},
                    "seed": self.seed,
                    "loss_history": self.loss_history,
                },
            )
            print(f"saved {folder}", flush=True)
        barrier()

    # ------------------------------------------------------------------ train
    def _loss_sum(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the answer tokens of a batch, and their count.

        Returns:
            ``(loss_sum [], n_tokens [])``.
        """
        tokens = batch["tokens"].to(self.device)  # [b, s]
        labels = batch["labels"].to(self.device)  # [b, s]
        if self.is_vlm:

            def forward() -> torch.Tensor:
                images = self._batch_images(batch)
                return self.model(tokens, images=images, image_counts=batch["image_counts"])

            return answer_loss_sum(forward, self.model.decoder, labels, self.autocast)
        if int(batch["image_counts"].sum()):
            raise ValueError(f"samples {batch['ids']} hold images but the model is a text-only LLM")
        return answer_loss_sum(lambda: self.model(tokens), self.model, labels, self.autocast)

    def _batch_images(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The batch's images for MedVLM, or None for a batch without any (text-only samples).

        Under FSDP every rank must run the (sharded) encoders or none may: a batch without images is
        allowed when no rank's batch holds one.
        """
        n_img = int(batch["image_counts"].sum())
        if self.world_size > 1:
            ranks_with = int(all_reduce_sum(torch.tensor(int(n_img > 0), device=self.device)))
            if 0 < ranks_with < self.world_size and n_img == 0:
                raise ValueError(
                    f"rank {self.rank}: a batch without images while other ranks have images; "
                    "MedVLM cannot run its sharded encoders on no image (mix text-only and image "
                    "samples within each batch, or train text-only data with a bare Llama-3)"
                )
        if n_img == 0:
            return None
        return {k: v.to(self.device) for k, v in batch["images"].items()}

    def validate(self) -> float:
        """Mean validation loss over all answer tokens (all ranks)."""
        self.model.eval()
        tot, n = (
            torch.zeros((), device=self.device),
            torch.zeros((), device=self.device, dtype=torch.long),
        )
        with torch.no_grad():
            for batch in self.val_loader:
                loss, k = self._loss_sum(batch)
                tot += loss.detach()
                n += k
        self.model.train()
        tot, n = all_reduce_sum(tot), all_reduce_sum(n)
        return float(tot / n.clamp(min=1))

    def _optimizer_step(
        self, run_loss: torch.Tensor, run_tok: torch.Tensor, params
    ) -> tuple[float, Any]:
        # mean over the tokens of the global batch; FSDP already averages gradients over ranks
        glob_tok = all_reduce_sum(run_tok.clone())
        glob_loss = all_reduce_sum(run_loss.clone())
        training.scale_grads(self.model, self.world_size / glob_tok.clamp(min=1))
        grad_norm = None
        if self.clip is not None:
            grad_norm = ckpt.full_tensor(
                torch.nn.utils.clip_grad_norm_(params, max_norm=float(self.clip))
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        return float(glob_loss / glob_tok.clamp(min=1)), grad_norm

    def _log(self, step_loss: float, grad_norm, n_tok: float, dt: float, pbar) -> None:
        if self.global_step % self.log_every or not self.is_rank_zero:
            return
        metrics = {
            "loss": step_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens_per_second_per_gpu": n_tok / max(dt, 1e-9),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.metric_logger is not None:
            self.metric_logger.log_dict(metrics, step=self.global_step)
        pbar.set_postfix(loss=f"{step_loss:.4f}")
        tqdm.write(
            f"step {self.global_step} epoch {self.epoch} loss {step_loss:.4f} lr {metrics['lr']:.2e}"
        )

    def train(self) -> None:
        """Epochs of accumulated steps; validation and a checkpoint after each epoch."""
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        while self.epoch < self.epochs:
            self.sampler.base.set_epoch(self.epoch)
            self.train_ds.set_epoch(self.epoch)
            self.sampler.skip = self.batches_done * self.batch_size
            n_batches = self.steps_per_epoch * self.accum
            pbar = tqdm(
                total=self.steps_per_epoch,
                initial=self.batches_done // self.accum,
                disable=not self.is_rank_zero,
                desc=f"epoch {self.epoch}",
                leave=False,
            )
            run_loss = torch.zeros((), device=self.device)
            run_tok = torch.zeros((), device=self.device, dtype=torch.long)
            t0 = time.perf_counter()
            for batch in self.train_loader:
                if self.batches_done >= n_batches:
                    break
                loss, n_tok = self._loss_sum(batch)
                loss.backward()
                run_loss += loss.detach()
                run_tok += n_tok
                self.batches_done += 1
                if self.batches_done % self.accum:
                    continue
                step_loss, grad_norm = self._optimizer_step(run_loss, run_tok, params)
                self.loss_history.append(step_loss)
                self._log(step_loss, grad_norm, float(run_tok), time.perf_counter() - t0, pbar)
                pbar.update(1)
                run_loss.zero_()
                run_tok.zero_()
                t0 = time.perf_counter()
                if (
                    self.save_every
                    and self.global_step % int(self.save_every) == 0
                    and self.batches_done < n_batches
                ):
                    self.save_checkpoint(f"step_{self.global_step}")
            pbar.close()
            msg = f"epoch {self.epoch} done: train loss {self.loss_history[-1] if self.loss_history else math.nan:.4f}"
            if self.val_loader is not None:
                val = self.validate()
                msg += f", validation loss {val:.4f}"
                if self.metric_logger is not None:
                    self.metric_logger.log_dict({"val_loss": val}, step=self.global_step)
            if self.is_rank_zero:
                print(msg, flush=True)
            self.epoch += 1
            self.batches_done = 0
            self.save_checkpoint(f"epoch_{self.epoch - 1}")

    def cleanup(self) -> None:
        """Close the logger and the process group."""
        import torch.distributed as dist

        if self.metric_logger is not None:
            self.metric_logger.close()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
