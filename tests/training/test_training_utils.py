"""medtune.training: trainable-part spec and table, trained-parts checkpoints, device/process set-up."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from medtune.models.builders import tiny_medvlm
from medtune.training import checkpointing as ckpt
from medtune.training.params import model_parts, parameter_table, set_trainable
from medtune.utils.distributed import init_process_group, is_distributed_env, resolve_device
from medtune.utils.errors import UserError


@pytest.fixture(scope="module")
def model(tiny_assets):
    torch.manual_seed(0)
    return tiny_medvlm(str(tiny_assets))


def _count(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(
        p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable
    )


def test_set_trainable_per_part_and_table(model):
    set_trainable(model, {"encoder": "frozen", "connector": "full", "llm": "frozen"})
    parts = model_parts(model)
    assert _count(parts["encoder"], True) == 0 and _count(parts["llm"], True) == 0
    assert _count(parts["connector"], True) == _count(parts["connector"]) > 0
    table = parameter_table(model, {"encoder": "frozen", "connector": "full", "llm": "frozen"})
    lines = {
        line.split()[0]: line.split()
        for line in table.splitlines()[2:]
        if line.strip() and not line.startswith("-")
    }
    assert (
        lines["connector"][1] == "full"
        and lines["connector"][4] == f"{_count(parts['connector']):,}"
    )
    assert lines["encoder"][1] == "frozen" and lines["encoder"][4] == "0"
    total = sum(_count(m) for m in parts.values())
    assert (
        lines["total"][1] == f"{total:,}" and lines["total"][3] == f"{_count(parts['connector']):,}"
    )
    # a part left out of the spec is frozen
    set_trainable(model, {"encoder": "full"})
    unused = model.encoders[
        "image"
    ].tower.proj.numel()  # patch tokens: the pooled head stays frozen
    assert _count(parts["connector"], True) == 0
    assert _count(parts["encoder"], True) == _count(parts["encoder"]) - unused


def test_set_trainable_rejects_bad_specs(model):
    with pytest.raises(UserError, match="trainable.vision: unknown part"):
        set_trainable(model, {"vision": "full"})
    with pytest.raises(UserError, match="trainable.encoder: 'half' is not one of"):
        set_trainable(model, {"encoder": "half"})
    with pytest.raises(UserError, match="trainable.llm=full is not supported by this recipe"):
        set_trainable(model, {"llm": "full"}, allowed={"llm": ("frozen",)})


def test_lora_state_trains_only_adapters():
    from torchtune.models.llama3 import lora_llama3

    dec = lora_llama3(
        lora_attn_modules=["q_proj", "v_proj"],
        vocab_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        embed_dim=16,
        max_seq_len=32,
        intermediate_dim=32,
        lora_rank=2,
        lora_alpha=4,
    )
    set_trainable(dec, {"llm": "lora"})
    names = [n for n, p in dec.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


def test_trained_checkpoint_round_trip_and_errors(model, tmp_path):
    set_trainable(model, {"encoder": "full", "connector": "full", "llm": "frozen"})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sd = ckpt.trained_state_dict(model)
    assert sorted(sd) == sorted(names) and not any(k.startswith("decoder.") for k in sd)
    ckpt.save_trained(sd, tmp_path / "epoch_0", config_yaml="a: 1\n")
    assert (tmp_path / "epoch_0" / "config.yaml").read_text() == "a: 1\n"
    assert not list((tmp_path / "epoch_0").glob("*.tmp"))

    fresh_model = _fresh_like(model)
    assert not torch.equal(
        fresh_model.connectors["image"].fc1.weight, model.connectors["image"].fc1.weight
    )
    loaded = ckpt.load_trained(fresh_model, tmp_path / "epoch_0")
    assert sorted(loaded) == sorted(names)
    for n, p in fresh_model.named_parameters():
        if n in sd:
            assert torch.equal(p, sd[n]), n

    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    save_file(
        {"connectors.image.fc1.weight": torch.zeros(3, 3)},
        str(tmp_path / "bad" / "model.safetensors"),
    )
    with pytest.raises(ValueError, match=r"'connectors.image.fc1.weight' has shape \(3, 3\)"):
        ckpt.load_trained(fresh_model, tmp_path / "bad")
    (tmp_path / "unknown").mkdir()
    save_file({"nope.weight": torch.zeros(1)}, str(tmp_path / "unknown" / "model.safetensors"))
    with pytest.raises(ValueError, match="key\\(s\\) not in the model, e.g. \\['nope.weight'\\]"):
        ckpt.load_trained(fresh_model, tmp_path / "unknown")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ckpt.load_trained(fresh_model, tmp_path / "missing")


def _fresh_like(model):
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.connectors.parameters():
            p.normal_()
    return m


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_recipe_state_is_weights_only(tmp_path):
    state = {
        "checkpoint": "step_2",
        "epoch": 0,
        "global_step": 2,
        "rng": ckpt.rng_state(),
        "optimizer": {"state": {"w": {"exp_avg": torch.ones(2)}}},
        "loss_history": [1.0, 0.5],
    }
    ckpt.save_recipe_state(tmp_path, state)
    back = ckpt.load_recipe_state(tmp_path)
    assert back["global_step"] == 2 and back["loss_history"] == [1.0, 0.5]
    assert torch.equal(back["optimizer"]["state"]["w"]["exp_avg"], torch.ones(2))
    assert not (tmp_path / (ckpt.RECIPE_STATE + ".tmp")).exists()
    # an untrusted pickle is refused, not executed
    with open(tmp_path / ckpt.RECIPE_STATE, "wb") as f:
        pickle.dump({"x": _Evil()}, f, protocol=2)
    with pytest.raises(UserError, match="not a medtune recipe state"):
        ckpt.load_recipe_state(tmp_path)
    with pytest.raises(UserError, match="nothing to resume"):
        ckpt.load_recipe_state(tmp_path / "empty")


def test_single_process_setup(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not is_distributed_env()
    assert init_process_group(torch.device("cpu"), in_one_process=False) == (0, 1)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
