"""Exact order statistics of ``|δ|`` without sorting: the cuts of the magnitude trims.

Magnitude trims need the k-th largest ``|δ|``. mergekit sorts every tensor (O(n log n));
``magnitude_ranks`` brackets the rank between two magnitudes of a strided sample and collects the
few entries inside the bracket in one O(n) scan (radix selection on the float bits when a bracket
misses). Ties at a cut are broken by index as a stable sort would, so the kept set is mergekit's
wherever magnitudes are distinct. The scans read a ``TaskVector`` block by block (or a given
tensor, ``_Magnitudes``), so no whole-tensor ``|δ|`` is ever made.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from mergearena.methods.task_vectors import Blocks, TaskVector, block_spans, float32_buffer


class _Magnitudes:
    """``|δ|`` of a given float32 tensor ``δ``, read like a ``TaskVector`` (``magnitude_ranks``)."""

    def __init__(self, delta: Tensor) -> None:
        self.flat = delta.view(-1)
        self.numel = self.flat.numel()
        self.device = self.flat.device
        self.blocks = Blocks(self.numel, self.device)

    def magnitudes(self, start: int, stop: int, out: Tensor, scratch: Tensor) -> Tensor:
        return torch.abs(self.flat[start:stop], out=out)

    def strided_magnitudes(self, step: int) -> Tensor:
        return self.flat[::step].abs()


MagnitudeSource = TaskVector | _Magnitudes


class MagnitudeRank(NamedTuple):
    """The magnitude at one ascending rank of ``|δ|``, how many entries lie below and at it, and
    where those at it are, when the scan that found it saw: their flat indices (ascending), or
    how many there are in each block (of ``block_spans``)."""

    value: float
    below: int  # entries with a smaller magnitude
    equal: int  # entries with exactly this magnitude (ties)
    ties: Tensor | None = None
    ties_per_block: list[int] | None = None


_SAMPLE_EVERY = 64  # one entry in this many is sampled to bracket a rank...
_SAMPLE = 1 << 16  # ...but at most this many
_MIN_SAMPLE = 1 << 10  # smaller samples are not worth sorting: the tensor is collected whole
_SIGMAS = 4.0  # a bracket spans the sample quantile ± this many standard deviations
_COLLECT_FRACTION = 8  # a bracket collects at most numel / 8 entries (at least _SAMPLE)


def magnitude_ranks(source: MagnitudeSource, ranks: Sequence[int]) -> list[MagnitudeRank]:
    """The ``rank``-th smallest (0-based) ``|δ|`` for each rank, exactly, in one scan of ``source``.

    Each rank is bracketed between two magnitudes of a strided sample (about n / 64 of them, at
    most ``_SAMPLE``), ``low ≤ high``, ±4 standard deviations of the sample quantile around it
    (under 2% of the entries with the largest sample); the scan counts the entries below ``low``
    and collects the indices and magnitudes of those in ``[low, high]``, among which the rank and
    all its ties lie. Tensors of fewer than 65,536 entries are collected whole. If a bracket
    misses the rank (an unrepresentative sample) or holds more than an eighth of the entries (a
    heavily tied magnitude other than its only one), that rank falls back to ``_radix_rank``.
    Cost: one O(n) scan, against the O(n log n) sort of mergekit.
    """
    brackets = _brackets(source, ranks)
    scans = _scan_brackets(source, brackets)
    results = []
    for rank, (low, high), scan in zip(ranks, brackets, scans, strict=True):
        if not scan.below <= rank < scan.below + sum(scan.inside):
            results.append(_radix_rank(source, rank))
        elif low == high:  # one magnitude, all ties: their counts per block locate them
            results.append(MagnitudeRank(low, scan.below, sum(scan.inside), None, scan.inside))
        elif scan.values is not None and scan.indices is not None:
            results.append(_rank_among(scan.values, scan.indices, scan.below, rank))
        else:
            results.append(_radix_rank(source, rank))
    return results


def _brackets(source: MagnitudeSource, ranks: Sequence[int]) -> list[tuple[float, float]]:
    """``(low, high)`` magnitudes that probably enclose each rank (see ``magnitude_ranks``)."""
    numel = source.numel
    if numel < _SAMPLE_EVERY * _MIN_SAMPLE:
        return [(0.0, math.inf)] * len(ranks)
    step = (numel // min(_SAMPLE, numel // _SAMPLE_EVERY)) | 1  # odd: no aliasing with rows
    sample = np.sort(source.strided_magnitudes(step).cpu().numpy())
    size = sample.size
    brackets = []
    for rank in ranks:
        quantile = (rank + 0.5) / numel
        margin = _SIGMAS * math.sqrt(size * quantile * (1 - quantile)) + 1
        first = math.floor(quantile * size - margin)
        last = math.ceil(quantile * size + margin)
        low = float(sample[first]) if first >= 0 else 0.0
        brackets.append((low, float(sample[last]) if last < size else math.inf))
    return brackets


class _BracketScan(NamedTuple):
    """What one scan saw of a bracket ``[low, high]``: the entries below ``low`` (a count), those
    inside (a count per block), and the flat indices (ascending) and magnitudes of those inside
    when they were collected (not for ``low == high``, nor beyond ``_COLLECT_FRACTION``)."""

    below: int
    inside: list[int]
    indices: np.ndarray | None
    values: np.ndarray | None


def _scan_brackets(
    source: MagnitudeSource, brackets: list[tuple[float, float]]
) -> list[_BracketScan]:
    """One scan of ``source`` for every bracket ``(low, high)`` (see ``_BracketScan``)."""
    numel, device = source.numel, source.device
    limit = max(_SAMPLE, numel // _COLLECT_FRACTION)
    below = [0] * len(brackets)
    inside: list[list[int]] = [[] for _ in brackets]
    found: list[list[tuple[np.ndarray, np.ndarray]] | None] = [
        None if low == high else [] for low, high in brackets
    ]
    out, scratch = source.blocks.floats(2)
    flags = source.blocks.flags(2)
    for start, stop in block_spans(numel, device):
        size = stop - start
        magnitudes = source.magnitudes(start, stop, out[:size], scratch[:size])
        for index, (low, high) in enumerate(brackets):
            collected = found[index]
            count_below, count_inside, where, values = _bracket_block(
                magnitudes, low, high, [flag[:size] for flag in flags], collected is not None
            )
            below[index] += count_below
            inside[index].append(count_inside)
            if collected is not None and where is not None and values is not None:
                collected.append((where + start, values))
                if sum(inside[index]) > limit:
                    found[index] = None  # a heavily tied magnitude: count, stop collecting
    results = []
    for count_below, counts, collected in zip(below, inside, found, strict=True):
        if collected is None:
            results.append(_BracketScan(count_below, counts, None, None))
            continue
        indices = np.concatenate([where for where, _ in collected] or [np.empty(0, np.int64)])
        values = np.concatenate([value for _, value in collected] or [np.empty(0, np.float32)])
        results.append(_BracketScan(count_below, counts, indices, values))
    return results


def _bracket_block(
    magnitudes: Tensor, low: float, high: float, flags: list[Tensor], collect: bool
) -> tuple[int, int, np.ndarray | None, np.ndarray | None]:
    """In one block: the count of entries below ``low``, of those in ``[low, high]`` and, if
    ``collect``, their positions in the block (ascending) and magnitudes; ``flags``: two uint8
    buffers like the block. On a CPU through NumPy, whose comparisons and ``flatnonzero`` are 3-6×
    faster than torch's boolean kernels there."""
    if magnitudes.device.type == "cpu":
        values = magnitudes.numpy()
        low32, high32 = np.float32(low), np.float32(high)
        under, inside = (flag.numpy().view(np.bool_) for flag in flags)
        np.less(values, low32, out=under)
        np.less_equal(values, high32, out=inside)
        np.greater(inside, under, out=inside)  # in [low, high]: ≤ high and not < low
        if not collect:
            return int(np.count_nonzero(under)), int(np.count_nonzero(inside)), None, None
        where = np.flatnonzero(inside)
        return int(np.count_nonzero(under)), where.size, where, values[where]
    count_below = int(torch.count_nonzero(magnitudes < low))
    inside_mask = (magnitudes >= low) & (magnitudes <= high)
    if not collect:
        return count_below, int(torch.count_nonzero(inside_mask)), None, None
    where_tensor = inside_mask.nonzero().view(-1)
    where = where_tensor.cpu().numpy()
    return count_below, where.size, where, magnitudes[where_tensor].cpu().numpy()


def _rank_among(values: np.ndarray, indices: np.ndarray, below: int, rank: int) -> MagnitudeRank:
    """The rank among collected candidates (``below`` entries lie under all of them)."""
    value = np.float32(torch.kthvalue(torch.from_numpy(values), rank - below + 1).values)
    smaller = int(np.count_nonzero(values < value))
    ties = torch.from_numpy(indices[values == value])
    return MagnitudeRank(float(value), below + smaller, ties.numel(), ties)


def _halves(block: Tensor) -> tuple[Tensor, Tensor]:
    """The high and low 16 bits of each float32 of ``block``, as strided int16 views."""
    halves = block.view(torch.int16)
    if sys.byteorder == "little":
        return halves[1::2], halves[0::2]
    return halves[0::2], halves[1::2]


def _radix_rank(source: MagnitudeSource, rank: int) -> MagnitudeRank:
    """The ``rank``-th smallest ``|δ|`` by radix selection: two scans, no sample, any data.

    The bit patterns of non-negative floats are ordered like the numbers (NaN above infinity): a
    histogram of the top 15 bits (the sign is 0) finds the bucket holding the rank, a histogram of
    the low 16 bits of that bucket's entries finds the exact value.
    """
    numel, device = source.numel, source.device
    out, scratch = source.blocks.floats(2)
    spans = block_spans(numel, device)
    high_counts = torch.zeros(1 << 15, dtype=torch.int64, device=device)
    for start, stop in spans:
        block = source.magnitudes(start, stop, out[: stop - start], scratch[: stop - start])
        high_counts += torch.bincount(_halves(block)[0], minlength=1 << 15)
    cumulative = high_counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, rank + 1))
    before = int(cumulative[bucket] - high_counts[bucket])
    low_counts = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for start, stop in spans:
        block = source.magnitudes(start, stop, out[: stop - start], scratch[: stop - start])
        high, low = _halves(block)
        selected = low[high == bucket].to(torch.int32).bitwise_and_(0xFFFF)
        low_counts += torch.bincount(selected, minlength=1 << 16)
    cumulative = low_counts.cumsum(0)
    low_bits = int(torch.searchsorted(cumulative, rank + 1 - before))
    below = before + int(cumulative[low_bits] - low_counts[low_bits])
    bits = torch.tensor([(bucket << 16) | low_bits], dtype=torch.int32)
    return MagnitudeRank(float(bits.view(torch.float32)), below, int(low_counts[low_bits]))


def _tie_split(source: MagnitudeSource, rank: MagnitudeRank, count: int) -> int:
    """One past the flat index of the ``count``-th (1-based) entry whose magnitude is
    ``rank.value``, in index order: 0 for none of them, ``numel`` for all."""
    if count <= 0:
        return 0
    if count >= rank.equal:
        return source.numel
    if rank.ties is not None:
        return int(rank.ties[count - 1]) + 1
    out, scratch = source.blocks.floats(2)
    seen = 0
    for index, (start, stop) in enumerate(block_spans(source.numel, source.device)):
        if rank.ties_per_block is not None and seen + rank.ties_per_block[index] < count:
            seen += rank.ties_per_block[index]  # not in this block: skip reading it
            continue
        block = source.magnitudes(start, stop, out[: stop - start], scratch[: stop - start])
        matches = (block == rank.value).nonzero().view(-1)
        if seen + matches.numel() >= count:
            return start + int(matches[count - seen - 1]) + 1
        seen += matches.numel()
    raise ValueError(f"fewer than {count} entries have magnitude {rank.value}")


def _split_at(split: int, start: int, length: int) -> int:
    """Where flat index ``split`` falls in the block ``[start, start + length)``, clamped."""
    return min(max(split - start, 0), length)


def keep_top_(magnitudes: Tensor, start: int, value: float, split: int) -> Tensor:
    """In place on a block of ``|δ|`` starting at flat index ``start``: 1.0 where ``|δ| > value``,
    or ``|δ| = value`` at a flat index below ``split``; else 0.0."""
    cut = _split_at(split, start, magnitudes.numel())
    magnitudes[:cut].ge_(value)
    magnitudes[cut:].gt_(value)
    return magnitudes


def _keep_from_(magnitudes: Tensor, start: int, value: float, split: int) -> Tensor:
    """In place: 1.0 where ``|δ| > value``, or ``|δ| = value`` at a flat index ``≥ split``."""
    cut = _split_at(split, start, magnitudes.numel())
    magnitudes[:cut].gt_(value)
    magnitudes[cut:].ge_(value)
    return magnitudes


def _keep_below_(magnitudes: Tensor, start: int, value: float, split: int) -> Tensor:
    """In place: 1.0 where ``|δ| < value``, or ``|δ| = value`` at a flat index below ``split``."""
    cut = _split_at(split, start, magnitudes.numel())
    magnitudes[:cut].le_(value)
    magnitudes[cut:].lt_(value)
    return magnitudes


class TopCut(NamedTuple):
    """Keep ``|δ| > value``, and of the entries at ``value`` those at a flat index below
    ``split``: the ``count`` largest magnitudes, ties to the lower index (``largest_cut``)."""

    value: float
    split: int


def largest_cut(source: MagnitudeSource, count: int) -> TopCut:
    """The cut that keeps exactly the ``count`` (1 ≤ count < n) largest ``|δ|``, of equal
    magnitudes at the cut the lower flat index first, as a stable descending sort would."""
    numel = source.numel
    rank = magnitude_ranks(source, [numel - count])[0]
    if rank.value == 0:  # the cut is at zero: keeping or dropping zeros changes nothing
        return TopCut(0.0, numel)
    keep_ties = count - (numel - rank.below - rank.equal)
    return TopCut(rank.value, _tie_split(source, rank, keep_ties))


class RangeCut(NamedTuple):
    """Keep ascending ranks ``[start, stop)`` of ``|δ|`` (stable: equal magnitudes by index):
    ``|δ|`` above ``low`` or at it from flat index ``low_split`` on, and below ``high`` or at it
    before flat index ``high_split`` (``rank_range_cut``)."""

    low: float
    low_split: int
    high: float
    high_split: int


def rank_range_cut(source: MagnitudeSource, start: int, stop: int) -> RangeCut:
    """The cut that keeps ascending magnitude ranks ``[start, stop)`` (0 ≤ start < stop ≤ n)."""
    low, high = magnitude_ranks(source, [start, stop - 1])
    # ties at the low cut hold ranks [low.below, low.below + low.equal): the first
    # start − low.below of them go; at the high cut the first stop − high.below of them stay
    return RangeCut(
        low.value,
        _tie_split(source, low, start - low.below),
        high.value,
        _tie_split(source, high, stop - high.below),
    )


def largest_mask(magnitudes: Tensor, count: int) -> Tensor:
    """The entries ``largest_cut`` keeps (1 ≤ count < n) of flat ``magnitudes``, as a bool mask
    computed where they live, with no value read back to the host: a GPU never waits. The
    ``count``-th largest by ``topk``, everything above it, and of its ties the first ones in
    index order (a running count) until ``count`` are kept."""
    value = torch.topk(magnitudes, count, sorted=False).values.min()
    keep = magnitudes > value
    ties = magnitudes == value
    wanted = count - keep.sum()
    return keep.logical_or_(ties.logical_and_(ties.cumsum(0) <= wanted))


def keep_largest_(delta: Tensor, count: int, scratch: Tensor | None = None) -> Tensor:
    """Zero all but the ``count`` largest-magnitude entries of ``delta`` (float32), in place.

    Exactly ``count`` entries survive; of equal magnitudes at the cut the lower flat index is
    kept, as in a stable descending sort.
    """
    flat = delta.view(-1)
    if count >= flat.numel():
        return delta
    if count <= 0:
        return delta.zero_()
    if flat.device.type != "cpu":
        flat.mul_(largest_mask(flat.abs(), count))
        return delta
    cut = largest_cut(_Magnitudes(flat), count)
    mask = torch.abs(flat, out=float32_buffer(flat, scratch))
    flat.mul_(keep_top_(mask, 0, cut.value, cut.split))
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
    cut = rank_range_cut(_Magnitudes(flat), start, stop)
    mask = float32_buffer(flat, scratch)
    keep_range_(flat, 0, cut, mask)
    return delta


def keep_range_(block: Tensor, start: int, cut: RangeCut, scratch: Tensor) -> Tensor:
    """Zero the entries of a δ block (flat index ``start`` on) outside ``cut``, in place."""
    block.mul_(_keep_from_(torch.abs(block, out=scratch), start, cut.low, cut.low_split))
    return block.mul_(_keep_below_(torch.abs(block, out=scratch), start, cut.high, cut.high_split))
