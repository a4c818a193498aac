"""Task vectors ``δ = θ − θ_base``, whole or streamed a block at a time.

Streaming: on a CPU, page-faulting a fresh whole-tensor float32 buffer costs several times the
arithmetic done in it, so the task-arithmetic merge never makes one besides its result. A
``TaskVector`` is recomputed from the inputs a block of ``_CHUNK`` entries at a time, into
buffers (``Blocks``) that stay in cache and that a thread keeps from call to call. A block goes
through exactly the float32 operations the whole tensor would, so results do not depend on the
block size: as on a GPU, where a block is the whole tensor.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_CHUNK = 1 << 20  # entries per block on a CPU: 4 MiB of float32, cache-resident between steps


def float32_buffer(like: Tensor, scratch: Tensor | None) -> Tensor:
    """``scratch`` (viewed like ``like``) if given, else a new float32 tensor like ``like``."""
    if scratch is None:
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return scratch.view(like.shape)


def as_float32(tensor: Tensor, scratch: Tensor | None) -> Tensor:
    """``tensor`` in float32: itself if it already is, else converted into ``scratch``."""
    if tensor.dtype == torch.float32:
        return tensor
    return float32_buffer(tensor, scratch).copy_(tensor)


def block_spans(numel: int, device: torch.device) -> list[tuple[int, int]]:
    """``[start, stop)`` of each block of a flattened tensor: ``_CHUNK`` entries on a CPU, the
    whole tensor elsewhere (a GPU has the memory, and each block costs kernel launches)."""
    size = _CHUNK if device.type == "cpu" else max(numel, 1)
    return [(start, min(start + size, numel)) for start in range(0, numel, size)]


class Blocks:
    """Buffers of one block each (see ``block_spans``), shared by the scans and merge of a call.

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


def task_vector(tensor: Tensor, base: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``δ = θ − θ_base`` as a new float32 tensor (Ilharco et al., arXiv:2212.04089)."""
    if tensor.dtype == base.dtype == torch.float32:
        return torch.sub(tensor, base)
    delta = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device).copy_(tensor)
    return delta.sub_(as_float32(base, scratch))


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
        base32 = as_float32(self.base[start:stop], scratch)
        return self.block(start, stop, out, base32).abs_()

    def strided_magnitudes(self, step: int) -> Tensor:
        """``|δ|`` of every ``step``-th entry, from the first."""
        return torch.sub(self.tensor[::step].float(), self.base[::step].float()).abs_()

    def whole(self) -> Tensor:
        """The whole task vector as a new float32 tensor, shaped like the base."""
        return task_vector(self.tensor, self.base).view(self.shape)


def l1_norm(delta: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``‖δ‖₁ = Σ|δ|``, summed like mergekit (``abs().sum()``) so that rescaling matches exactly."""
    return torch.abs(delta, out=float32_buffer(delta, scratch)).sum()
