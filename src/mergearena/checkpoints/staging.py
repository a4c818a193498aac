"""Bytes between files and a CUDA GPU, through pinned staging buffers.

A copy from ordinary (pageable) host memory to the GPU is synchronous and goes through the driver's
own bounce buffer; from page-locked ("pinned") memory the GPU's copy engine reads it directly and
the CPU is free at once. A ``Stager`` owns two pinned buffers of ``chunk_bytes`` and a CUDA stream,
and moves a tensor's bytes a chunk at a time, alternating the buffers: while the copy engine moves
chunk k, the CPU reads chunk k+1 from the file (``upload``) or writes chunk k-1 to it
(``download``). Host memory stays at two chunks per stager whatever the tensor's size.

A stager belongs to one thread. Its copies run on its own stream, so the caller says when they may
start (an event the stream waits for) and learns when they are done (an event it records): the
stream that uses an uploaded tensor waits for that event and records itself on the tensor
(``Tensor.record_stream``) so that the caching allocator does not hand its memory to another
stream too early.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_BYTES = 32 << 20


def _event() -> torch.cuda.Event:
    """An event whose ``synchronize`` sleeps rather than spins: a dozen reader and writer
    threads spinning on their copies would take the cores that read and write the files."""
    return torch.cuda.Event(blocking=True)


class Stager:
    """Two pinned buffers and a stream, for one thread's uploads and downloads."""

    def __init__(self, device: torch.device, chunk_bytes: int | None = None) -> None:
        self.device = device
        self.chunk_bytes = chunk_bytes = chunk_bytes or CHUNK_BYTES
        self.stream = torch.cuda.Stream(device)
        self._buffers = [
            torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)
        ]
        self._copies: list[torch.cuda.Event | None] = [None, None]

    def _buffer(self, chunk: int, nbytes: int) -> torch.Tensor:
        """Buffer ``chunk % 2``, once the copy last queued from or into it has finished."""
        copy = self._copies[chunk % 2]
        if copy is not None:
            copy.synchronize()
        return self._buffers[chunk % 2][:nbytes]

    def _record(self, chunk: int) -> torch.cuda.Event:
        event = _event()
        event.record(self.stream)
        self._copies[chunk % 2] = event
        return event

    def upload(
        self, nbytes: int, fill: Callable[[torch.Tensor, int], None]
    ) -> tuple[torch.Tensor, torch.cuda.Event]:
        """A new ``uint8`` tensor of ``nbytes`` on the device, and the event after its last copy.

        ``fill(buffer, start)`` writes bytes ``[start, start + len(buffer))`` into the pinned
        ``buffer`` (a ``uint8`` CPU tensor). Wait for the event before reading the tensor.
        """
        with torch.cuda.stream(self.stream):
            out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            for chunk, start in enumerate(range(0, nbytes, self.chunk_bytes)):
                buffer = self._buffer(chunk, min(self.chunk_bytes, nbytes - start))
                fill(buffer, start)
                out[start : start + len(buffer)].copy_(buffer, non_blocking=True)
                self._record(chunk)
            done = _event()
            done.record(self.stream)
        return out, done

    def download(
        self,
        tensor: torch.Tensor,
        ready: torch.cuda.Event | None,
        sink: Callable[[memoryview], object],
    ) -> None:
        """Pass a device tensor's bytes to ``sink`` in order, a chunk at a time, once ``ready``
        (an event after the work that produced it) has passed. Returns when all were passed."""
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        nbytes = flat.numel()
        with torch.cuda.stream(self.stream):
            if ready is not None:
                self.stream.wait_event(ready)
            previous: tuple[torch.Tensor, torch.cuda.Event] | None = None
            for chunk, start in enumerate(range(0, nbytes, self.chunk_bytes)):
                buffer = self._buffer(chunk, min(self.chunk_bytes, nbytes - start))
                buffer.copy_(flat[start : start + len(buffer)], non_blocking=True)
                copied = self._record(chunk)
                if previous is not None:
                    previous[1].synchronize()
                    sink(previous[0].numpy().data)
                previous = (buffer, copied)
            if previous is not None:
                previous[1].synchronize()
                sink(previous[0].numpy().data)

    def fetch(self, tensor: torch.Tensor, ready: torch.cuda.Event | None) -> torch.Tensor:
        """A small device tensor on the CPU, copied on this stream once ``ready`` has passed
        (a sync of this stream only, not of the work queued after ``ready`` elsewhere)."""
        with torch.cuda.stream(self.stream):
            if ready is not None:
                self.stream.wait_event(ready)
            return tensor.to("cpu")
