"""``model: hf``: any transformers image-text-to-text model folder (LLaVA, Qwen2-VL, ...).

``AutoProcessor`` + ``AutoModelForImageTextToText`` from a local folder (nothing is downloaded:
``local_files_only``), the processor's own chat template (one user turn: the sample's images,
then the text; a ``system_prompt`` turn before it when set), left padding, batched ``generate``;
bf16 on CUDA (``dtype`` overrides), fp32 on CPU. Under torchrun batch ``k`` runs on rank
``k % world_size`` and the texts are gathered, so every rank returns the same list, equal to a
one-process run's (greedy decoding).
"""

from __future__ import annotations

from typing import Any

__all__ = ["HFBackend", "hf_generate_kwargs"]


def hf_generate_kwargs(settings) -> dict[str, Any]:
    """medtune's :class:`~medtune.generation.GenerationConfig` as ``generate`` keyword arguments."""
    kw: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens,
        "num_beams": settings.num_beams,
        "repetition_penalty": settings.repetition_penalty,
        "do_sample": settings.temperature > 0,
    }
    if settings.num_beams > 1:
        kw["length_penalty"] = settings.length_penalty
    if settings.temperature > 0:
        kw.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    return kw


class HFBackend:
    """A transformers model folder answering through its processor's chat template.

    Args:
        spec: ``{"model": "hf", "path": DIR, "dtype": null|fp32|bf16, "batch_size": null}``.
        device: the torch device.
        batch_size: samples per ``generate`` call (``spec.batch_size`` wins).
        system_prompt: an optional system turn.
        window: DICOM window for :func:`medtune.data.load_image`.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        device,
        batch_size: int = 8,
        system_prompt: str | None = None,
        window: Any = None,
        **_: Any,
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from medtune.eval.backends.errors import BackendConfigError

        self.identity = spec["identity"]
        self.device = torch.device(device)
        self.batch_size = int(spec.get("batch_size") or batch_size)
        self.system_prompt = system_prompt
        self.window = window
        dtype = spec.get("dtype") or ("bf16" if self.device.type == "cuda" else "fp32")
        if dtype not in ("fp32", "bf16"):
            raise BackendConfigError(f"dtype: {dtype!r} (expected fp32 or bf16)")
        trust = bool(spec.get("trust_remote_code", False))
        try:
            self.processor = AutoProcessor.from_pretrained(
                spec["path"], local_files_only=True, trust_remote_code=trust
            )
            self.model = AutoModelForImageTextToText.from_pretrained(
                spec["path"],
                dtype=torch.bfloat16 if dtype == "bf16" else torch.float32,
                local_files_only=True,
                trust_remote_code=trust,
            )
        except (OSError, ValueError) as e:
            raise BackendConfigError(
                f"model: hf, path {spec['path']}: not a transformers image-text-to-text folder "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
        self.model.to(self.device).eval()
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # decoder-only batches generate from the right edge
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token

    def _prompt(self, sample) -> tuple[str, list]:
        from medtune.data.images import load_image

        images = [load_image(i, window=self.window) for i in sample.images]
        user = [m.content for m in sample.messages if m.role == "user"][-1]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": user}]
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(
                0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}
            )
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return text, images

    def _batch(self, samples: list, settings, seed: int) -> list[str]:
        import torch

        texts, images = [], []
        for s in samples:
            t, ims = self._prompt(s)
            texts.append(t)
            images.extend(ims)
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs and self.model.dtype != torch.float32:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        if settings.temperature > 0:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **hf_generate_kwargs(settings))
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def answer(self, samples: list, settings) -> list[str]:
        """Answer texts in order; batches split over the ranks and gathered (every rank gets all)."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        starts = list(range(0, len(samples), self.batch_size))
        local: dict[int, list[str]] = {}
        for k in range(rank, len(starts), world):
            chunk = samples[starts[k] : starts[k] + self.batch_size]
            local[k] = self._batch(chunk, settings, seed=hash((settings.seed, k)) & 0x7FFFFFFF)
        if world > 1:
            parts: list[Any] = [None] * world
            dist.all_gather_object(parts, local)
            for part in parts:
                local.update(part or {})
        return [t for k in range(len(starts)) for t in local[k]]

    def close(self) -> None:
        self.model = None
