"""How weighted task vectors combine: a plain sum, or TIES's sign election and disjoint merge."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mergearena.methods.task_vectors import float32_buffer

Consensus = Literal["sum", "count"]


def elected_sign(
    deltas: list[Tensor], consensus: Consensus = "sum", out: Tensor | None = None
) -> Tensor:
    """The sign each entry is merged with, as a float tensor of ±1 (TIES step 2, "elect").

    ``sum``: ``sign(Σᵢ δᵢ)``, the sign with more total mass (the paper's rule); ``count``: the
    sign held by more models. A tie elects +1.
    """
    total = float32_buffer(deltas[0], out)
    if consensus == "sum":
        if len(deltas) == 1:
            total.copy_(deltas[0])
        else:
            torch.add(deltas[0], deltas[1], out=total)
        for delta in deltas[2:]:
            total.add_(delta)
    elif consensus == "count":
        torch.sign(deltas[0], out=total)
        for delta in deltas[1:]:
            total.add_(torch.sign(delta))
    else:
        raise ValueError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    return total.ge_(0).mul_(2).sub_(1)


def disjoint_merge_(
    deltas: list[Tensor],
    weights: list[float],
    normalize: bool,
    consensus: Consensus = "sum",
    scratch: Tensor | None = None,
    divisor: Tensor | None = None,
) -> Tensor:
    """TIES disjoint merge, consuming ``deltas`` (the weighted task vectors; the list is emptied).

    ``δ = Σᵢ aᵢ δᵢ``, divided by ``Σᵢ aᵢ wᵢ`` (1 where that is 0) if ``normalize``, where
    ``aᵢ = [sign δᵢ = s]`` marks the entries that agree with the elected sign ``s`` (zeros agree
    with neither). TIES steps 2 and 3, "elect" and "disjoint merge". ``scratch`` and ``divisor``
    are optional float32 buffers shaped like a task vector.

    Works in the elected sign's frame: ``δᵢ·s`` clamped at 0 is the agreeing part (``|δᵢ|`` or 0)
    and its sign is ``aᵢ``, so the whole merge is in-place float arithmetic.
    """
    sign = elected_sign(deltas, consensus, out=scratch)
    merged = deltas.pop(0).mul_(sign).clamp_(min=0)  # Σ aᵢ|δᵢ| so far
    agreeing_weight = (  # Σ aᵢwᵢ so far, the divisor when normalizing
        torch.sign(merged, out=float32_buffer(merged, divisor)).mul_(weights[0])
        if normalize
        else None
    )
    for weight in weights[1:]:
        delta = deltas.pop(0).mul_(sign).clamp_(min=0)
        merged.add_(delta)
        if agreeing_weight is not None:
            agreeing_weight.add_(delta.sign_(), alpha=weight)
        del delta
    merged.mul_(sign)
    if agreeing_weight is None:
        return merged
    if min(weights) >= 0:
        # Σ aᵢwᵢ is 0 only where no model agrees, and there the merged value is 0 as well, so a
        # tiny floor is the same as mergekit's "divide by 1 there", and much faster.
        agreeing_weight.clamp_(min=torch.finfo(torch.float32).tiny)
    else:
        agreeing_weight.masked_fill_(agreeing_weight == 0, 1)
    return merged.div_(agreeing_weight)


def sum_merge_(deltas: list[Tensor], weights: list[float], normalize: bool) -> Tensor:
    """Task-arithmetic sum, consuming ``deltas``: ``Σᵢ δᵢ``, divided by ``Σᵢ wᵢ`` if ``normalize``.

    A weight sum below 1e-8 in magnitude is treated as 1 (mergekit's guard).
    """
    merged = deltas.pop(0)
    while deltas:
        merged.add_(deltas.pop(0))
    weight_sum = sum(weights)
    if normalize and abs(weight_sum) >= 1e-8:
        merged.div_(weight_sum)
    return merged
