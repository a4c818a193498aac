"""The dtype a model runs in: named, or ``auto``, chosen by what the machine can do fast.

``auto`` is bfloat16 on CUDA and on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX),
float32 elsewhere: on a CPU with AVX2 only, bfloat16 matmuls are emulated and ran 5.5x slower
than float32 (scoring 50 rows of the zoo's sentiment task: 32.5 s against 5.9 s). CPU flags
are not always reported faithfully inside virtual machines, so on the CPU a probe decides: one
small matmul timed in each dtype, once per process (a few milliseconds).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mergearena.errors import EvaluationError

AUTO = "auto"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = (AUTO, *DTYPES)
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved dtype and why it was chosen (printed where the user sees it)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self, asked: str) -> str:
        return f"dtype {asked} → {self.name} ({self.reason})" if asked == AUTO else f"dtype {asked}"


def cpu_bf16_flags() -> list[str]:
    """The native-bfloat16 flags /proc/cpuinfo reports (empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return [flag for flag in _BF16_FLAGS if flag in flags]


def _matmul_seconds(dtype: torch.dtype, repeats: int = 5) -> float:
    """The best of ``repeats`` timings of a matmul the size of a small model's projection.

    On one thread: what is probed is the core's arithmetic, and with two threads on a busy
    2-core machine one thread waiting for the other made bf16 read 1 to 8 ms from run to run
    (one thread: 2.0-2.2 ms, fp32 4.4-4.5 ms). Three untimed calls first build oneDNN's kernels.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        left = torch.ones(256, 576, dtype=dtype)
        right = torch.ones(576, 1536, dtype=dtype)
        for _ in range(3):
            left @ right
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            left @ right
            best = min(best, time.perf_counter() - started)
        return best
    finally:
        torch.set_num_threads(threads)


@functools.cache
def cpu_choice() -> DtypeChoice:
    """bfloat16 if a bfloat16 matmul is at least as fast as a float32 one on this CPU."""
    flags = cpu_bf16_flags()
    ratio = _matmul_seconds(torch.bfloat16) / max(_matmul_seconds(torch.float32), 1e-9)
    named = f"CPU flags: {', '.join(flags) or 'no avx512_bf16/amx_bf16'}"
    if ratio <= 1.0:
        return DtypeChoice(
            torch.bfloat16,
            f"native bfloat16 on this CPU: {named}, bf16 matmul {1 / ratio:.1f}x the speed of fp32",
        )
    return DtypeChoice(
        torch.float32,
        f"no fast bfloat16 on this CPU: {named}, bf16 matmul {ratio:.1f}x slower than fp32",
    )


def choose_dtype(name: str, device: str | torch.device = "cpu") -> DtypeChoice:
    """What ``name`` means on ``device``: a named dtype as it is, ``auto`` as the module says."""
    if name != AUTO:
        try:
            return DtypeChoice(DTYPES[name], "asked for")
        except KeyError:
            raise EvaluationError(
                f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}"
            ) from None
    if torch.device(device).type == "cuda":
        return DtypeChoice(torch.bfloat16, "CUDA")
    return cpu_choice()
