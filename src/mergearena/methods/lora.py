"""Adapter-space LoRA merges: several adapters of one module into one adapter, ranks may differ.

A LoRA module's update is ``Δ = s · B A`` (``B = up``, out × r; ``A = down``, r × in). Merging in
adapter space keeps the result an adapter, unlike PEFT's ``linear`` merge which averages ``A`` and
``B`` separately (dropping the cross terms) and needs equal ranks.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from mergearena.methods.linear import per_model
from mergearena.methods.registry import LoraFactors, Range, merge_method


def stacked_factors(factors: list[LoraFactors], weights: list[float]) -> tuple[Tensor, Tensor]:
    """``up = [w₁s₁B₁ | … | wₙsₙBₙ]`` (out × Σrᵢ), ``down = [A₁; …; Aₙ]`` (Σrᵢ × in), float32.

    ``up @ down = Σ wᵢ sᵢ Bᵢ Aᵢ`` exactly: the block product has no cross terms.
    """
    up = torch.cat(
        [f.up.float() * (w * f.scale) for f, w in zip(factors, weights, strict=True)], dim=1
    )
    down = torch.cat([f.down.float() for f in factors], dim=0)
    return up, down


def low_rank_svd(up: Tensor, down: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors of ``up @ down`` (Eckart–Young), without forming the product.

    With ``up = Q₁R₁`` and ``downᵀ = Q₂R₂`` (reduced QR), ``up @ down = Q₁ (R₁R₂ᵀ) Q₂ᵀ``; the SVD of
    the small core ``R₁R₂ᵀ = U S Vᵀ`` gives ``up @ down = (Q₁U) S (Q₂V)ᵀ``. Keep the ``rank``
    largest singular values and split them evenly: ``up' = Q₁U √S``, ``down' = √S Vᵀ Q₂ᵀ``. Costs
    O((out + in)·R²) for inner size R instead of O(out·in·R). Singular values beyond what the
    shapes allow are returned as zero columns, so the result always has ``min(rank, R)`` columns.
    """
    keep = min(rank, up.shape[1])
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, singular, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    available = min(keep, singular.numel())
    root = singular[:available].sqrt()
    new_up = up.new_zeros(up.shape[0], keep)
    new_down = down.new_zeros(keep, down.shape[1])
    new_up[:, :available] = (q_up @ u[:, :available]) * root
    new_down[:available] = root[:, None] * (vh[:available] @ q_down.T)
    return new_up, new_down


@merge_method("lora_concat", reference="https://arxiv.org/abs/2106.09685", output="adapter")
def lora_concat(factors: list[LoraFactors], *, weight: list[float] | float = 1.0) -> LoraFactors:
    """Exact adapter merge by concatenating ranks: ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ with rank Σ rᵢ.

    ``up = [w₁s₁B₁ | … ]``, ``down = [A₁; …]``, scale 1 (see ``stacked_factors``); the merged
    adapter applies exactly the weighted sum of the adapters' updates, whatever their ranks
    (PEFT's ``add_weighted_adapter`` calls this ``cat``). Hu et al., "LoRA", ICLR 2022
    (arXiv:2106.09685).

    Degenerate cases: adapters whose update is zero (PEFT initialises ``B`` to zero) give a zero
    update; one adapter gives its own update, at rank ``r`` and scale 1.
    """
    up, down = stacked_factors(factors, per_model(weight, len(factors), "weight"))
    return LoraFactors(down=down, up=up, scale=1.0)


@merge_method("lora_svd", reference="https://arxiv.org/abs/2106.09685", output="adapter")
def lora_svd(
    factors: list[LoraFactors],
    *,
    rank: Annotated[int, Range(ge=1)],
    weight: list[float] | float = 1.0,
) -> LoraFactors:
    """Rank-bounded adapter merge: the best rank-r approximation of Σ wᵢ sᵢ Bᵢ Aᵢ by SVD.

    Truncated SVD of the exact sum (``low_rank_svd``, computed from QR factors of the stacked
    factors, never the out × in matrix), singular values split as square roots between ``up``
    and ``down``; scale 1; rank ``min(rank, Σ rᵢ)``, so with ``rank ≥ Σ rᵢ`` the merge is exact.
    Eckart & Young, Psychometrika 1936; PEFT's ``add_weighted_adapter(combination_type="svd")``.

    Degenerate cases: a zero total update (untrained adapters, or updates that cancel) gives
    zero factors, not NaN: its singular values are all zero; ranks above ``Σ rᵢ`` are zero
    columns.
    """
    up, down = stacked_factors(factors, per_model(weight, len(factors), "weight"))
    new_up, new_down = low_rank_svd(up, down, rank)
    return LoraFactors(down=new_down, up=new_up, scale=1.0)
