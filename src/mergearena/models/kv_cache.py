"""The KV cache's name across transformers releases: ``cache`` from 5.24 on (which warns on every
call given ``past_key_values``), ``past_key_values`` before, both as ``forward``'s keyword and as
the attribute of its output. Everything that calls a model's forward asks here."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@functools.cache
def cache_keyword(model_class: type[torch.nn.Module]) -> str:
    """The name ``model_class.forward`` takes the KV cache by."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(out: object) -> object:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values  # type: ignore[attr-defined]
