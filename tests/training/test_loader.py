"""medtune.training.loader.load_model: build on meta -> load one full state dict -> check."""

from __future__ import annotations

import pytest
import torch

from medtune.models.llama3 import llama3_tiny
from medtune.training.loader import load_model
from medtune.utils.errors import ConfigError, UserError

# NF4 needs weight dims that are multiples of 256
SHAPE = dict(vocab_size=256, embed_dim=256, num_layers=1, num_heads=2, num_kv_heads=1,
             intermediate_dim=256, max_seq_len=16)  # fmt: skip
CFG = {"_component_": "medtune.models.llama3.llama3_tiny", **SHAPE}


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    return llama3_tiny(**SHAPE)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bare_llm_loads_exactly_and_nothing_is_left_on_meta(ref):
    model = load_model(
        CFG, _state(ref), device=torch.device("cpu"), dtype=torch.float32, source="x",
        everything_on_meta=True,
    )  # fmt: skip
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    tokens = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens), rtol=0, atol=0)


def test_missing_and_foreign_keys_are_named(ref):
    state = _state(ref)
    del state["layers.0.attn.q_proj.weight"]
    with pytest.raises(UserError, match=r"^src: LLM weights missing for 1 tensor\(s\)"):
        load_model(CFG, state, device=torch.device("cpu"), dtype=torch.float32, source="src",
                   everything_on_meta=True)  # fmt: skip
    state = {**_state(ref), "vision.proj.weight": torch.zeros(2)}
    with pytest.raises(UserError, match=r"^src: 1 tensor\(s\) the model does not have"):
        load_model(CFG, state, device=torch.device("cpu"), dtype=torch.float32, source="src",
                   everything_on_meta=True)  # fmt: skip
    with pytest.raises(ConfigError, match="quantize: expected null or nf4, got 'int8'"):
        load_model(CFG, _state(ref), device=torch.device("cpu"), dtype=torch.float32,
                   source="src", quantize="int8")  # fmt: skip


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torchtune RMSNorm
def test_nf4_loading_matches_bf16(ref):
    """quantize=nf4: decoder linears become FrozenNF4Linear; outputs stay close to bf16."""
    from torchtune.modules.low_precision import FrozenNF4Linear

    model = load_model(
        CFG, _state(ref), device=torch.device("cpu"), dtype=torch.bfloat16, source="judge",
        everything_on_meta=True, quantize="nf4",
    )  # fmt: skip
    assert isinstance(model.layers[0].attn.q_proj, FrozenNF4Linear)
    assert isinstance(model.layers[0].mlp.w2, FrozenNF4Linear)
    assert not isinstance(model.output, FrozenNF4Linear)
    tokens = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        got = model(tokens).float()
        want = llama3_tiny(**SHAPE).to(torch.bfloat16)
        want.load_state_dict(_state(ref))
        want = want(tokens).float()
    assert ((got - want).norm() / want.norm()).item() < 0.15
