"""Weighted averages of whole weights: ``linear`` (model soups) and ``passthrough``.

Also home of ``per_model``, the helper every family uses to read a per-model parameter that a
direct Python call may give as one number for all models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mergearena.methods.registry import merge_method


def per_model(value: float | Sequence[float], count: int, name: str) -> list[float]:
    """``value`` as one float per model: a scalar (a signature default) applies to every model."""
    if isinstance(value, int | float):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values but there are {count} models")
    return values


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ wᵢ tᵢ`` accumulated in float32 on the inputs' device (the inputs are not modified)."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for tensor, weight in zip(tensors, weights, strict=True):
        total.add_(tensor, alpha=weight)
    return total


def weighted_average(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ wᵢ tᵢ`` for weights summing to 1, as ``t₁ + Σᵢ₌₂ wᵢ (tᵢ − t₁)`` in float32.

    Equal to the weighted sum in exact arithmetic; in floating point, equal inputs (the tensors
    every fine-tune of one base shares, or that a LoRA expert leaves alone) give ``t₁`` exactly,
    where ``Σ wᵢ tᵢ`` with weights like 1/3 would round.
    """
    total = tensors[0].to(dtype=torch.float32, copy=True)
    flat_total, first = total.view(-1), tensors[0].reshape(-1)
    # The differences a block at a time: a whole-tensor buffer was another float32 copy of the
    # largest tensor (262 MB of an embedding) at the merge's peak. Element-wise, so the same bits.
    size = total.numel()
    difference = torch.empty(min(size, _BLOCK), dtype=torch.float32, device=total.device)
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        flat = tensor.reshape(-1)
        for start in range(0, size, _BLOCK):
            stop = min(start + _BLOCK, size)
            part = difference[: stop - start].copy_(flat[start:stop]).sub_(first[start:stop])
            flat_total[start:stop].add_(part, alpha=weight)
    return total


_BLOCK = 1 << 22  # entries: 16 MiB of float32


@merge_method("linear", reference="https://arxiv.org/abs/2203.05482")
def linear(tensors: list[Tensor], *, weight: list[float], normalize: bool = True) -> Tensor:
    """Weighted average of the models' weights (model soup).

    ``θ = Σ wᵢ θᵢ / Σ wᵢ`` with ``normalize`` (the default), else ``Σ wᵢ θᵢ``.
    Wortsman et al., "Model soups", ICML 2022 (arXiv:2203.05482).
    Same as mergekit's ``linear``, except that weights summing to zero with ``normalize`` are an
    error here rather than a tensor of inf/NaN.

    Degenerate cases: with ``normalize``, one model (any weight) and identical models give that
    model exactly (the average is taken as ``θ₁ + Σ wᵢ(θᵢ − θ₁)/Σw``, see ``weighted_average``);
    weights summing to zero are an error. Without ``normalize`` the result is the plain sum.
    """
    weights = per_model(weight, len(tensors), "weight")
    if not normalize:
        return weighted_sum(tensors, weights)
    weight_sum = sum(weights)
    if weight_sum == 0:
        raise ValueError("linear: the weights sum to zero; change them or set normalize: false")
    return weighted_average(tensors, [w / weight_sum for w in weights])


@merge_method(
    "passthrough", reference="https://github.com/arcee-ai/mergekit", min_models=1, max_models=1
)
def passthrough(tensors: list[Tensor], *, scale: list[float] | float = 1.0) -> Tensor:
    """Copy one model's tensor unchanged, optionally multiplied by a scale factor.

    ``θ = scale · θ₁``; used for layer stacking ("frankenmerges") and to copy tensors as they are.
    Same as mergekit's ``passthrough`` (whose ``scale`` defaults to none, i.e. 1).

    Degenerate cases: none; the tensor is copied (or scaled) as it is.
    """
    (factor,) = per_model(scale, 1, "scale")
    return tensors[0] if factor == 1 else tensors[0].float() * factor
