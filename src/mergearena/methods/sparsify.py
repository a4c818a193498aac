"""Sparsification of task vectors: TIES's magnitude trim, breadcrumbs, DARE's and DELLA's drops.

Each step comes twice: as a whole-tensor function that prunes a float32 ``δ`` in place
(``magnitude_prune_``, ``random_drop_``, ...: the math, plain) and as a ``*_pruning`` builder
that scans a streamed ``TaskVector`` for what it needs of the whole tensor (a magnitude cut, an
L1 norm) and returns the ``Prune`` that applies it to one block (see ``task_vectors``).

DARE keeps each entry with probability ``density`` exactly (to 2⁻³², ``KeepStream``), from a
random stream of its own per model, seeded by the method's generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mergearena.methods.selection import (
    keep_largest_,
    keep_range_,
    keep_rank_range_,
    keep_top_,
    largest_cut,
    largest_mask,
    rank_range_cut,
)
from mergearena.methods.task_vectors import TaskVector, block_spans, float32_buffer, l1_norm

RescaleMode = Literal["l1", "inverse_density"]
Prune = Callable[[Tensor, int, Tensor], Tensor]
"""``(δ block, its start in the flattened tensor, scratch block) -> pruned block``, in place."""

_RESCALE_EPS = 1e-7  # mergekit's: below this L1 norm (before or after) no rescaling happens
_RANDOM_CHUNK = 1 << 16  # random words drawn at a time on a CPU (bounds NumPy's fresh memory)
_SORT_CHUNK = 1 << 20  # entries DELLA argsorts at a time (bounds the sort's index memory)


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
    start, stop = _outlier_ranks(delta.numel(), density, gamma)
    l1_before = l1_norm(delta, scratch) if rescale else 0.0
    keep_rank_range_(delta, start, stop, scratch)
    return rescale_l1_(delta, l1_before, scratch) if rescale else delta


def _outlier_ranks(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """The ascending ranks ``[b, b + ⌊density·n⌋)`` breadcrumbs keeps."""
    keep_count = int(density * numel)
    bottom_count = max(0, numel - keep_count - int(gamma * numel))
    return bottom_count, bottom_count + keep_count


def _zero(delta: Tensor, start: int, scratch: Tensor) -> Tensor:
    """The Prune that keeps nothing."""
    return delta.zero_()


def _precomputed(pruned: Tensor) -> Prune:
    """The Prune that replaces each block by the same entries of an already pruned task vector."""
    flat = pruned.view(-1)

    def prune(delta: Tensor, start: int, scratch: Tensor) -> Tensor:
        return delta.copy_(flat[start : start + delta.numel()])

    return prune


def magnitude_pruning(vector: TaskVector, density: float, rescale: bool) -> Prune | None:
    """``magnitude_prune_`` (the TIES trim) of ``vector``, as a Prune for its blocks.

    One scan finds the cut (``largest_cut``); each block then keeps its entries above it. On a
    GPU, where the task vector is one block, ``largest_mask`` cuts it without a host sync. With
    ``rescale`` the L1 norms are whole-tensor sums, so the task vector is pruned whole.
    """
    numel = vector.numel
    if density >= 1:
        return None
    if density <= 0 or numel == 0:
        return _zero
    if rescale:
        return _precomputed(magnitude_prune_(vector.whole(), density, rescale=True))
    count = max(1, int(density * numel))
    if count >= numel:
        return None
    if vector.device.type != "cpu":  # one block, the whole task vector: cut it there

        def prune_whole(delta: Tensor, start: int, scratch: Tensor) -> Tensor:
            return delta.mul_(largest_mask(torch.abs(delta, out=scratch), count))

        return prune_whole
    cut = largest_cut(vector, count)

    def prune(delta: Tensor, start: int, scratch: Tensor) -> Tensor:
        return delta.mul_(keep_top_(torch.abs(delta, out=scratch), start, cut.value, cut.split))

    return prune


def magnitude_outliers_pruning(
    vector: TaskVector, density: float, gamma: float, rescale: bool
) -> Prune | None:
    """``magnitude_outliers_prune_`` (the breadcrumbs trim) of ``vector``, as a Prune."""
    numel = vector.numel
    if density >= 1:
        return None
    if rescale:
        return _precomputed(magnitude_outliers_prune_(vector.whole(), density, gamma, True))
    first, stop = _outlier_ranks(numel, density, gamma)
    if stop <= first:
        return _zero
    if first == 0 and stop == numel:
        return None
    cut = rank_range_cut(vector, first, stop)

    def prune(delta: Tensor, start: int, scratch: Tensor) -> Tensor:
        return keep_range_(delta, start, cut, scratch)

    return prune


class KeepStream:
    """Independent Bernoulli(``p``) keep decisions for consecutive entries.

    With ``t = round(p · 2³²)`` split as ``t = 2¹⁶·high + low``, entry ``j`` is kept when the
    ``j``-th 16-bit word ``u`` of a private random stream is below ``high``, or equals it and the
    top 16 bits of the next 64-bit word of a second stream (drawn only for such ties, in entry
    order) are below ``low``: with probability ``t / 2³²``, within 2⁻³³ of ``p``, independently
    of every other entry. Four decisions per 64-bit word: the random words were DARE's largest
    cost on a CPU. The streams are seeded by two 63-bit words drawn from ``generator`` (on its
    device) when the ``KeepStream`` is made, so a seed gives the same decisions wherever the
    tensor lives and whatever the block sizes (counts of entries that are multiples of 4). For a
    CPU generator the words come from NumPy's SFC64 (2× faster than torch's Mersenne twister;
    NumPy keeps its bit streams fixed across versions); elsewhere entry ``j`` is kept when the
    ``j``-th 32-bit word of a torch generator on the generator's device is below ``t``.
    """

    def __init__(self, keep_probability: float, generator: torch.Generator | None) -> None:
        self.threshold = round(keep_probability * 2**32)
        self.device = generator.device if generator is not None else torch.device("cpu")
        seed = torch.empty(2, dtype=torch.int64, device=self.device).random_(generator=generator)
        first, second = seed.tolist()
        self._words: np.random.SFC64 | torch.Generator
        if self.device.type == "cpu":
            self._words = np.random.SFC64([first, second])
            self._ties = np.random.SFC64([first, second, 1])
            self._high = np.uint16(self.threshold >> 16)
            self._low = self.threshold & 0xFFFF
        else:
            self._words = torch.Generator(self.device).manual_seed(first ^ second)

    def _draw(self, out: np.ndarray) -> np.ndarray:
        """The next ``out.size`` decisions from the SFC64 streams, into the bool array ``out``."""
        assert isinstance(self._words, np.random.SFC64)
        count = out.size
        for start in range(0, count, _RANDOM_CHUNK):  # small draws reuse their memory
            stop = min(start + _RANDOM_CHUNK, count)
            lanes = self._words.random_raw((stop - start + 3) // 4).view(np.uint16)
            lanes = lanes[: stop - start]
            np.less(lanes, self._high, out=out[start:stop])
            if self._low:
                ties = np.flatnonzero(lanes == self._high)
                if ties.size:
                    extra = self._ties.random_raw(ties.size) >> np.uint64(48)
                    out[start + ties] = extra < self._low
        return out

    def next_(self, flags: Tensor) -> Tensor:
        """The next ``flags.numel()`` decisions, written into ``flags`` (uint8) as 1 or 0."""
        count = flags.numel()
        if self.threshold >= 2**32 or self.threshold <= 0:
            return flags.fill_(1 if self.threshold > 0 else 0)
        if isinstance(self._words, np.random.SFC64) and flags.device.type == "cpu":
            self._draw(flags.numpy().view(np.bool_))
            return flags
        if isinstance(self._words, np.random.SFC64):
            kept = torch.from_numpy(self._draw(np.empty(count, dtype=np.bool_)))
        else:
            words = torch.empty((count + 1) // 2, dtype=torch.int64, device=self.device)
            words.random_(-(2**63), 2**63 - 1, generator=self._words)
            kept = words.view(torch.int32)[:count] < self.threshold - 2**31
        return flags.copy_(kept)


def bernoulli_mask(
    delta: Tensor,
    keep_probability: float | Tensor,
    generator: torch.Generator | None,
    scratch: Tensor | None = None,
) -> Tensor:
    """A 0/1 mask like ``δ``: each entry is 1 with probability ``p`` (a number or a tensor).

    A number: ``KeepStream``'s decisions (a bool mask; DARE's drop draws the same ones). A
    tensor: ``u < p`` with ``u ~ U[0, 1)`` drawn on the generator's device (a float mask). Either
    way a seed gives the same mask wherever the tensor lives. DARE's drop step: Yu et al.,
    "Language Models are Super Mario", ICML 2024 (arXiv:2311.03099).
    """
    if not isinstance(keep_probability, Tensor):
        flags = torch.empty(delta.numel(), dtype=torch.uint8, device=delta.device)
        KeepStream(float(keep_probability), generator).next_(flags)
        return flags.view(torch.bool).view(delta.shape)
    device = generator.device if generator is not None else delta.device
    uniform = float32_buffer(delta, scratch)
    if uniform.device == device:
        torch.rand(delta.shape, generator=generator, out=uniform)
    else:
        uniform.copy_(torch.rand(delta.shape, generator=generator, device=device))
    return uniform.lt_(keep_probability)


def dare_pruning(
    vector: TaskVector,
    density: float,
    rescale: bool,
    rescale_mode: RescaleMode,
    generator: torch.Generator | None,
) -> Prune | None:
    """DARE's drop of ``vector`` as a Prune: ``δ ⊙ m`` with ``m`` from a ``KeepStream(density)``.

    ``rescale_mode="l1"`` (mergekit): times ``‖δ‖₁ / ‖δ ⊙ m‖₁``, both found by a first scan (sums
    of float32 block sums, accumulated in float64; no rescale when either is below 1e-7), which
    also stores ``m`` (one byte an entry) for the blocks. ``"inverse_density"`` (the paper):
    divided by ``density``, so that ``E[δ ⊙ m / p] = δ``.
    """
    if density >= 1:
        return None
    if density <= 0:
        return _zero
    stream = KeepStream(density, generator)
    if not (rescale and rescale_mode == "l1"):
        (flags,) = vector.blocks.flags(1)

        def drop(delta: Tensor, start: int, scratch: Tensor) -> Tensor:
            delta.mul_(scratch.copy_(stream.next_(flags[: delta.numel()])))
            return delta.div_(density) if rescale else delta

        return drop
    kept = torch.empty(vector.numel, dtype=torch.uint8, device=vector.device)
    l1_before = l1_after = 0.0
    out, mask = vector.blocks.floats(2)
    for start, stop in block_spans(vector.numel, vector.device):
        magnitudes = vector.magnitudes(start, stop, out[: stop - start], mask[: stop - start])
        l1_before += float(magnitudes.sum())
        stream.next_(kept[start:stop])
        l1_after += float(magnitudes.mul_(mask[: stop - start].copy_(kept[start:stop])).sum())
    scale = 1.0
    if l1_before >= _RESCALE_EPS and l1_after >= _RESCALE_EPS:
        scale = l1_before / l1_after

    def drop_and_rescale(delta: Tensor, start: int, scratch: Tensor) -> Tensor:
        delta.mul_(scratch.copy_(kept[start : start + delta.numel()]))
        return delta.mul_(scale) if scale != 1 else delta

    return drop_and_rescale


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
    magnitudes = torch.abs(delta, out=float32_buffer(delta, scratch))
    rows = magnitudes.movedim(1, -1) if delta.dim() >= 2 else magnitudes.unsqueeze(0)
    moved_shape, length = rows.shape, rows.shape[-1]
    rows = rows.reshape(-1, length)
    ramp = torch.arange(length, dtype=torch.float32, device=delta.device)
    ramp.mul_(2 * epsilon / max(length - 1, 1)).add_(density - epsilon)
    probabilities = torch.empty_like(rows)
    step = max(1, _SORT_CHUNK // length)
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


def della_pruning(
    vector: TaskVector,
    density: float,
    epsilon: float,
    rescale: bool,
    rescale_mode: RescaleMode,
    generator: torch.Generator | None,
) -> Prune | None:
    """``della_drop_`` of ``vector`` as a Prune. Its keep probabilities rank ``|δ|`` within rows
    and its L1 rescale is a whole-tensor sum, so the task vector is pruned whole."""
    if density >= 1:
        return None
    return _precomputed(
        della_drop_(vector.whole(), density, epsilon, rescale, rescale_mode, generator)
    )
