"""Generalized task arithmetic: task vectors, sparsified, sign-elected, summed onto the base.

Every method here is the same pipeline with different steps, as in mergekit's
``GeneralizedTaskArithmeticMerge`` (whose parameter names, defaults and results we match):

1. task vectors ``δᵢ = θᵢ − θ_base`` (float32);
2. sparsify each ``δᵢ`` (TIES magnitude trim, DARE random drop, breadcrumbs outlier + small-value
   trim, DELLA rank-dependent random drop), optionally rescaled;
3. weight: ``δᵢ ← wᵢ δᵢ``;
4. optionally elect a sign per entry and drop the entries that disagree with it (TIES);
5. sum, optionally divide by the weights that contributed (``normalize``), scale by ``lambda``
   and add to the base.

Speed: magnitude trimming needs the k-th largest ``|δ|``. mergekit sorts every tensor
(O(n log n)); ``magnitude_at_rank`` finds it in O(n) with two radix histograms of the float bit
patterns. Ties at a cut are broken by index as a stable sort would, so the kept set is mergekit's
wherever magnitudes are distinct. On CPU the other cost is page-faulting fresh tensors, so the
steps work in place on task vectors the method owns (names ending in ``_``) and accept a
``scratch`` tensor (float32, shaped like ``δ``, contents overwritten) to reuse instead of
allocating. The caller's tensors are never modified.

Memory: at most about (models + 2) float32 copies of the tensor: the task vectors, the scratch
tensor (also the elected sign) and the divisor; the selection scans use blocks of 2^20 entries.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, Literal, NamedTuple

import torch
from torch import Tensor

from mergearena.methods.linear import per_model
from mergearena.methods.registry import Range, merge_method

Consensus = Literal["sum", "count"]
RescaleMode = Literal["l1", "inverse_density"]
Density = Annotated[list[float], Range(ge=0, le=1)]
Sparsifier = Callable[[Tensor, int, Tensor], Tensor]  # (δ, model index, scratch) -> pruned δ

TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"

_RESCALE_EPS = 1e-7  # mergekit's: below this L1 norm (before or after) no rescaling happens


def _buffer(like: Tensor, scratch: Tensor | None) -> Tensor:
    """``scratch`` (viewed like ``like``) if given, else a new float32 tensor like ``like``."""
    if scratch is None:
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return scratch.view(like.shape)


def _as_float32(tensor: Tensor, scratch: Tensor | None) -> Tensor:
    """``tensor`` in float32: itself if it already is, else converted into ``scratch``."""
    if tensor.dtype == torch.float32:
        return tensor
    return _buffer(tensor, scratch).copy_(tensor)


# --- 1. task vectors ---------------------------------------------------------------------------


def task_vector(tensor: Tensor, base: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``δ = θ − θ_base`` as a new float32 tensor (Ilharco et al., arXiv:2212.04089)."""
    if tensor.dtype == base.dtype == torch.float32:
        return torch.sub(tensor, base)
    delta = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device).copy_(tensor)
    return delta.sub_(_as_float32(base, scratch))


def l1_norm(delta: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``‖δ‖₁ = Σ|δ|``, summed like mergekit (``abs().sum()``) so that rescaling matches exactly."""
    return torch.abs(delta, out=_buffer(delta, scratch)).sum()


# --- exact order statistics of |δ| without sorting --------------------------------------------


class MagnitudeRank(NamedTuple):
    """The magnitude at one ascending rank of ``|δ|``, and how many entries lie below and at it."""

    value: float
    below: int  # entries with a smaller magnitude
    equal: int  # entries with exactly this magnitude (ties)


_CHUNK = 1 << 20  # entries per block of the selection scans, which bounds their scratch memory


def _blocks(flat: Tensor) -> list[tuple[int, Tensor]]:
    """``(start, flat[start : start + _CHUNK])`` for each block of ``flat``."""
    return [(start, flat[start : start + _CHUNK]) for start in range(0, flat.numel(), _CHUNK)]


def _halves(block: Tensor) -> tuple[Tensor, Tensor]:
    """The high and low 16 bits of each float32 of ``block``, as strided int16 views."""
    halves = block.view(torch.int16)
    if sys.byteorder == "little":
        return halves[1::2], halves[0::2]
    return halves[0::2], halves[1::2]


def magnitude_at_rank(flat: Tensor, rank: int) -> MagnitudeRank:
    """The ``rank``-th smallest (0-based) ``|δ|`` of contiguous float32 ``flat``, without sorting.

    Radix selection on the float bit patterns, which for non-negative floats are ordered like the
    numbers: a histogram of the top 15 bits (sign dropped) finds the bucket holding the rank, a
    histogram of the low 16 bits of that bucket's entries finds the exact value. O(n) and a few
    small blocks of scratch, versus the O(n log n) sort mergekit uses.
    """
    high_counts = torch.zeros(1 << 15, dtype=torch.int64, device=flat.device)
    for _, block in _blocks(flat):
        high_counts += torch.bincount(_halves(block)[0].bitwise_and(0x7FFF), minlength=1 << 15)
    cumulative = high_counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, rank + 1))
    before = int(cumulative[bucket] - high_counts[bucket])
    low_counts = torch.zeros(1 << 16, dtype=torch.int64, device=flat.device)
    for _, block in _blocks(flat):
        high, low = _halves(block)
        selected = low[high.bitwise_and(0x7FFF) == bucket].to(torch.int32).bitwise_and_(0xFFFF)
        low_counts += torch.bincount(selected, minlength=1 << 16)
    cumulative = low_counts.cumsum(0)
    low_bits = int(torch.searchsorted(cumulative, rank + 1 - before))
    below = before + int(cumulative[low_bits] - low_counts[low_bits])
    bits = torch.tensor([(bucket << 16) | low_bits], dtype=torch.int32)
    return MagnitudeRank(float(bits.view(torch.float32)), below, int(low_counts[low_bits]))


def nth_with_magnitude(flat: Tensor, value: float, n: int) -> int:
    """Flat index of the ``n``-th (1-based) entry of ``flat`` whose magnitude is ``value``."""
    seen = 0
    for start, block in _blocks(flat):
        matches = block.abs() == value
        found = int(matches.sum())
        if seen + found >= n:
            return start + int(matches.nonzero()[n - seen - 1])
        seen += found
    raise ValueError(f"fewer than {n} entries have magnitude {value}")


def _zero_magnitude_(flat: Tensor, value: float, mask: Tensor) -> Tensor:
    """Zero the entries of ``flat`` whose magnitude is ``value``, using ``mask`` as scratch."""
    return flat.mul_(torch.abs(flat, out=mask).ne_(value))


def keep_largest_(delta: Tensor, count: int, scratch: Tensor | None = None) -> Tensor:
    """Zero all but the ``count`` largest-magnitude entries of ``delta`` (float32), in place.

    Exactly ``count`` entries survive; of equal magnitudes at the cut the lower flat index is
    kept, as in a stable descending sort.
    """
    flat = delta.view(-1)
    numel = flat.numel()
    if count >= numel:
        return delta
    if count <= 0:
        return delta.zero_()
    cut = magnitude_at_rank(flat, numel - count)
    mask = _buffer(flat, scratch)
    flat.mul_(torch.abs(flat, out=mask).ge_(cut.value))
    keep_ties = count - (numel - cut.below - cut.equal)
    if keep_ties < cut.equal and cut.value > 0:
        last = nth_with_magnitude(flat, cut.value, keep_ties)
        _zero_magnitude_(flat[last + 1 :], cut.value, mask.view(-1)[last + 1 :])
    return delta


def keep_rank_range_(delta: Tensor, start: int, stop: int, scratch: Tensor | None = None) -> Tensor:
    """Zero the entries of ``delta`` (float32) whose magnitude rank is outside ``[start, stop)``.

    In place. Ranks are those of a stable ascending sort of ``|δ|`` (equal magnitudes: lower
    index first).
    """
    flat = delta.view(-1)
    numel = flat.numel()
    start, stop = max(start, 0), min(stop, numel)
    if stop <= start:
        return delta.zero_()
    if start == 0 and stop == numel:
        return delta
    low, high = magnitude_at_rank(flat, start), magnitude_at_rank(flat, stop - 1)
    # ties at the low cut hold ranks [low.below, low.below + low.equal): the first
    # start − low.below of them go; at the high cut the first stop − high.below of them stay
    drop_low, keep_high = start - low.below, stop - high.below
    first = nth_with_magnitude(flat, low.value, drop_low) if drop_low > 0 else -1
    last = nth_with_magnitude(flat, high.value, keep_high) if keep_high < high.equal else numel
    mask = _buffer(flat, scratch).view(-1)
    flat.mul_(torch.abs(flat, out=mask).ge_(low.value))
    flat.mul_(torch.abs(flat, out=mask).le_(high.value))
    _zero_magnitude_(flat[: first + 1], low.value, mask[: first + 1])
    _zero_magnitude_(flat[last + 1 :], high.value, mask[last + 1 :])
    return delta


# --- 2. sparsification -------------------------------------------------------------------------


def rescale_l1_(pruned: Tensor, l1_before: Tensor | float, scratch: Tensor | None = None) -> Tensor:
    """Scale ``pruned`` in place so that its L1 norm is ``l1_before`` again (mergekit's rescale).

    Skipped when either norm is below 1e-7.
    """
    l1_after = l1_norm(pruned, scratch)
    if l1_before >= _RESCALE_EPS and l1_after >= _RESCALE_EPS:
        pruned.mul_(l1_before / l1_after)
    return pruned


def magnitude_prune_(
    delta: Tensor, density: float, rescale: bool = False, scratch: Tensor | None = None
) -> Tensor:
    """TIES trim, in place: keep the ``k = max(1, ⌊density·n⌋)`` entries of largest ``|δ|``.

    With ``rescale`` the result is scaled back to the L1 norm of ``δ``. Density ≥ 1 keeps
    everything, density ≤ 0 nothing. Yadav et al., "TIES-Merging", NeurIPS 2023
    (arXiv:2306.01708), step 1 ("trim").
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return delta.zero_()
    l1_before = l1_norm(delta, scratch) if rescale else 0.0
    keep_largest_(delta, max(1, int(density * delta.numel())), scratch)
    return rescale_l1_(delta, l1_before, scratch) if rescale else delta


def magnitude_outliers_prune_(
    delta: Tensor,
    density: float,
    gamma: float,
    rescale: bool = False,
    scratch: Tensor | None = None,
) -> Tensor:
    """Breadcrumbs trim, in place: drop the ``⌊γn⌋`` largest ``|δ|`` and the smallest.

    In ascending order of ``|δ|`` the kept entries are ranks ``[b, b + ⌊density·n⌋)`` with
    ``b = max(0, n − ⌊density·n⌋ − ⌊γn⌋)``: when density + γ > 1 fewer outliers are removed.
    With ``rescale`` the result is scaled back to the L1 norm of ``δ``. Density ≥ 1 keeps
    everything, outliers included (as in mergekit).
    Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024 (arXiv:2312.06795).
    """
    if density >= 1:
        return delta
    numel = delta.numel()
    keep_count = int(density * numel)
    bottom_count = max(0, numel - keep_count - int(gamma * numel))
    l1_before = l1_norm(delta, scratch) if rescale else 0.0
    keep_rank_range_(delta, bottom_count, bottom_count + keep_count, scratch)
    return rescale_l1_(delta, l1_before, scratch) if rescale else delta


def bernoulli_mask(
    delta: Tensor,
    keep_probability: float | Tensor,
    generator: torch.Generator | None,
    scratch: Tensor | None = None,
) -> Tensor:
    """A float 0/1 mask like ``δ``: each entry is 1 with probability ``p`` (a number or a tensor).

    Drawn as ``u < p`` with ``u ~ U[0, 1)`` from ``generator``, on the generator's device, so a
    seed gives the same mask wherever the tensor lives. DARE's drop step: Yu et al., "Language
    Models are Super Mario", ICML 2024 (arXiv:2311.03099).
    """
    device = generator.device if generator is not None else delta.device
    if not isinstance(keep_probability, Tensor):
        return _bernoulli_bits(delta, float(keep_probability), generator, device)
    uniform = _buffer(delta, scratch)
    if uniform.device == device:
        torch.rand(delta.shape, generator=generator, out=uniform)
    else:
        uniform.copy_(torch.rand(delta.shape, generator=generator, device=device))
    return uniform.lt_(keep_probability)


def _bernoulli_bits(
    delta: Tensor, keep_probability: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """A bool mask like ``δ``, each entry True with probability ``p`` rounded to a multiple of 2⁻¹⁶.

    Every 64-bit random word gives four 16-bit uniforms, and ``u < p`` is an int16 comparison:
    about 5× faster than drawing a float per entry (random draws dominate DARE's cost on a CPU).
    """
    units = round(keep_probability * 65536)
    if units >= 65536:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    if units <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    count = delta.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1, generator=generator)
    lanes = words.view(torch.int16)[:count].view(delta.shape)
    return lanes.lt(units - 32768).to(delta.device)


def della_keep_probabilities(
    delta: Tensor, density: float, epsilon: float, scratch: Tensor | None = None
) -> Tensor:
    """DELLA MagPrune: keep probability rising linearly with the rank of ``|δ|`` within its row.

    ``pᵢ = density − ε + 2ε · rᵢ / (m − 1)`` where ``rᵢ ∈ [0, m)`` is the rank of ``|δᵢ|`` among
    the ``m`` entries along dimension 1 (a 1-D tensor is one row), smallest first (ties: lower
    index first); so the mean keep rate is ``density``. Deep et al., "DELLA-Merging",
    arXiv:2406.11617. A row of one entry gets ``density − ε`` (mergekit divides 0 by 0 there).
    Rows are sorted a block at a time, which bounds the sort's index memory.
    """
    magnitudes = torch.abs(delta, out=_buffer(delta, scratch))
    rows = magnitudes.movedim(1, -1) if delta.dim() >= 2 else magnitudes.unsqueeze(0)
    moved_shape, length = rows.shape, rows.shape[-1]
    rows = rows.reshape(-1, length)
    ramp = torch.arange(length, dtype=torch.float32, device=delta.device)
    ramp.mul_(2 * epsilon / max(length - 1, 1)).add_(density - epsilon)
    probabilities = torch.empty_like(rows)
    step = max(1, _CHUNK // length)
    for start in range(0, rows.shape[0], step):
        order = torch.argsort(rows[start : start + step], dim=-1, stable=True)
        probabilities[start : start + step].scatter_(-1, order, ramp.expand(order.shape))
    probabilities = probabilities.view(moved_shape)
    if delta.dim() >= 2:
        probabilities = probabilities.movedim(-1, 1)
    return probabilities.reshape(delta.shape)


def random_drop_(
    delta: Tensor,
    keep_probability: float | Tensor,
    rescale: bool,
    rescale_mode: RescaleMode,
    generator: torch.Generator | None,
    scratch: Tensor | None = None,
) -> Tensor:
    """DARE / DELLA drop, in place: ``δ ⊙ m`` with ``m ~ Bernoulli(p)``, then rescaled if asked.

    ``rescale_mode="l1"`` (mergekit): multiply by ``‖δ‖₁ / ‖δ ⊙ m‖₁``.
    ``rescale_mode="inverse_density"`` (the DARE and DELLA papers): divide each kept entry by its
    keep probability ``p``, so that ``E[δ ⊙ m / p] = δ``.
    """
    l1_before = l1_norm(delta, scratch) if rescale and rescale_mode == "l1" else 0.0
    delta.mul_(bernoulli_mask(delta, keep_probability, generator, scratch))
    if not rescale:
        return delta
    if rescale_mode == "inverse_density":
        return delta.div_(keep_probability)
    return rescale_l1_(delta, l1_before, scratch)


def dare_drop_(
    delta: Tensor,
    density: float,
    rescale: bool,
    rescale_mode: RescaleMode,
    generator: torch.Generator | None,
    scratch: Tensor | None = None,
) -> Tensor:
    """DARE drop in place: keep each entry with probability ``density`` (see ``random_drop_``)."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    return random_drop_(delta, density, rescale, rescale_mode, generator, scratch)


def della_drop_(
    delta: Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    rescale_mode: RescaleMode,
    generator: torch.Generator | None,
    scratch: Tensor | None = None,
) -> Tensor:
    """DELLA MagPrune in place: random drop with ``della_keep_probabilities``."""
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: density ± epsilon must lie in (0, 1), got density {density} and epsilon "
            f"{epsilon}; lower epsilon or move density away from 0 and 1"
        )
    probabilities = della_keep_probabilities(delta, density, epsilon, scratch)
    return random_drop_(delta, probabilities, rescale, rescale_mode, generator, scratch)


# --- 4. sign election --------------------------------------------------------------------------


def elected_sign(
    deltas: list[Tensor], consensus: Consensus = "sum", out: Tensor | None = None
) -> Tensor:
    """The sign each entry is merged with, as a float tensor of ±1 (TIES step 2, "elect").

    ``sum``: ``sign(Σᵢ δᵢ)``, the sign with more total mass (the paper's rule); ``count``: the
    sign held by more models. A tie elects +1.
    """
    total = _buffer(deltas[0], out)
    if consensus == "sum":
        total.copy_(deltas[0])
        for delta in deltas[1:]:
            total.add_(delta)
    elif consensus == "count":
        torch.sign(deltas[0], out=total)
        for delta in deltas[1:]:
            total.add_(torch.sign(delta))
    else:
        raise ValueError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    return total.ge_(0).mul_(2).sub_(1)


# --- 5. merging --------------------------------------------------------------------------------


def disjoint_merge_(
    deltas: list[Tensor],
    weights: list[float],
    normalize: bool,
    consensus: Consensus = "sum",
    scratch: Tensor | None = None,
) -> Tensor:
    """TIES disjoint merge, consuming ``deltas`` (the weighted task vectors; the list is emptied).

    ``δ = Σᵢ aᵢ δᵢ``, divided by ``Σᵢ aᵢ wᵢ`` (1 where that is 0) if ``normalize``, where
    ``aᵢ = [sign δᵢ = s]`` marks the entries that agree with the elected sign ``s`` (zeros agree
    with neither). TIES steps 2 and 3, "elect" and "disjoint merge".

    Works in the elected sign's frame: ``δᵢ·s`` clamped at 0 is the agreeing part (``|δᵢ|`` or 0)
    and its sign is ``aᵢ``, so the whole merge is in-place float arithmetic.
    """
    sign = elected_sign(deltas, consensus, out=scratch)
    merged = deltas.pop(0).mul_(sign).clamp_(min=0)  # Σ aᵢ|δᵢ| so far
    divisor = torch.sign(merged).mul_(weights[0]) if normalize else None
    for weight in weights[1:]:
        delta = deltas.pop(0).mul_(sign).clamp_(min=0)
        merged.add_(delta)
        if divisor is not None:
            divisor.add_(delta.sign_(), alpha=weight)
        del delta
    merged.mul_(sign)
    if divisor is None:
        return merged
    if min(weights) >= 0:
        # Σ aᵢwᵢ is 0 only where no model agrees, and there the merged value is 0 as well, so a
        # tiny floor is the same as mergekit's "divide by 1 there", and much faster.
        divisor.clamp_(min=torch.finfo(torch.float32).tiny)
    else:
        divisor.masked_fill_(divisor == 0, 1)
    return merged.div_(divisor)


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


def generalized_task_arithmetic(
    tensors: list[Tensor],
    base: Tensor,
    weights: list[float],
    sparsify: Sparsifier | None,
    consensus: Consensus | None,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """``θ_base + λ · merge(wᵢ · sparsify(θᵢ − θ_base))``: the pipeline every method here shares.

    ``sparsify(δ, i, scratch)`` prunes model ``i``'s task vector (it may work in place);
    ``consensus`` ``None`` sums the task vectors, otherwise the sign is elected that way and
    disagreeing entries are dropped (``disjoint_merge_``).
    """
    scratch = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    deltas = []
    for index, (tensor, weight) in enumerate(zip(tensors, weights, strict=True)):
        delta = task_vector(tensor, base, scratch)
        if sparsify is not None:
            delta = sparsify(delta, index, scratch)
        if weight != 1:
            delta.mul_(weight)
        deltas.append(delta)
        del delta
    if consensus is None:
        merged = sum_merge_(deltas, weights, normalize)
    else:
        merged = disjoint_merge_(deltas, weights, normalize, consensus, scratch)
    if lambda_ != 1:
        merged.mul_(lambda_)
    return merged.add_(_as_float32(base, scratch))


# --- the methods -------------------------------------------------------------------------------


@merge_method("task_arithmetic", reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(
    tensors: list[Tensor],
    *,
    base: Tensor,
    weight: list[float],
    density: Density = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> Tensor:
    """Add the weighted task vectors to the base: θ_base + λ Σ wᵢ (θᵢ − θ_base).

    With ``normalize`` the sum is divided by ``Σ wᵢ``. Ilharco et al., "Editing Models with Task
    Arithmetic", ICLR 2023 (arXiv:2212.04089). ``density``, ``rescale`` and ``int8_mask`` are
    accepted for mergekit compatibility and, as there, have no effect.

    Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a LoRA
    expert does not touch) give the base exactly, whatever the weights; one model gives the base
    plus its weighted task vector. With ``normalize``, weights summing to less than 1e-8 in
    magnitude are not divided by (mergekit's guard).
    """
    weights = per_model(weight, len(tensors), "weight")
    return generalized_task_arithmetic(tensors, base, weights, None, None, normalize, lambda_)


@merge_method("ties", reference=TIES_PAPER)
def ties(
    tensors: list[Tensor],
    *,
    base: Tensor,
    weight: list[float],
    density: Density = 1.0,
    consensus: Consensus = "sum",
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> Tensor:
    """TIES: trim task vectors to their largest entries, elect a sign, merge the agreeing entries.

    ``δᵢ ← wᵢ · trim(θᵢ − θ_base)`` keeping the ``max(1, ⌊densityᵢ·n⌋)`` largest ``|δ|``;
    elected sign ``s = sign(Σ δᵢ)`` (``consensus: count``: the majority of signs);
    ``θ = θ_base + λ Σ aᵢδᵢ / Σ aᵢwᵢ`` with ``aᵢ = [sign δᵢ = s]`` (no division without
    ``normalize``). ``rescale`` restores each trimmed vector's L1 norm. ``int8_mask`` is accepted
    for mergekit compatibility (masks are always one byte here).
    Yadav et al., "TIES-Merging", NeurIPS 2023 (arXiv:2306.01708).

    Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a LoRA
    expert does not touch) give the base exactly, whatever the weights and densities; one model
    gives the base plus its trimmed, weighted task vector. An entry where no model agrees with the
    elected sign (or every task vector is zero) stays at the base; a sign tie elects +1.
    """
    weights = per_model(weight, len(tensors), "weight")
    densities = per_model(density, len(tensors), "density")

    def sparsify(delta: Tensor, index: int, scratch: Tensor) -> Tensor:
        return magnitude_prune_(delta, densities[index], rescale, scratch)

    return generalized_task_arithmetic(
        tensors, base, weights, sparsify, consensus, normalize, lambda_
    )


def _dare(
    tensors: list[Tensor],
    base: Tensor,
    weight: list[float],
    density: list[float],
    consensus: Consensus | None,
    normalize: bool,
    rescale: bool,
    rescale_mode: RescaleMode,
    lambda_: float,
    generator: torch.Generator | None,
) -> Tensor:
    weights = per_model(weight, len(tensors), "weight")
    densities = per_model(density, len(tensors), "density")

    def sparsify(delta: Tensor, index: int, scratch: Tensor) -> Tensor:
        return dare_drop_(delta, densities[index], rescale, rescale_mode, generator, scratch)

    return generalized_task_arithmetic(
        tensors, base, weights, sparsify, consensus, normalize, lambda_
    )


@merge_method("dare_linear", reference=DARE_PAPER)
def dare_linear(
    tensors: list[Tensor],
    *,
    base: Tensor,
    weight: list[float],
    density: Density = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE: randomly drop task-vector entries, rescale the rest, add the weighted sum to the base.

    ``δᵢ ← wᵢ · (mᵢ ⊙ (θᵢ − θ_base)) · cᵢ`` with ``mᵢ ~ Bernoulli(densityᵢ)``;
    ``θ = θ_base + λ Σ δᵢ`` (divided by ``Σ wᵢ`` with ``normalize``).
    ``rescale`` sets ``cᵢ``: with ``rescale_mode: l1`` (mergekit's behaviour, the default)
    ``cᵢ = ‖δᵢ‖₁ / ‖mᵢ ⊙ δᵢ‖₁``; with ``rescale_mode: inverse_density`` the paper's
    ``cᵢ = 1 / densityᵢ``. Without ``rescale``, ``cᵢ = 1``.
    Yu et al., "Language Models are Super Mario", ICML 2024 (arXiv:2311.03099).

    Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a LoRA
    expert does not touch) give the base exactly, whatever the weights and densities; one model
    gives the base plus its randomly dropped, rescaled task vector. A task vector whose L1 norm is
    below 1e-7 before or after the drop is not rescaled (no division by zero).
    """
    return _dare(
        tensors, base, weight, density, None, normalize, rescale, rescale_mode, lambda_, generator
    )


@merge_method("dare_ties", reference=DARE_PAPER)
def dare_ties(
    tensors: list[Tensor],
    *,
    base: Tensor,
    weight: list[float],
    density: Density = 1.0,
    consensus: Consensus = "sum",
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE-TIES: DARE's random drop and rescale, then TIES' sign election and disjoint merge.

    Sparsify as ``dare_linear`` (``rescale_mode: l1`` mergekit's L1-norm ratio, the default, or
    ``inverse_density`` the paper's ``1/density``), then merge as ``ties``:
    ``θ = θ_base + λ Σ aᵢδᵢ`` (divided by ``Σ aᵢwᵢ`` with ``normalize``).
    Yu et al., arXiv:2311.03099; Yadav et al., arXiv:2306.01708.

    Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a LoRA
    expert does not touch) give the base exactly, whatever the weights and densities; one model
    gives the base plus its randomly dropped, rescaled task vector. No rescale divides by a norm
    below 1e-7; where no model agrees with the elected sign the entry stays at the base.
    """
    return _dare(
        tensors,
        base,
        weight,
        density,
        consensus,
        normalize,
        rescale,
        rescale_mode,
        lambda_,
        generator,
    )


def _breadcrumbs(
    tensors: list[Tensor],
    base: Tensor,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    consensus: Consensus | None,
    normalize: bool,
    rescale: bool,
    lambda_: float,
) -> Tensor:
    weights = per_model(weight, len(tensors), "weight")
    densities = per_model(density, len(tensors), "density")
    gammas = per_model(gamma, len(tensors), "gamma")

    def sparsify(delta: Tensor, index: int, scratch: Tensor) -> Tensor:
        return magnitude_outliers_prune_(delta, densities[index], gammas[index], rescale, scratch)

    return generalized_task_arithmetic(
        tensors, base, weights, sparsify, consensus, normalize, lambda_
    )


@merge_method("breadcrumbs", reference=BREADCRUMBS_PAPER)
def breadcrumbs(
    tensors: list[Tensor],
    *,
    base: Tensor,
    weight: list[float],
    density: Density = 1.0,
    gamma: Annotated[list[float], Range(ge=0, le=1)] = 0.01,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> Tensor:
    """Model Breadcrumbs: drop task-vector outliers and small entries, add the weighted sum.

    Each ``θᵢ − θ_base`` loses its ``⌊γᵢn⌋`` largest entries and then its smallest, keeping
    ``⌊densityᵢ·n⌋`` (see ``magnitude_outliers_mask``); ``θ = θ_base + λ Σ wᵢδᵢ`` (divided by
    ``Σ wᵢ`` with ``normalize``); ``rescale`` restores each vector's L1 norm. A density of 1
    keeps everything, outliers included (as in mergekit).
    Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024 (arXiv:2312.06795).

    Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a LoRA
    expert does not touch) give the base exactly, whatever the weights and densities; one model
    gives the base plus its trimmed task vector. Equal magnitudes at a cut are broken by index, so
    zero entries never make the kept count exceed ``density·n``.
    """
    return _breadcrumbs(tensors, base, weight, density, gamma, None, normalize, rescale, lambda_)


@merge_method("breadcrumbs_ties", reference=BREADCRUMBS_PAPER)
def breadcrumbs_ties(
    tensors: list[Tensor],
    *,
    base: Tensor,
    weight: list[float],
    density: Density = 1.0,
    gamma: Annotated[list[float], Range(ge=0, le=1)] = 0.01,
    consensus: Consensus = "sum",
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> Tensor:
    """Model Breadcrumbs trim followed by TIES' sign election and disjoint merge.

    Sparsify as ``breadcrumbs``, merge as ``ties``: ``θ = θ_base + λ Σ aᵢδᵢ`` (divided by
    ``Σ aᵢwᵢ`` with ``normalize``). arXiv:2312.06795; arXiv:2306.01708.

    Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a LoRA
    expert does not touch) give the base exactly, whatever the weights and densities; one model
    gives the base plus its trimmed task vector. Where no model agrees with the elected sign the
    entry stays at the base.
    """
    return _breadcrumbs(
        tensors, base, weight, density, gamma, consensus, normalize, rescale, lambda_
    )


def _della(
    tensors: list[Tensor],
    base: Tensor,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    consensus: Consensus | None,
    normalize: bool,
    rescale: bool,
    rescale_mode: RescaleMode,
    lambda_: float,
    generator: torch.Generator | None,
) -> Tensor:
    weights = per_model(weight, len(tensors), "weight")
    densities = per_model(density, len(tensors), "density")
    epsilons = per_model(epsilon, len(tensors), "epsilon")

    def sparsify(delta: Tensor, index: int, scratch: Tensor) -> Tensor:
        return della_drop_(
            delta, densities[index], epsilons[index], rescale, rescale_mode, generator, scratch
        )

    return generalized_task_arithmetic(
        tensors, base, weights, sparsify, consensus, normalize, lambda_
    )


@merge_method("della", reference=DELLA_PAPER)
def della(
    tensors: list[Tensor],
    *,
    base: Tensor,
    weight: list[float],
    density: Density = 1.0,
    epsilon: Annotated[list[float], Range(ge=0, lt=1)] = 0.15,
    consensus: Consensus = "sum",
    normalize: bool = True,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA: drop entries at random, large ones less often (MagPrune), then TIES-merge.

    Entry ``j`` of ``θᵢ − θ_base`` is kept with probability ``densityᵢ − εᵢ + 2εᵢ·rank_j/(m−1)``
    (rank of ``|δ|`` within its row, see ``della_keep_probabilities``); ``rescale`` with
    ``rescale_mode: l1`` (mergekit, the default) restores the L1 norm, ``inverse_density`` divides
    each kept entry by its keep probability (the paper). Then merge as ``ties``. Needs
    ``0 < density ± epsilon < 1`` when ``density < 1``.
    Deep et al., "DELLA-Merging", arXiv:2406.11617.

    Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a LoRA
    expert does not touch) give the base exactly, whatever the weights and densities; one model
    gives the base plus its randomly dropped task vector. A row of one entry keeps with probability
    ``density − ε``; ``density ± ε`` outside (0, 1) is an error that names both values.
    """
    return _della(
        tensors,
        base,
        weight,
        density,
        epsilon,
        consensus,
        normalize,
        rescale,
        rescale_mode,
        lambda_,
        generator,
    )


@merge_method("della_linear", reference=DELLA_PAPER)
def della_linear(
    tensors: list[Tensor],
    *,
    base: Tensor,
    weight: list[float],
    density: Density = 1.0,
    epsilon: Annotated[list[float], Range(ge=0, lt=1)] = 0.15,
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DELLA's MagPrune drop followed by a plain weighted sum of the task vectors.

    Sparsify as ``della``; ``θ = θ_base + λ Σ wᵢδᵢ`` (divided by ``Σ wᵢ`` with ``normalize``).
    Deep et al., "DELLA-Merging", arXiv:2406.11617.

    Degenerate cases: task vectors that are all zero (models equal to the base, the tensors a LoRA
    expert does not touch) give the base exactly, whatever the weights and densities; one model
    gives the base plus its randomly dropped task vector. ``density ± ε`` outside (0, 1) is an error
    that names both values.
    """
    return _della(
        tensors,
        base,
        weight,
        density,
        epsilon,
        None,
        normalize,
        rescale,
        rescale_mode,
        lambda_,
        generator,
    )
