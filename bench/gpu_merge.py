#!/usr/bin/env python3
"""`--device cuda` against the CPU: the same recipes over the same random checkpoints.

Builds the random Llama-shaped base and two fine-tunes of ``merge_speed.py`` (bf16, sharded), then
merges them with linear, TIES and DARE-TIES through the Python API on the GPU and on the CPU,
printing wall time per run and, for every method, the largest difference between the two outputs
(the deterministic methods must agree to bf16 rounding; DARE draws its random masks from the
device's generator, so there only the norm of the merged change is compared).

    python3 bench/gpu_merge.py --params 1e9 --work-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import Shape, ensure_checkpoints, recipe_yaml  # noqa: E402

from mergearena import merge  # noqa: E402
from mergearena.engine import iter_output_tensors  # noqa: E402


def compare(first: Path, second: Path, base: Path) -> tuple[float, float]:
    """Max abs difference between two outputs, and the ratio of their changes' norms from base."""
    worst, change_first, change_second = 0.0, 0.0, 0.0
    base_tensors = dict(iter_output_tensors(base))
    for (name, a), (_, b) in zip(
        iter_output_tensors(first), iter_output_tensors(second), strict=True
    ):
        a, b, origin = a.float(), b.float(), base_tensors[name].float()
        worst = max(worst, (a - b).abs().max().item())
        change_first += (a - origin).square().sum().item()
        change_second += (b - origin).square().sum().item()
    return worst, (change_first / max(change_second, 1e-30)) ** 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mergearena-gpu-bench"))
    parser.add_argument("--methods", default="linear,ties,dare_ties")
    parser.add_argument("--density", type=float, default=0.5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; nothing to measure")
        return 1
    print(
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"CPU threads {torch.get_num_threads()}"
    )
    paths = ensure_checkpoints(args.work_dir, Shape.for_params(args.params), 500 << 20, 0.002, 0)
    rows = []
    for method in args.methods.split(","):
        recipe = args.work_dir / f"{method}.yaml"
        recipe.write_text(recipe_yaml(method, paths, args.density))
        outputs = {}
        for device in ("cuda", "cpu"):
            out = args.work_dir / f"out-{method}-{device}"
            started = time.perf_counter()
            merge(recipe, out, device=device, overwrite=True)
            outputs[device] = (out, time.perf_counter() - started)
        worst, norm_ratio = compare(outputs["cuda"][0], outputs["cpu"][0], paths["base"])
        rows.append((method, outputs["cuda"][1], outputs["cpu"][1], worst, norm_ratio))
        for out, _ in outputs.values():
            shutil.rmtree(out)
    print(
        f"{'method':10s} {'cuda s':>8s} {'cpu s':>8s} {'cpu/cuda':>9s} {'max|Δ|':>10s} "
        f"{'‖Δcuda‖/‖Δcpu‖':>15s}"
    )
    for method, cuda_s, cpu_s, worst, ratio in rows:
        print(
            f"{method:10s} {cuda_s:8.2f} {cpu_s:8.2f} {cpu_s / cuda_s:9.2f} {worst:10.2e} "
            f"{ratio:15.5f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
