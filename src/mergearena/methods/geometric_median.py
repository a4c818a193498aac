"""Geometric median of task vectors (Weiszfeld), the NeurIPS 2024 LLM Merging Competition winner."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from mergearena.methods.linear import per_model
from mergearena.methods.registry import Range, merge_method
from mergearena.methods.task_vectors import task_vector

_GRAM_CHUNK = 1 << 20  # entries per model per block when accumulating the Gram matrix


def gram_matrix(vectors: list[Tensor]) -> Tensor:
    """``G[i, j] = ⟨vᵢ, vⱼ⟩`` in float64, accumulated block by block to bound the scratch memory."""
    flats = [vector.reshape(-1) for vector in vectors]
    gram = torch.zeros(len(flats), len(flats), dtype=torch.float64, device=flats[0].device)
    for start in range(0, flats[0].numel(), _GRAM_CHUNK):
        block = torch.stack([flat[start : start + _GRAM_CHUNK] for flat in flats]).double()
        gram.addmm_(block, block.T)
    return gram


def weiszfeld_coefficients(
    gram: Tensor, weights: Tensor, max_iter: int = 100, tol: float = 1e-6, eps: float = 1e-8
) -> Tensor:
    """Weiszfeld's iteration for the weighted geometric median, in the span of the points.

    The median ``z = argmin Σ wᵢ‖δᵢ − z‖`` is approached by
    ``z ← Σ (wᵢ/‖δᵢ − z‖) δᵢ / Σ (wᵢ/‖δᵢ − z‖)`` from the weighted mean. Every iterate is a convex
    combination ``z = Σ βᵢδᵢ``, so the iteration runs on ``β`` with the Gram matrix ``G``:
    ``‖δᵢ − z‖² = Gᵢᵢ − 2(Gβ)ᵢ + βᵀGβ``. The Gram matrix is first divided by its largest
    diagonal entry (``β`` does not depend on the scale), so distances are relative to the longest
    ``δᵢ`` and floored at ``eps`` (a point on the median would otherwise divide by zero); it
    stops when the step ``‖Δz‖ ≤ tol·‖z‖``. When every ``δᵢ`` is zero, every ``β`` gives the same
    (zero) median and the weighted mean's ``β`` is returned. Weiszfeld, Tôhoku Math. J. 1937;
    Vardi & Zhang, PNAS 2000. Returns ``β``.
    """
    weights = weights.to(gram)
    coefficients = weights / weights.sum()
    scale = float(gram.diagonal().max())
    if not scale > 0:
        return coefficients
    gram = gram / scale
    diagonal = gram.diagonal()
    for _ in range(max_iter):
        projections = gram @ coefficients
        squared_norm = coefficients @ projections
        distances = (diagonal - 2 * projections + squared_norm).clamp(min=0).sqrt()
        inverse = weights / distances.clamp(min=eps)
        updated = inverse / inverse.sum()
        step = updated - coefficients
        coefficients = updated
        if (step @ gram @ step).clamp(min=0).sqrt() <= tol * squared_norm.clamp(min=0).sqrt():
            break
    return coefficients


@merge_method("geometric_median", reference="https://llm-merging.github.io")
def geometric_median(
    tensors: list[Tensor],
    *,
    base: Tensor,
    weight: Annotated[list[float] | float, Range(ge=0)] = 1.0,
    max_iter: Annotated[int, Range(ge=0)] = 100,
    tol: Annotated[float, Range(ge=0)] = 1e-6,
    lambda_: float = 1.0,
) -> Tensor:
    """Base plus the geometric median of the task vectors: robust to one outlying model.

    ``θ = θ_base + λz``, ``z = argmin_z Σ wᵢ‖δᵢ − z‖`` over the flattened task vectors
    ``δᵢ = θᵢ − θ_base`` of each tensor, found with Weiszfeld's iteration from the weighted mean
    (at most ``max_iter`` steps, stopping at a relative step ``tol``; see
    ``weiszfeld_coefficients``). Creative-track winner of the NeurIPS 2024 LLM Merging Competition
    (Gupta & Gupta, "Model Merging using Geometric Median of Task Vectors"); Weiszfeld 1937.

    Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a
    LoRA expert does not touch) give the base exactly; one model gives that model; identical task
    vectors give that vector; a median on one of the points is found without dividing by zero
    (distances are floored at 1e-8 of the longest task vector). Weights summing to zero are an
    error.
    """
    weights = per_model(weight, len(tensors), "weight")
    if sum(weights) <= 0:
        raise ValueError("geometric_median: the weights sum to zero; give a model a weight > 0")
    deltas = [task_vector(tensor, base) for tensor in tensors]
    coefficients = weiszfeld_coefficients(
        gram_matrix(deltas), torch.tensor(weights, dtype=torch.float64), max_iter, tol
    )
    median = deltas[0].mul_(float(coefficients[0]))
    for delta, coefficient in zip(deltas[1:], coefficients[1:].tolist(), strict=True):
        median.add_(delta, alpha=coefficient)
    if lambda_ != 1:
        median.mul_(lambda_)
    return median.add_(base)
