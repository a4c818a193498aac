"""Loading models: the one layer below everything that scores or trains.

``evaluation``, ``routed``, ``zoo``, ``search`` and the arena load through here, and this package
imports none of them (it reads formats from ``checkpoints``)::

    from mergearena.models import LanguageModel
    lm = LanguageModel.load("zoo:smollm2-135m", adapter="zoo:sentiment-lora", dtype="float32")

- ``language_model.py``: ``LanguageModel``, a model and its tokenizer in eval mode on one device,
  loaded from a checkpoint, a base + adapter, a routed model's directory, or a state dict;
- ``loading.py``: the pieces (``load_model``, ``load_tokenizer``, ``apply_adapter``,
  ``model_from_config``), ``parse_device`` / ``parse_dtype``, ``quiet_transformers``;
- ``routed.py``: a routed model at inference (``RoutedModel``); it imports transformers, so it is
  imported from its module, on the first routed model loaded;
- ``kv_cache.py``: the KV cache's name in ``forward`` across transformers releases.
"""

from mergearena.models.kv_cache import cache_keyword, returned_cache
from mergearena.models.language_model import LanguageModel
from mergearena.models.loading import (
    apply_adapter,
    load_model,
    load_tokenizer,
    model_from_config,
    parse_device,
    parse_dtype,
    quiet_transformers,
)

__all__ = [
    "LanguageModel",
    "apply_adapter",
    "cache_keyword",
    "load_model",
    "load_tokenizer",
    "model_from_config",
    "parse_device",
    "parse_dtype",
    "quiet_transformers",
    "returned_cache",
]
