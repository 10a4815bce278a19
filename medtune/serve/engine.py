"""The model behind the server: a MedVLM (or a bare Llama-3) with its tokenizer and transform.

Every answer goes through medtune's one inference path, :func:`medtune.inference.answer`, which
batches, left-pads and KV-caches (:mod:`medtune.generation`) and reports each decoding step's new
tokens through ``on_tokens`` (the server streams from it). The engine only adds what a server
needs around it: the prompt length before a request is queued (to refuse a prompt longer than the
context with HTTP 400) and decoding of ids to text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from medtune.data.model_transform import medvlm_transform
from medtune.data.sample import Sample
from medtune.generation import GenerationConfig


def context_length(model: nn.Module) -> int:
    """The decoder's ``max_seq_len`` (prompt + answer must fit in it: RoPE and the KV cache)."""
    decoder = getattr(model, "decoder", model)
    return int(decoder.max_seq_len)


class Engine:
    """A loaded model ready to answer samples.

    Args:
        model: a MedVLM or a torchtune ``TransformerDecoder`` (text only), in eval mode.
        tokenizer: its Llama-3 tokenizer.
        name: the model name in ``/v1/models`` and in every response.
        max_seq_len: context length; default the decoder's (a smaller value is allowed).
        system_prompt: a system turn prepended to every conversation (None: only the client's).
        device: where inputs go (default the model's device).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str = "medtune",
        max_seq_len: int | None = None,
        system_prompt: str | None = None,
        device: Any = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        limit = context_length(model)
        self.context_len = min(limit, int(max_seq_len)) if max_seq_len else limit
        self.transform = medvlm_transform(
            model, tokenizer, system_prompt=system_prompt, max_seq_len=self.context_len
        )
        self.takes_images = hasattr(model, "encoders")
        self.device = device

    def prompt_tokens(self, sample: Sample) -> int:
        """Length of the sample's prompt ids (image placeholders included), without loading images.

        Raises:
            DataError: the prompt does not fit ``max_seq_len`` or its images do not match.
        """
        prepared = self.transform.prepare(sample)
        ids, _ = self.transform.encode(prepared, inference=True)
        return len(ids)

    def answer(
        self,
        samples: Sequence[Sample],
        settings: GenerationConfig,
        on_tokens: Callable[[list[int], list[int]], None] | None = None,
    ) -> list[Any]:
        """Answer ``samples`` in one batch; see :func:`medtune.inference.answer`.

        Returns:
            One ``Answer`` (``token_ids``, ``prompt_tokens``, ``finish_reason``) per sample, in order.
        """
        from medtune.inference import answer

        return answer(
            self.model,
            self.transform,
            list(samples),
            settings,
            tokenizer=self.tokenizer,
            batch_size=max(1, len(samples)),
            device=self.device,
            on_tokens=on_tokens,
        )

    def decode(self, ids: list[int]) -> str:
        """Generated ids -> text (special tokens dropped)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
