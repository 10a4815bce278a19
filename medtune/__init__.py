"""medtune: fine-tuning and evaluation recipes for medical vision-language models.

Importing ``medtune`` is cheap (no torch import); import submodules for the real work.
"""

__version__ = "0.1.0"
