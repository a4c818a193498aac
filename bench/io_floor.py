#!/usr/bin/env python3
"""The I/O floor of a merge on this machine: how fast bytes leave the inputs and reach the output.

For the checkpoints in the given directories (``bench/gpu_merge.py`` builds them): reading every
input once with 1 and with N threads (``os.preadv`` into our own buffer, as mergearena reads),
reading them through pinned buffers onto the GPU with N threads (``Stager.upload``, as
``mergearena merge --device cuda`` does), and writing one model's worth of bytes to a file beside
them with 1 thread. A merge of three models can be no faster than the slowest of: reading all
three, and writing one.

    python3 bench/io_floor.py /dev/shm/mergearena-gpu-bench/ckpt-*/{base,ft1,ft2} --threads 8
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mergearena.checkpoints import Checkpoint


def _jobs(checkpoints: list[Checkpoint]) -> list[tuple[Checkpoint, str]]:
    return [(checkpoint, name) for checkpoint in checkpoints for name in checkpoint.tensors]


def read_all(checkpoints: list[Checkpoint], threads: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda job: job[0].get(job[1]), _jobs(checkpoints)))
    return time.perf_counter() - started


def upload_all(checkpoints: list[Checkpoint], threads: int) -> float:
    import threading

    from mergearena.checkpoints.staging import Stager

    local = threading.local()
    device = torch.device("cuda")

    def upload(job: tuple[Checkpoint, str]) -> None:
        checkpoint, name = job
        if not hasattr(local, "stager"):
            local.stager = Stager(device)
        data, done = local.stager.upload(
            checkpoint.tensors[name].nbytes,
            lambda buffer, start: checkpoint.read_into(name, memoryview(buffer.numpy()), start),
        )
        done.synchronize()

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(upload, _jobs(checkpoints)))
    torch.cuda.synchronize()
    return time.perf_counter() - started


def write_one(checkpoint: Checkpoint, target: Path) -> float:
    chunk = torch.zeros(32 << 20, dtype=torch.uint8)
    view = memoryview(chunk.numpy())
    total = sum(info.nbytes for info in checkpoint.tensors.values())
    started = time.perf_counter()
    with open(target, "wb") as handle:
        for _ in range(0, total, len(view)):
            handle.write(view)
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args()
    checkpoints = [Checkpoint.open(path) for path in args.models]
    total = sum(info.nbytes for c in checkpoints for info in c.tensors.values()) / 1e9
    print(f"{len(checkpoints)} inputs, {total:.1f} GB")
    for threads in sorted({1, args.threads}):
        seconds = read_all(checkpoints, threads)
        print(f"read, {threads} thread(s): {seconds:.2f} s ({total / seconds:.1f} GB/s)")
    if torch.cuda.is_available():
        upload_all(checkpoints[:1], args.threads)  # pinned buffers and CUDA context, once
        seconds = upload_all(checkpoints, args.threads)
        print(f"to the GPU, {args.threads} threads: {seconds:.2f} s ({total / seconds:.1f} GB/s)")
    one = total / len(checkpoints)
    seconds = write_one(checkpoints[0], args.models[0].parent / "io-floor-write.tmp")
    print(f"write {one:.1f} GB, 1 thread: {seconds:.2f} s ({one / seconds:.1f} GB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
