"""BLIP-2's Q-Former in medtune (the one BERT-shaped Q-Former; LAVIS's ``Blip2Qformer``).

- :mod:`medtune.models.blip2.qformer`: the stage-1 model (``Blip2Qformer``, ITC / ITM / ITG
  losses, ``blip2_qformer`` builder, ``bert_tokenizer``); was ``medtune/models/qformer_blip2.py``.
- :mod:`medtune.models.blip2.bert_init`: a local HF BERT folder -> Q-Former initial weights
  (``load_bert_weights``, ``bert_sizes``); was ``medtune/models/qformer_bert.py``.
- :mod:`medtune.models.blip2.connector`: ``Blip2QFormerConnector``, the stage-1 query path + a
  linear map as a MedVLM connector (kind ``blip2_qformer``); was ``medtune/models/blip2_connector.py``.
- :mod:`medtune.models.blip2.builders`: named MedVLMs with that connector.

The small randomly initialised learned-query connector (formerly ``connectors.QFormer``) is
:class:`medtune.models.connectors.LearnedQueryConnector` (kind ``learned_queries``).
"""
