"""Merge methods: small pure functions over tensors, registered by ``@merge_method``.

``mergearena.methods.ties(tensors, base=..., weight=[...], density=[...])`` works on plain tensors;
``all_methods()`` lists every method with its parameters (what ``mergearena methods`` prints).
"""

from mergearena.methods.geometric_median import geometric_median  # noqa: E402

# Importing the families registers their methods.
from mergearena.methods.linear import linear, passthrough  # noqa: E402
from mergearena.methods.lora import lora_concat, lora_svd  # noqa: E402
from mergearena.methods.model_stock import model_stock  # noqa: E402
from mergearena.methods.registry import (
    LoraFactors,
    MethodSpec,
    Parameter,
    Range,
    all_methods,
    get_method,
    merge_method,
    method_names,
)
from mergearena.methods.spherical import karcher, multislerp, nearswap, slerp  # noqa: E402
from mergearena.methods.task_arithmetic import (  # noqa: E402
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    task_arithmetic,
    ties,
)

__all__ = [
    "LoraFactors",
    "MethodSpec",
    "Parameter",
    "Range",
    "all_methods",
    "get_method",
    "merge_method",
    "method_names",
    "linear",
    "passthrough",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "multislerp",
    "karcher",
    "nearswap",
    "model_stock",
    "geometric_median",
    "lora_concat",
    "lora_svd",
]
