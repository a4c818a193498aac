"""Model Stock: interpolate between the base and the average of fine-tuned models by their angle."""

from __future__ import annotations

import torch
from torch import Tensor

from mergearena.methods.registry import merge_method


def model_stock_ratio(offsets: list[Tensor], eps: float = 1e-6) -> Tensor:
    """Model Stock's interpolation ratio ``t = N cos θ / (1 + (N − 1) cos θ)`` along the last dim.

    ``cos θ`` is the mean pairwise cosine of the offsets ``θᵢ − θ_base`` (each clamped to
    [-1, 1], norms' product floored at ``eps``). Where ``|1 + (N − 1) cos θ| < eps`` there is no
    finite ratio and ``t = 0`` (keep the base), as in mergekit.
    """
    cosines = []
    for index, first in enumerate(offsets):
        for second in offsets[index + 1 :]:
            norms = torch.linalg.vector_norm(first, dim=-1) * torch.linalg.vector_norm(
                second, dim=-1
            )
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=eps)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(offsets)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < eps
    ratio = count * cos_theta / torch.where(singular, 1, denominator)
    return ratio.masked_fill_(singular, 0)


@merge_method("model_stock", reference="https://arxiv.org/abs/2403.19522", min_models=2)
def model_stock(tensors: list[Tensor], *, base: Tensor, filter_wise: bool = False) -> Tensor:
    """Model Stock: move from the base towards the models' average by their mutual angle.

    ``θ = t · mean(θᵢ) + (1 − t) · θ_base`` with ``t = N cos θ / (1 + (N − 1) cos θ)`` and ``cos θ``
    the mean pairwise cosine between the offsets ``θᵢ − θ_base`` (``model_stock_ratio``). Per
    tensor, or per row (output filter) with ``filter_wise``. Jang et al., "Model Stock: All we need
    is just a few fine-tuned models", ECCV 2024 (arXiv:2403.19522); same as mergekit's.

    Degenerate cases: task vectors that are all zero (models equal to the base) have cosine 0,
    so ``t = 0`` and the result is the base exactly; norms' products are floored at 1e-6; where
    ``1 + (N − 1) cos θ`` vanishes (opposite task vectors) ``t = 0`` and the base is kept, as in
    mergekit.
    """
    base_rows = base.float()
    if filter_wise:
        base_rows = base_rows if base_rows.dim() > 1 else base_rows.unsqueeze(0)
    else:
        base_rows = base_rows.reshape(-1)
    models = [tensor.float().reshape(base_rows.shape) for tensor in tensors]
    ratio = model_stock_ratio([model - base_rows for model in models])
    average = torch.zeros_like(base_rows)
    for model in models:
        average.add_(model)
    average.div_(len(models))
    return average.mul_(ratio).add_((1 - ratio) * base_rows).view(base.shape)
