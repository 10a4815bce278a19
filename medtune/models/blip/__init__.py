"""BLIP (salesforce/BLIP): ViT + BERT with cross-attention for ITC / ITM, a decoder sharing all but
the self-attention for LM, momentum copies and queues. See :mod:`.model`, :mod:`.text`,
:mod:`.losses`, :mod:`.state`."""

from medtune.models.blip.model import Blip, blip_model, vit_trunk
from medtune.models.blip.text import blip_tokenizer, tie_encoder_decoder

__all__ = ["Blip", "blip_model", "blip_tokenizer", "tie_encoder_decoder", "vit_trunk"]
