"""The per-rank memory estimate (from shapes, dtypes and sharding) equals the storage actually
allocated for parameters, gradients (after a backward) and optimizer state (after a step): for a
plain fp32 model, a LoRA model over a bf16 base, a QLoRA (NF4) model at width 256, and 2 FSDP2
ranks on CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from medtune.training.memory import (
    allocated_bytes,
    estimate_memory,
    format_memory,
    nf4_bytes,
    total_bytes,
)

TINY = {
    "vocab_size": 512,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 256,
    "intermediate_size": 512,
    "max_position_embeddings": 64,
}


@pytest.fixture
def hf_config(tmp_path) -> Path:
    p = tmp_path / "config.json"
    p.write_text(json.dumps(TINY))
    return p


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, dtype=torch.float32) -> None:
    tokens = torch.randint(
        0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        model(tokens).float().sum().backward()
    opt.step()


def _assert_matches(model, opt) -> dict:
    est = estimate_memory(model, opt)
    _step(model, opt, next(model.parameters()).dtype)
    got = allocated_bytes(model, opt)
    assert {k: sum(v.values()) for k, v in est.items()} == got
    return est


def _lora(hf_config: Path, dtype: torch.dtype, modules: list[str], quantize_base: bool = False):
    """A LoRA decoder with its base in ``dtype`` (or NF4), fp32 adapters (the only trainable
    parameters), and AdamW over them."""
    from torchtune import training

    from medtune.models.lora import lora_llama3_from_hf_config, lora_modules

    with training.set_default_dtype(dtype):
        model = lora_llama3_from_hf_config(
            hf_config, modules, apply_lora_to_mlp=True, lora_rank=4, quantize_base=quantize_base
        )
    for m in lora_modules(model).values():
        m.lora_a.float()
        m.lora_b.float()
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("optim", ["adamw", "sgd_momentum"])
def test_full_fp32_model(hf_config, optim):
    from medtune.models.llama3 import llama3_from_hf_config

    model = llama3_from_hf_config(hf_config)
    params = list(model.parameters())
    opt = (
        torch.optim.AdamW(params)
        if optim == "adamw"
        else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    )
    est = _assert_matches(model, opt)
    n = sum(p.numel() for p in params)
    assert est["params"] == {"float32": 4 * n} and est["grads"] == {"float32": 4 * n}
    assert sum(est["optimizer"].values()) == (
        8 * n + 4 * len(params) if optim == "adamw" else 4 * n
    )


def test_lora_over_bf16_base(hf_config):
    model, opt = _lora(hf_config, torch.bfloat16, ["q_proj", "v_proj"])
    est = _assert_matches(model, opt)
    assert set(est["params"]) == {"bfloat16", "float32"} and set(est["grads"]) == {"float32"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qlora_nf4_width_256(hf_config, dtype):
    model, opt = _lora(
        hf_config, dtype, ["q_proj", "k_proj", "v_proj", "output_proj"], quantize_base=True
    )
    est = _assert_matches(model, opt)
    # 4 attention + 3 MLP weights of 1 layer in NF4: about half a byte per value
    n_q = 256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 512
    assert est["params"]["nf4"] == pytest.approx(n_q / 2, rel=0.1)
    assert nf4_bytes(256 * 256) < 256 * 256 * 2 / 3  # well under bf16's 2 bytes per value
    assert "nf4" in format_memory(est)


def _fsdp_rank(rank: int, port: int, hf_config: str, out: str) -> None:
    """One of 2 ranks, set up as torchrun's standalone launch sets up its workers."""
    import torch.distributed as dist

    from medtune.models.lora import lora_llama3_from_hf_config
    from medtune.utils.distributed import shard_module

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = lora_llama3_from_hf_config(
            hf_config, ["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4
        )
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n or n.startswith("norm"))
        for layer in model.layers:
            shard_module(layer)
        shard_module(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        est = estimate_memory(model, opt, world_size=2)
        model(torch.randint(0, 512, (2, 8))).sum().backward()
        opt.step()
        got = allocated_bytes(model, opt)
        want = {k: sum(v.values()) for k, v in est.items()}
        full = sum(p.numel() * 4 for p in model.parameters())
        assert want == got, (dist.get_rank(), want, got)
        assert got["params"] < 0.6 * full, (got, full)  # sharded: about half per rank
        Path(f"{out}.{dist.get_rank()}").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def test_two_fsdp2_ranks_on_cpu(tmp_path, hf_config):
    """Each rank's estimate of its FSDP2 shards equals its allocation (2 ranks, gloo).

    The ranks are forked from this process (a torchrun launch would start 2 interpreters that
    import torch and medtune for seconds of CPU each): what is tested is the estimate."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "got"
    mp.start_processes(
        _fsdp_rank, args=(port, str(hf_config), str(out)), nprocs=2, start_method="fork"
    )  # a rank's failed assertion is raised here with its traceback
    got = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert all(g["params"] > 0 for g in got), got  # both ranks ran to the end


def test_total_and_format():
    est = {"params": {"float32": 2**30}, "grads": {"float32": 2**20}, "optimizer": {}}
    assert total_bytes(est) == 2**30 + 2**20
    text = format_memory(est, 4)
    assert "4 rank(s)" in text and "1.00 GiB" in text and "1.00 MiB" in text
