#!/usr/bin/env python3
"""GPU merges at the competition's scale: mergearena against mergekit, in one run.

Builds three random Llama-shaped bf16 checkpoints (a base and two fine-tunes, the fine-tunes base
plus N(0, 0.002²)), by default with Meta-Llama-3-8B's tensors (8.03B parameters, 16 GB each),
drawing the random numbers on the GPU and writing them where ``--work-dir`` says (``/dev/shm``
on the device machine, so that disk speed is out of the picture). Then every tool merges the same
recipes (``merge_speed.recipe_yaml``: weights 0.5, density 0.5) as its own process, one after the
other, each output deleted before the next run:

* ``mergekit``: ``mergekit-yaml RECIPE OUT --cuda`` (what the issue measured);
* ``mergekit-fast``: mergekit with every speed option it has on one GPU (``--cuda --read-to-gpu
  --low-cpu-memory --async-write --write-threads 4``);
* ``mergearena``: ``python -m mergearena merge RECIPE --out OUT --device cuda``.

Wall time is fork to exit; peak RSS is the process's own (``merge_speed.run_tool``). After each
method the outputs are compared on the GPU, tensor by tensor: max |diff| for the deterministic
methods and the ratio of the merged changes' norms (``‖Δ‖ / ‖Δ_mergekit‖``, 1 when they agree).
``--cpu-check`` also merges each recipe with ``mergearena --device cpu`` and counts the tensors
that differ from the GPU's output (0 for the deterministic methods).

    python3 bench/gpu_merge.py --work-dir /dev/shm/gpu-bench                  # 8B, all tools
    python3 bench/gpu_merge.py --params 1e9 --cpu-check --tools mergearena     # smaller, quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import Shape, ensure_checkpoints, recipe_yaml, run_tool  # noqa: E402

MERGEKIT_FAST = "--cuda --read-to-gpu --low-cpu-memory --async-write --write-threads 4"


def tool_command(tool: str, args: argparse.Namespace, recipe: Path, out: Path) -> list[str]:
    if tool.startswith("mergearena"):
        device = "cpu" if tool == "mergearena-cpu" else "cuda"
        return [
            sys.executable,
            "-m",
            "mergearena",
            "merge",
            str(recipe),
            "--out",
            str(out),
            "--device",
            device,
            "--quiet",
        ]
    flags = "--cuda" if tool == "mergekit" else MERGEKIT_FAST
    return [
        *shlex.split(args.mergekit),
        str(recipe),
        str(out),
        "--no-copy-tokenizer",
        "--quiet",
        *shlex.split(flags),
    ]


def _tensors(directory: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    return where


def compare(first: Path, second: Path, base: Path) -> dict:
    """On the GPU, tensor by tensor: how many differ, max |diff|, ‖first−base‖ / ‖second−base‖."""
    from safetensors import safe_open

    def load(where: dict[str, Path], name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt", device="cuda") as handle:
            return handle.get_tensor(name).float()

    a_files, b_files, base_files = _tensors(first), _tensors(second), _tensors(base)
    if set(a_files) != set(b_files):
        return {"problem": f"tensor names differ: {sorted(set(a_files) ^ set(b_files))[:4]}"}
    worst, differing, change_a, change_b = 0.0, 0, 0.0, 0.0
    for name in a_files:
        a, b, origin = load(a_files, name), load(b_files, name), load(base_files, name)
        diff = (a - b).abs().max().item()
        worst, differing = max(worst, diff), differing + (diff > 0)
        change_a += (a - origin).square().sum(dtype=torch.float64).item()
        change_b += (b - origin).square().sum(dtype=torch.float64).item()
    return {
        "tensors": len(a_files),
        "differing": differing,
        "max_abs_diff": worst,
        "norm_ratio": (change_a / change_b) ** 0.5 if change_b else None,
    }


def method_timing(methods: list[str], density: float, shape: tuple[int, int]) -> None:
    """Each method's math alone on one tensor of ``shape`` (bf16 inputs, on the GPU), as the
    engine calls it: where a merge's time goes once the bytes are on the device."""
    from mergearena.methods import get_method

    generator = torch.Generator("cuda").manual_seed(0)
    base = (0.02 * torch.randn(shape, device="cuda", generator=generator)).bfloat16()
    tuned = [
        (base.float() + 0.002 * torch.randn(shape, device="cuda", generator=generator)).bfloat16()
        for _ in range(2)
    ]
    for name in methods:
        spec = get_method(name)
        arguments: dict = {"weight": [0.5, 0.5]}
        if name != "linear":
            arguments |= {"base": base, "density": [density, density]}
        if spec.random:
            arguments["generator"] = generator
        for _ in range(2):  # warm-up, then timed
            torch.cuda.synchronize()
            started = time.perf_counter()
            spec.function(tuned, **arguments).bfloat16()
            torch.cuda.synchronize()
        print(
            f"  {name:9s} on one {shape[0]}x{shape[1]} tensor: "
            f"{1e3 * (time.perf_counter() - started):.1f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--params", type=float, help="another size (TinyLlama proportions; default: Llama-3-8B)"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/dev/shm/mergearena-gpu-bench"))
    parser.add_argument("--methods", default="linear,ties,dare_ties")
    parser.add_argument("--tools", default="mergekit,mergekit-fast,mergearena")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--shard-mb", type=int, default=4768, help="input shards (HF's 5 GB)")
    parser.add_argument("--mergekit", default=f"{sys.executable} -m mergekit.scripts.run_yaml")
    parser.add_argument("--cpu-check", action="store_true", help="also merge on the CPU, compare")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--method-timing", action="store_true", help="also time each method's math on one tensor"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; nothing to measure")
        return 1
    shape = Shape.for_params(args.params) if args.params else Shape.llama3_8b()
    print(
        f"GPU: {torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch "
        f"{torch.__version__}, {os.cpu_count()} CPUs; models: {shape.total_params() / 1e9:.2f}B "
        f"params, {2 * shape.total_params() / 1e9:.1f} GB bf16 each, in {args.work_dir}",
        flush=True,
    )
    if args.method_timing:
        method_timing(args.methods.split(","), args.density, (shape.intermediate, shape.hidden))
    started = time.perf_counter()
    paths = ensure_checkpoints(args.work_dir, shape, args.shard_mb << 20, 0.002, 0, "cuda")
    print(f"inputs ready in {time.perf_counter() - started:.0f} s", flush=True)
    tools = args.tools.split(",") + (["mergearena-cpu"] if args.cpu_check else [])
    runs, comparisons = [], {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for method in args.methods.split(","):
        recipe = args.work_dir / f"{method}.yaml"
        recipe.write_text(recipe_yaml(method, paths, args.density))
        outputs = {}
        for tool in tools:
            for repeat in range(args.repeat):
                out = args.work_dir / f"out-{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                log = args.work_dir / f"{tool}-{method}-{repeat}.log"
                wall, rss, code, cpu, _ = run_tool(tool_command(tool, args, recipe, out), log, env)
                runs.append(
                    {
                        "tool": tool,
                        "method": method,
                        "wall_s": wall,
                        "rss_mib": rss,
                        "cpu_s": cpu,
                        "exit": code,
                    }
                )
                print(
                    f"  {method:9s} {tool:14s} {wall:7.1f} s  peak RSS {rss / 1024:6.2f} GiB  "
                    f"CPU {cpu:6.1f} s  {'ok' if code == 0 else f'FAILED, see {log}'}",
                    flush=True,
                )
                if code != 0:
                    print("    | " + "\n    | ".join(log.read_text().splitlines()[-12:]))
                    break
                if repeat + 1 < args.repeat:
                    shutil.rmtree(out)
            else:
                outputs[tool] = out
        reference = next((t for t in ("mergekit", "mergekit-fast") if t in outputs), None)
        for tool in outputs:
            if tool != reference and reference is not None:
                comparisons[(method, tool, reference)] = compare(
                    outputs[tool], outputs[reference], paths["base"]
                )
        if "mergearena-cpu" in outputs and "mergearena" in outputs:
            comparisons[(method, "mergearena", "mergearena-cpu")] = compare(
                outputs["mergearena"], outputs["mergearena-cpu"], paths["base"]
            )
        for out in outputs.values():
            shutil.rmtree(out)

    print(f"\n{'method':9s} {'tool':14s} {'wall s':>8s} {'peak RSS GiB':>13s} {'vs mergekit':>12s}")
    for method in args.methods.split(","):
        walls = {
            tool: statistics.median(
                r["wall_s"] for r in runs if (r["tool"], r["method"]) == (tool, method)
            )
            for tool in tools
            if any((r["tool"], r["method"]) == (tool, method) for r in runs)
        }
        for tool, wall in walls.items():
            rss = max(r["rss_mib"] for r in runs if (r["tool"], r["method"]) == (tool, method))
            ratio = f"{walls['mergekit'] / wall:11.2f}x" if "mergekit" in walls else ""
            print(f"{method:9s} {tool:14s} {wall:8.1f} {rss / 1024:13.2f} {ratio:>12s}")
    print("\ncomparisons (max |diff| is meaningful for linear and ties only; DARE draws masks):")
    for (method, first, second), result in comparisons.items():
        print(f"  {method:9s} {first} vs {second}: {json.dumps(result)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "shape": vars(shape),
                    "runs": runs,
                    "comparisons": [[*key, value] for key, value in comparisons.items()],
                },
                indent=2,
            )
        )
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
