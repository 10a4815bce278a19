"""``GenerationConfig``: the generation settings of a config's ``generation`` block.

Built one way everywhere (eval, generate, the serve batcher, the local judge):
:meth:`GenerationConfig.from_config`. Moved here from ``medtune/generation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from medtune.utils.errors import ConfigError


@dataclass
class GenerationConfig:
    """Settings recorded with every prediction (the ``generation`` field of every predictions row, :mod:`medtune.eval.predictions`).

    ``num_beams`` 1 is greedy/sampling; above 1, beam search with ``length_penalty`` (finished
    hypotheses score ``sum logprob / n_tokens ** length_penalty``, HF/LAVIS). ``repetition_penalty``
    1.0 is off; ``min_new_tokens`` blocks the stop tokens until that many are generated.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    use_cache: bool = True
    num_beams: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        # one clear line naming the key: these come from a config's ``generation`` block
        def bad(key: str, want: str) -> ConfigError:
            return ConfigError(f"generation.{key}: expected {want}, got {getattr(self, key)!r}")

        for key in ("max_new_tokens", "num_beams", "min_new_tokens", "seed"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(key, "an integer")
        for key in ("temperature", "length_penalty", "repetition_penalty"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(key, "a number")
        if self.max_new_tokens < 0:
            raise bad("max_new_tokens", "an integer >= 0")
        if self.num_beams < 1:
            raise bad("num_beams", "an integer >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", f"an integer in 0..max_new_tokens ({self.max_new_tokens})")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0 (1.0: no penalty)")
        if self.num_beams > 1 and self.temperature > 0:
            raise bad(
                "num_beams", "1 when sampling (temperature > 0): beam search is deterministic"
            )

    @classmethod
    def from_config(cls, block) -> GenerationConfig:
        """Build from a config's ``generation`` mapping, naming an unknown key."""
        block = dict(block or {})
        unknown = sorted(set(block) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"generation.{unknown[0]}: unknown key; expected one of "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        return cls(**block)

    def to_dict(self) -> dict:
        return dict(self.__dict__)
