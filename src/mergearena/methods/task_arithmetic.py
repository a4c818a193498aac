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

Streaming: on a CPU, page-faulting a fresh whole-tensor float32 buffer costs several times the
arithmetic done in it, so ``generalized_task_arithmetic`` never makes one besides its result. A
sparsifier first scans its task vector, recomputed a block of ``_CHUNK`` entries at a time from
the inputs, for what it needs of the whole tensor (a magnitude cut, an L1 norm) and returns a
``Prune`` that applies it to one block; then every step runs a block at a time, in buffers that
stay in cache. A block goes through exactly the float32 operations the whole tensor would, so the
result does not depend on the block size: the deterministic methods give the same bits as a
whole-tensor computation, and as on a GPU, where a block is the whole tensor.

Magnitude trims need the k-th largest ``|δ|``. mergekit sorts every tensor (O(n log n));
``magnitude_ranks`` brackets the rank between two magnitudes of a strided sample and collects the
few entries inside the bracket in one O(n) scan (radix selection on the float bits when a bracket
misses). Ties at a cut are broken by index as a stable sort would, so the kept set is mergekit's
wherever magnitudes are distinct.

DARE keeps each entry with probability ``density`` exactly (to 2⁻³², ``KeepStream``), from a
random stream of its own per model, seeded by the method's generator.

Memory: the float32 result, DARE's keep decisions (a byte an entry per model) and a few blocks per
model, which a thread keeps from call to call (``Blocks``). DELLA and the ``rescale`` of magnitude
trims, whose L1 norms are whole-tensor sums (kept bit-exact), hold one float32 task vector per
model. The caller's tensors are never modified.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Annotated, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from mergearena.methods.linear import per_model
from mergearena.methods.registry import Range, merge_method

Consensus = Literal["sum", "count"]
RescaleMode = Literal["l1", "inverse_density"]
Density = Annotated[list[float], Range(ge=0, le=1)]
Prune = Callable[[Tensor, int, Tensor], Tensor]
"""``(δ block, its start in the flattened tensor, scratch block) -> pruned block``, in place."""
Sparsifier = Callable[["TaskVector", int], Prune | None]
"""``(task vector, model index) -> its Prune`` (``None``: keep everything), after any scan."""

TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"

_RESCALE_EPS = 1e-7  # mergekit's: below this L1 norm (before or after) no rescaling happens
_CHUNK = 1 << 20  # entries per block on a CPU: 4 MiB of float32, cache-resident between steps
_RANDOM_CHUNK = 1 << 16  # random words drawn at a time on a CPU (bounds NumPy's fresh memory)


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


def _spans(numel: int, device: torch.device) -> list[tuple[int, int]]:
    """``[start, stop)`` of each block of a flattened tensor: ``_CHUNK`` entries on a CPU, the
    whole tensor elsewhere (a GPU has the memory, and each block costs kernel launches)."""
    size = _CHUNK if device.type == "cpu" else max(numel, 1)
    return [(start, min(start + size, numel)) for start in range(0, numel, size)]


class Blocks:
    """Buffers of one block each (see ``_spans``), shared by every scan and the merge of a call.

    ``floats(k)`` gives k float32 buffers, ``flags(k)`` k uint8 ones, made on first request and
    the same ones after. Fresh memory is page-faulted in on first touch, which on a CPU costs more
    than the arithmetic done in it, and the allocator hands freed blocks back to the system: so
    on a CPU, ``Blocks.reused`` keeps one set of full-size (``_CHUNK``) buffers per thread from
    call to call, at most (models + 2) × 4 MiB plus 2 MiB.
    """

    _per_thread = threading.local()

    def __init__(self, numel: int, device: torch.device) -> None:
        self.size = min(numel, _CHUNK) if device.type == "cpu" else numel
        self.device = device
        self._made: dict[torch.dtype, list[Tensor]] = {torch.float32: [], torch.uint8: []}

    @classmethod
    def reused(cls, numel: int, device: torch.device) -> Blocks:
        """The calling thread's CPU buffers (one set, grown as needed), or new ones elsewhere."""
        if device.type != "cpu":
            return cls(numel, device)
        blocks = getattr(cls._per_thread, "blocks", None)
        if blocks is None or blocks.size != _CHUNK:
            blocks = cls._per_thread.blocks = cls(_CHUNK, device)
        return blocks

    def _take(self, dtype: torch.dtype, count: int) -> list[Tensor]:
        made = self._made[dtype]
        while len(made) < count:
            made.append(torch.empty(self.size, dtype=dtype, device=self.device))
        return made[:count]

    def floats(self, count: int) -> list[Tensor]:
        return self._take(torch.float32, count)

    def flags(self, count: int) -> list[Tensor]:
        return self._take(torch.uint8, count)


# --- 1. task vectors ---------------------------------------------------------------------------


def task_vector(tensor: Tensor, base: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``δ = θ − θ_base`` as a new float32 tensor (Ilharco et al., arXiv:2212.04089)."""
    if tensor.dtype == base.dtype == torch.float32:
        return torch.sub(tensor, base)
    delta = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device).copy_(tensor)
    return delta.sub_(_as_float32(base, scratch))


class TaskVector:
    """``δ = θ − θ_base`` of one model, flattened, computed a block at a time and never stored.

    Each entry gets ``task_vector``'s arithmetic (both sides in float32, then subtracted), so a
    block equals the same slice of ``task_vector(θ, θ_base)`` bit for bit.
    """

    def __init__(self, tensor: Tensor, base: Tensor, blocks: Blocks | None = None) -> None:
        self.shape = base.shape
        self.tensor = tensor.reshape(-1)
        self.base = base.reshape(-1)
        self.numel = self.base.numel()
        self.device = self.base.device
        self.blocks = blocks or Blocks(self.numel, self.device)  # shared by a call's vectors

    def block(self, start: int, stop: int, out: Tensor, base32: Tensor) -> Tensor:
        """Entries ``[start, stop)`` of δ, written into ``out``; ``base32`` holds the same entries
        of the base in float32."""
        theta = self.tensor[start:stop]
        if theta.dtype == torch.float32:
            return torch.sub(theta, base32, out=out)
        return out.copy_(theta).sub_(base32)

    def magnitudes(self, start: int, stop: int, out: Tensor, scratch: Tensor) -> Tensor:
        """``|δ|`` of entries ``[start, stop)`` in ``out`` (``scratch``: another block buffer)."""
        base32 = _as_float32(self.base[start:stop], scratch)
        return self.block(start, stop, out, base32).abs_()

    def strided_magnitudes(self, step: int) -> Tensor:
        """``|δ|`` of every ``step``-th entry, from the first."""
        return torch.sub(self.tensor[::step].float(), self.base[::step].float()).abs_()

    def whole(self) -> Tensor:
        """The whole task vector as a new float32 tensor, shaped like the base."""
        return task_vector(self.tensor, self.base).view(self.shape)


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


def l1_norm(delta: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``‖δ‖₁ = Σ|δ|``, summed like mergekit (``abs().sum()``) so that rescaling matches exactly."""
    return torch.abs(delta, out=_buffer(delta, scratch)).sum()


# --- exact order statistics of |δ| without sorting --------------------------------------------


class MagnitudeRank(NamedTuple):
    """The magnitude at one ascending rank of ``|δ|``, how many entries lie below and at it, and
    where those at it are, when the scan that found it saw: their flat indices (ascending), or
    how many there are in each block (of ``_spans``)."""

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
    below, inside = [0] * len(brackets), [[] for _ in brackets]
    found: list[list[tuple[np.ndarray, np.ndarray]] | None] = [
        None if low == high else [] for low, high in brackets
    ]
    out, scratch = source.blocks.floats(2)
    flags = source.blocks.flags(2)
    for start, stop in _spans(numel, device):
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
    spans = _spans(numel, device)
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
    for index, (start, stop) in enumerate(_spans(source.numel, source.device)):
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


def _keep_top_(magnitudes: Tensor, start: int, value: float, split: int) -> Tensor:
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
    mask = torch.abs(flat, out=_buffer(flat, scratch))
    flat.mul_(_keep_top_(mask, 0, cut.value, cut.split))
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
    mask = _buffer(flat, scratch)
    _keep_range_(flat, 0, cut, mask)
    return delta


def _keep_range_(block: Tensor, start: int, cut: RangeCut, scratch: Tensor) -> Tensor:
    """Zero the entries of a δ block (flat index ``start`` on) outside ``cut``, in place."""
    block.mul_(_keep_from_(torch.abs(block, out=scratch), start, cut.low, cut.low_split))
    return block.mul_(_keep_below_(torch.abs(block, out=scratch), start, cut.high, cut.high_split))


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
        return delta.mul_(_keep_top_(torch.abs(delta, out=scratch), start, cut.value, cut.split))

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
        return _keep_range_(delta, start, cut, scratch)

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
    uniform = _buffer(delta, scratch)
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
    for start, stop in _spans(vector.numel, vector.device):
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


# --- 5. merging --------------------------------------------------------------------------------


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
    if normalize:
        divisor = torch.sign(merged, out=_buffer(merged, divisor)).mul_(weights[0])
    for weight in weights[1:]:
        delta = deltas.pop(0).mul_(sign).clamp_(min=0)
        merged.add_(delta)
        if normalize:
            divisor.add_(delta.sign_(), alpha=weight)
        del delta
    merged.mul_(sign)
    if not normalize:
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

    ``sparsify(task_vector, i)`` scans model ``i``'s ``TaskVector`` as it needs and returns the
    ``Prune`` for its blocks (``None`` keeps everything); ``consensus`` ``None`` sums the task
    vectors, otherwise the sign is elected that way and disagreeing entries are dropped
    (``disjoint_merge_``). Then block by block (see the module docstring), the first model's task
    vector computed straight into the result.
    """
    blocks = Blocks.reused(base.numel(), base.device)
    vectors = [TaskVector(tensor, base, blocks) for tensor in tensors]
    prunes = [None if sparsify is None else sparsify(vector, i) for i, vector in enumerate(vectors)]
    merged = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    output, flat_base = merged.view(-1), base.reshape(-1)
    base_buffer, scratch, divisor, *buffers = blocks.floats(len(tensors) + 2)
    for start, stop in _spans(merged.numel(), merged.device):
        size = stop - start
        base32 = _as_float32(flat_base[start:stop], base_buffer[:size])
        deltas = []
        for vector, prune, weight, out in zip(
            vectors, prunes, weights, [output[start:stop]] + buffers, strict=True
        ):
            delta = vector.block(start, stop, out[:size], base32)
            if prune is not None:
                delta = prune(delta, start, scratch[:size])
            if weight != 1:
                delta.mul_(weight)
            deltas.append(delta)
        if consensus is None:
            block = sum_merge_(deltas, weights, normalize)
        else:
            block = disjoint_merge_(
                deltas, weights, normalize, consensus, scratch[:size], divisor[:size]
            )
        if lambda_ != 1:
            block.mul_(lambda_)
        block.add_(base32)
    return merged


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

    def sparsify(vector: TaskVector, index: int) -> Prune | None:
        return magnitude_pruning(vector, densities[index], rescale)

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

    def sparsify(vector: TaskVector, index: int) -> Prune | None:
        return dare_pruning(vector, densities[index], rescale, rescale_mode, generator)

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

    def sparsify(vector: TaskVector, index: int) -> Prune | None:
        return magnitude_outliers_pruning(vector, densities[index], gammas[index], rescale)

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

    def sparsify(vector: TaskVector, index: int) -> Prune | None:
        if densities[index] >= 1:
            return None
        pruned = della_drop_(
            vector.whole(), densities[index], epsilons[index], rescale, rescale_mode, generator
        )
        return _precomputed(pruned)

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
