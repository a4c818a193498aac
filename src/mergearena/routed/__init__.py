"""Routed LoRA experts: a base model with K low-rank experts kept beside it, chosen per input.

Rather than averaging experts into one set of weights, each input runs on the expert(s) a router
picks: per token with PEFT's Arrow (``router: arrow``), or per prompt by the nearest calibration
centroid (``router: prompt``). Build one with ``mergearena route`` or ``build_routed``; it loads
with ``LanguageModel.load(DIR)`` and is scored by ``mergearena eval`` like any model.

- ``build.py``: experts as adapters (full fine-tunes compressed by randomized SVD), calibration.

The directory's format (``routed.json``) and its parameter count live with the other checkpoint
formats, in ``mergearena.checkpoints.routed``; loading, and the forward/generate that route, live
below everything that scores, in ``mergearena.models.routed``.
"""
