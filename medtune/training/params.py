"""Which parts train and the start-up table of parameter counts."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from medtune.utils.errors import ConfigError

PART_STATES = ("frozen", "full", "lora", "projection")


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """MedVLM -> {"encoder", "connector", "llm"}; a bare decoder -> {"llm"}."""
    if hasattr(model, "encoders"):
        return {"encoder": model.encoders, "connector": model.connectors, "llm": model.decoder}
    return {"llm": model}


def set_trainable(
    model: nn.Module, spec: dict[str, str], allowed: dict[str, Iterable[str]] | None = None
) -> None:
    """Set ``requires_grad`` per part from ``spec`` (part -> ``frozen | full | lora``).

    ``lora`` marks only parameters named ``lora_*`` / ``magnitude`` (torchtune's LoRA/DoRA) as
    trainable; ``projection`` (connectors) only each connector's final ``proj.*`` (XrayGPT: a
    pretrained Q-Former kept frozen, its projection to the LLM trained).

    Raises:
        ConfigError: unknown part or state, or a state the recipe does not allow for that part.
    """
    parts = model_parts(model)
    for part, state in spec.items():
        if part not in parts:
            raise ConfigError(
                f"trainable.{part}: unknown part (expected one of {', '.join(parts)})"
            )
        if state not in PART_STATES:
            raise ConfigError(f"trainable.{part}: {state!r} is not one of {', '.join(PART_STATES)}")
        if allowed is not None and state not in allowed.get(part, PART_STATES):
            raise ConfigError(
                f"trainable.{part}={state} is not supported by this recipe "
                f"(allowed: {', '.join(allowed[part])})"
            )
        if state == "projection":
            lacking = [
                n for n, m in getattr(model, "connectors", {}).items() if not hasattr(m, "proj")
            ]
            if part != "connector" or lacking:
                raise ConfigError(
                    f"trainable.{part}=projection needs connectors with a final projection "
                    f"('proj'); {', '.join(lacking) or part} has none"
                )
    for part, module in parts.items():
        state = spec.get(part, "frozen")
        unused = set()
        for sub_name, sub in module.named_modules():
            if hasattr(sub, "unused_parameters"):  # e.g. an encoder's pooled head (patch output)
                prefix = f"{sub_name}." if sub_name else ""
                unused |= {prefix + n for n in sub.unused_parameters()}
        for name, p in module.named_parameters():
            if name in unused:
                p.requires_grad_(False)
            elif state == "full":
                p.requires_grad_(True)
            elif state == "projection":
                p.requires_grad_(name.split(".", 2)[1:2] == ["proj"])  # "<connector>.proj.*"
            elif state == "lora":
                p.requires_grad_("lora_" in name or name.endswith("magnitude"))
            else:
                p.requires_grad_(False)


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _dtype_name(p: torch.Tensor) -> str:
    """``nf4`` for torchao NF4 weights (also inside an FSDP2 DTensor), else the torch dtype."""
    local = getattr(p, "_local_tensor", p)
    if (
        type(local).__name__ == "NF4Tensor"
        or type(getattr(local, "data", None)).__name__ == "NF4Tensor"
    ):
        return "nf4"
    return str(p.dtype).removeprefix("torch.")


def parameter_table(model: nn.Module, spec: dict[str, str] | None = None) -> str:
    """A text table: part, state, parameters, trainable, dtype(s)."""
    rows = [("part", "state", "params", "trainable", "dtype")]
    tot, tot_tr = 0, 0
    for part, module in model_parts(model).items():
        ps = list(module.parameters())
        n = sum(p.numel() for p in ps)
        tr = sum(p.numel() for p in ps if p.requires_grad)
        dtypes = ",".join(sorted({_dtype_name(p) for p in ps})) or "-"
        state = (spec or {}).get(
            part, "full" if tr == n and n else ("frozen" if tr == 0 else "partial")
        )
        rows.append((part, state, f"{n:,} ({_fmt(n)})", f"{tr:,}", dtypes))
        tot += n
        tot_tr += tr
    rows.append(("total", "", f"{tot:,} ({_fmt(tot)})", f"{tot_tr:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([out[0], line, *out[1:-1], line, out[-1]])
