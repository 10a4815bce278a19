"""medtune: fine-tuning and evaluation recipes for medical vision-language models.

Importing ``medtune`` is cheap (no torch import); import submodules for the real work.
"""

__version__ = "0.1.0"

# torchao's "Skipping import of cpp extensions" line opened every command: drop that one record
# (medtune.utils.quiet; logging only, no torch import)
from medtune.utils import quiet as _quiet  # noqa: E402

_quiet.install()
