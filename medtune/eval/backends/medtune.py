"""``model: medtune``: a medtune checkpoint folder answered through :func:`medtune.inference.answer`."""

from __future__ import annotations

from typing import Any

__all__ = ["MedtuneBackend"]


class MedtuneBackend:
    """A checkpoint rebuilt with :func:`medtune.training.loading.load_from_checkpoint`.

    Args:
        spec: ``{"model": "medtune", "path": ...}``.
        device: the torch device.
        batch_size: samples per generate call (per rank).
        system_prompt, window, blank_images: the model transform's options.
        llm_dtype: ``fp32 | bf16`` for the LLM (default: the run's).
        checkpoint_overrides: dotted-key patches of the saved config.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        device,
        batch_size: int = 8,
        system_prompt: str | None = None,
        window: Any = None,
        blank_images: bool = False,
        llm_dtype: str | None = None,
        checkpoint_overrides: dict | None = None,
        **_: Any,
    ) -> None:
        from medtune.data.model_transform import medvlm_transform
        from medtune.training.loading import load_from_checkpoint

        self.identity = spec["identity"]
        self.device = device
        self.batch_size = batch_size
        self.model, self.tokenizer, _cfg = load_from_checkpoint(
            spec["path"], device, llm_dtype, dict(checkpoint_overrides or {})
        )
        self.transform = medvlm_transform(
            self.model,
            self.tokenizer,
            system_prompt=system_prompt,
            window=window,
            blank_images=blank_images,
        )

    def answer(self, samples: list, settings) -> list[str]:
        """Answer texts, data-parallel over the ranks of a process group (every rank returns all)."""
        from medtune.inference import answer

        out = answer(
            self.model,
            self.transform,
            samples,
            settings,
            tokenizer=self.tokenizer,
            batch_size=self.batch_size,
            device=self.device,
        )
        return [a.text for a in out]

    def close(self) -> None:
        self.model = None
