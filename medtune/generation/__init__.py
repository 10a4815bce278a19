"""Batched, KV-cached generation: greedy, sampling and beam search, images at prefill only.

The package's public names (import them from here):

- :class:`GenerationConfig` (:mod:`.config`): the settings of a config's ``generation`` block,
  built with ``GenerationConfig.from_config(block)``;
- :func:`generate`, :func:`sample_next` (:mod:`.sampling`): greedy / temperature / top-k / top-p
  decoding of a left-padded batch; ``num_beams > 1`` runs :func:`beam_search`;
- :func:`beam_search` (:mod:`.beam_search`): HF's beam-search rules, batched and KV-cached;
- :mod:`.common`: the helpers both decoders share (padding, repetition penalty, stop-token
  blocking, one forward, cache teardown).

Was ``medtune/generation.py`` and ``medtune/beam_search.py`` (they imported each other).
"""

from medtune.generation.beam_search import beam_search
from medtune.generation.config import GenerationConfig
from medtune.generation.sampling import generate, sample_next

__all__ = ["GenerationConfig", "beam_search", "generate", "sample_next"]
