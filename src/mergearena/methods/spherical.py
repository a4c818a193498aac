"""Interpolation on the sphere (and near it): ``slerp``, ``multislerp``, ``karcher``, ``nearswap``.

Each tensor is treated as one flattened vector, as mergekit does; results match mergekit 0.1.5.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from torch import Tensor

from mergearena.methods.linear import per_model
from mergearena.methods.registry import Range, merge_method

DOT_THRESHOLD = 0.9995  # above this |cos θ| the vectors count as parallel: interpolate linearly
NORM_EPS = 1e-8


def slerp_vectors(
    start: Tensor,
    end: Tensor,
    t: float,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = NORM_EPS,
) -> Tensor:
    """Spherical linear interpolation between two flat float32 vectors (not normalised).

    ``cos θ = ⟨a/‖a‖, b/‖b‖⟩`` (a norm ≤ eps counts as 1);
    ``slerp = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b``, and ``(1−t)a + tb`` when
    ``|cos θ| > dot_threshold`` (near-parallel or antiparallel, where sin θ ≈ 0), computed as
    ``a + t(b − a)`` so that equal vectors come back bit for bit.
    Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985.
    """
    norm_start = torch.linalg.vector_norm(start)
    norm_end = torch.linalg.vector_norm(end)
    norm_start = torch.where(norm_start > eps, norm_start, 1)
    norm_end = torch.where(norm_end > eps, norm_end, 1)
    dot = (torch.dot(start, end) / (norm_start * norm_end)).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return torch.sub(end, start).mul_(t).add_(start)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    coef_start = float(torch.sin((1 - t) * theta) / sin_theta)
    coef_end = float(torch.sin(t * theta) / sin_theta)
    return (start * coef_start).add_(end, alpha=coef_end)


@merge_method("slerp", reference="https://en.wikipedia.org/wiki/Slerp", min_models=1, max_models=1)
def slerp(tensors: list[Tensor], *, base: Tensor, t: Annotated[float, Range(ge=0, le=1)]) -> Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1).

    Per tensor, flattened: see ``slerp_vectors``; near-parallel tensors (|cos θ| > 0.9995) are
    interpolated linearly. Same as mergekit's ``slerp`` (Shoemake, SIGGRAPH 1985).

    Degenerate cases: a model equal to the base gives the base exactly, and parallel or opposite
    tensors (|cos θ| > 0.9995) are interpolated linearly. A tensor of norm below 1e-8 counts as
    norm 1, so against a zero tensor the angle is π/2: ``sin((1−t)π/2)·a + sin(tπ/2)·b``, as in
    mergekit.
    """
    start = base.reshape(-1).float()
    end = tensors[0].reshape(-1).float()
    return slerp_vectors(start, end, t).view(base.shape)


@merge_method(
    "nearswap",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    min_models=1,
    max_models=1,
)
def nearswap(tensors: list[Tensor], *, base: Tensor, t: Annotated[float, Range(gt=0)]) -> Tensor:
    """Swap in the other model's values that lie within t of the base's, pull the rest towards them.

    ``w = clamp(t / max(|a − b|, 1e-6), 0, 1)``, ``θ = w·b + (1 − w)·a`` elementwise, with ``a`` the
    base and ``b`` the other model: entries closer than ``t`` are swapped in fully, farther ones
    are pulled towards ``b`` by ``t/|a − b|``. Same as mergekit's ``nearswap`` (alchemonaut,
    QuartetAnemoi-70B, 2024).

    Degenerate cases: equal entries (a model equal to the base) are swapped in, so the result is
    the base exactly; the distance is floored at 1e-6, so no entry divides by zero.
    """
    start = base.float()
    end = tensors[0].float()
    weight = (t / (start - end).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return (end * weight).add_((1 - weight).mul_(start))


@merge_method("multislerp", reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
def multislerp(
    tensors: list[Tensor],
    *,
    weight: list[float],
    base: Tensor | None = None,
    normalize_weights: bool = True,
    eps: Annotated[float, Range(gt=0)] = NORM_EPS,
) -> Tensor:
    """Barycentric interpolation of several models on the hypersphere (mergekit's multislerp).

    With ``xᵢ = θᵢ − θ_base`` (or ``θᵢ``), ``uᵢ = xᵢ / (‖xᵢ‖ + eps)`` and weights ``wᵢ`` (divided
    by their sum with ``normalize_weights``): mergekit projects the ``uᵢ`` onto the tangent plane at
    ``m = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖``, averages there and maps back with the exponential map. The tangent
    average ``Σ wᵢ(uᵢ − ⟨uᵢ,m⟩m) = Σ wᵢuᵢ − ‖Σ wᵢuᵢ‖·m`` is exactly zero, so the result is
    ``θ = θ_base + (Σ wᵢ‖xᵢ‖) · m``: the weighted mean direction at the weighted mean norm, which is
    what we compute. Goddard, "Multislerp", 2025.

    Degenerate cases: one model is returned as it is; identical models give that model exactly;
    task vectors that are all zero (models equal to the base) give the base exactly. Where the
    weighted directions cancel (``‖Σ wᵢuᵢ‖ < eps``: zero task vectors, or ``a`` and ``−a`` with
    equal weights) there is no mean direction, and the result is the linear average
    ``θ_base + Σ wᵢxᵢ`` (zero for zero vectors, the base for a cancelling pair), for any number
    of models.
    """
    if len(tensors) == 1:
        return tensors[0]
    if base is None and _all_equal(tensors):
        return tensors[0]
    weights = per_model(weight, len(tensors), "weight")
    if normalize_weights:
        weight_sum = sum(weights)
        weights = [w / weight_sum for w in weights]
    vectors = [_offset(tensor, base).reshape(-1) for tensor in tensors]
    norms = [float(torch.linalg.vector_norm(vector)) for vector in vectors]
    direction = torch.zeros_like(vectors[0])
    for vector, norm, w in zip(vectors, norms, weights, strict=True):
        direction.add_(vector, alpha=w / (norm + eps))
    direction_norm = float(torch.linalg.vector_norm(direction))
    if direction_norm < eps:
        direction.zero_()
        for vector, w in zip(vectors, weights, strict=True):
            direction.add_(vector, alpha=w)
        result = direction
    else:
        mean_norm = sum(w * norm for w, norm in zip(weights, norms, strict=True))
        result = direction.mul_(mean_norm / direction_norm)
    result = result.view(tensors[0].shape)
    return result if base is None else result.add_(base)


def _all_equal(tensors: list[Tensor]) -> bool:
    """Whether every tensor holds the first one's values (dtypes may differ)."""
    return all(torch.equal(tensor, tensors[0]) for tensor in tensors[1:])


def _offset(tensor: Tensor, base: Tensor | None) -> Tensor:
    """``θ − θ_base`` (or ``θ``) in float32, never aliasing the caller's tensor."""
    if base is None:
        return tensor.float()
    return tensor.to(dtype=torch.float32, copy=True).sub_(base)


def karcher_mean(
    vectors: list[Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5
) -> Tensor:
    """Weighted Karcher (Fréchet) mean of flat float32 vectors on the sphere, rescaled.

    With ``uᵢ = xᵢ/‖xᵢ‖`` (vectors with ``‖xᵢ‖ ≤ tol`` are left out of the direction) and
    ``αᵢ`` normalised over the rest, start from ``m = Σαᵢuᵢ/‖Σαᵢuᵢ‖`` and repeat the Riemannian
    gradient step ``v = Σ αᵢ θᵢ/sin θᵢ · (uᵢ − cos θᵢ·m)`` (``θᵢ = arccos⟨m, uᵢ⟩``, terms with
    ``θᵢ < tol`` skipped), ``m ← cos‖v‖·m + sin‖v‖·v/‖v‖``, until ``‖v‖ < tol`` or ``max_iter``.
    Result: ``(Σ αᵢ‖xᵢ‖) · m`` with the caller's ``αᵢ``. Karcher, "Riemannian center of mass and
    mollifier smoothing", CPAM 1977; mergekit's ``karcher``.
    """
    norms = [float(torch.linalg.vector_norm(vector)) for vector in vectors]
    valid = [index for index, norm in enumerate(norms) if norm > tol]
    if not valid:
        return torch.zeros_like(vectors[0], dtype=torch.float32)
    alpha_sum = sum(alphas[index] for index in valid)
    valid_alphas = [alphas[index] / alpha_sum for index in valid]
    units = [vectors[index] / norms[index] for index in valid]

    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(valid_alphas, units, strict=True):
        mean.add_(unit, alpha=alpha)
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mean_norm < tol else mean.div_(mean_norm)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(valid_alphas, units, strict=True):
            cos_theta = float(torch.dot(mean, unit).clamp(-1, 1))
            theta = math.acos(cos_theta)
            if theta < tol:
                continue
            step = alpha * theta / math.sin(theta)
            tangent.add_(unit, alpha=step).add_(mean, alpha=-step * cos_theta)
        tangent_norm = float(torch.linalg.vector_norm(tangent))
        if tangent_norm < tol:
            break
        mean = mean.mul_(math.cos(tangent_norm)).add_(
            tangent, alpha=math.sin(tangent_norm) / tangent_norm
        )
        unit_norm = float(torch.linalg.vector_norm(mean))
        if unit_norm > tol:
            mean.div_(unit_norm)
    return mean.mul_(sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True)))


@merge_method("karcher", reference="https://en.wikipedia.org/wiki/Karcher_mean")
def karcher(
    tensors: list[Tensor],
    *,
    weight: Annotated[list[float] | float, Range(ge=0)] = 1.0,
    max_iter: Annotated[int, Range(ge=0)] = 10,
    tol: Annotated[float, Range(gt=0)] = 1e-5,
) -> Tensor:
    """Karcher mean (Riemannian centre of mass) of the models' tensors on the hypersphere.

    Direction: the point on the unit sphere minimising ``Σ αᵢ d(m, θᵢ/‖θᵢ‖)²`` (geodesic
    distance), found by Riemannian gradient steps; length: ``Σ αᵢ‖θᵢ‖``; ``αᵢ = wᵢ/Σw`` (equal by
    default, as in mergekit, which has no weights). See ``karcher_mean``. Karcher, CPAM 1977.

    Degenerate cases: one model, or identical models, give that model exactly; tensors of norm
    at most ``tol`` take no part in the direction (all zero: the result is zero); opposite
    directions, whose mean is undefined, start from the first model's direction.
    """
    if len(tensors) == 1 or _all_equal(tensors):
        return tensors[0]
    weights = per_model(weight, len(tensors), "weight")
    weight_sum = sum(weights)
    if weight_sum <= 0:
        raise ValueError("karcher: the weights sum to zero; give at least one model a weight > 0")
    alphas = [w / weight_sum for w in weights]
    vectors = [tensor.reshape(-1).float() for tensor in tensors]
    return karcher_mean(vectors, alphas, max_iter, tol).view(tensors[0].shape)
