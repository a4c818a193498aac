#!/usr/bin/env python3
"""Zoo-merge benchmark: the demo's recipes (five rank-4 LoRA experts into SmolLM2-135M).

Each recipe in ``recipes/zoo-*.yaml`` is merged by ``mergearena merge`` and, with
``--tools mergekit``, by mergekit 0.1.5 (``bash bench/setup_mergekit.sh``) from the same
experts written as mergekit's ``BASE+ADAPTER`` references, each as a subprocess: best wall time
of ``--repeat`` runs and the child's peak RSS. Needs the prepared zoo (``mergearena zoo prepare``).

    .venv/bin/python bench/zoo_merges.py                        # mergearena, every zoo recipe
    .venv/bin/python bench/zoo_merges.py --tools mergearena,mergekit --repeat 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MERGEARENA = REPO_ROOT / ".venv" / "bin" / "mergearena"
MERGEKIT = BENCH_DIR / ".venv-mergekit" / "bin" / "mergekit-yaml"


class Failed(Exception):
    """A tool refused or crashed; the message is the last line of its stderr."""


def run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS of the child in GB)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if status != 0:
            stderr.seek(0)
            lines = stderr.read().decode(errors="replace").strip().splitlines()
            raise Failed(lines[-1] if lines else f"exit status {status}")
    return seconds, usage.ru_maxrss / 2**20


def mergekit_recipe(document: dict, base: Path) -> dict:
    """The same recipe in mergekit's terms: experts as BASE+ADAPTER, zoo names as directories."""
    from mergearena.checkpoints import resolve_model_ref

    converted = dict(document)
    converted["models"] = [
        {**entry, "model": f"{base}+{resolve_model_ref(entry['model'])}"}
        for entry in document["models"]
    ]
    if "base_model" in document:
        converted["base_model"] = str(base)
    return converted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", default="mergearena", help="mergearena,mergekit")
    parser.add_argument("--repeat", type=int, default=3, help="runs of mergearena (best kept)")
    parser.add_argument("--mergekit-repeat", type=int, default=1, help="runs of mergekit")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    from mergearena.checkpoints import resolve_model_ref

    base = resolve_model_ref("zoo:smollm2-135m")
    tools = args.tools.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mergearena-zoo-bench-") as scratch:
        for recipe in sorted((REPO_ROOT / "recipes").glob("zoo-*.yaml")):
            document = yaml.safe_load(recipe.read_text())
            row = {"recipe": recipe.stem.removeprefix("zoo-")}
            for tool in tools:
                out = Path(scratch) / f"{tool}-out"
                if tool == "mergearena":
                    command = [str(MERGEARENA), "merge", str(recipe), "--out", str(out)]
                    command += ["--threads", str(args.threads)]
                else:
                    converted = Path(scratch) / f"{recipe.stem}-mergekit.yaml"
                    converted.write_text(yaml.safe_dump(mergekit_recipe(document, base)))
                    # mergekit first writes each BASE+ADAPTER as a full model to this cache; a new
                    # cache every run, so that each run pays for it
                    lora_cache = Path(scratch) / "lora-cache"
                    command = [str(MERGEKIT), str(converted), str(out), "--copy-tokenizer"]
                    command += ["--lora-merge-cache", str(lora_cache)]
                best: tuple[float, float] | str = (float("inf"), 0.0)
                for _ in range(args.repeat if tool == "mergearena" else args.mergekit_repeat):
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(Path(scratch) / "lora-cache", ignore_errors=True)
                    try:
                        best = min(best, run(command))
                    except Failed as error:
                        best = f"failed: {error}"
                        break
                row[tool] = best
                shown = best if isinstance(best, str) else f"{best[0]:6.2f} s {best[1]:5.2f} GB"
                print(f"{row['recipe']:>16} {tool:>10}: {shown}", flush=True)
            rows.append(row)
    print()
    header = "| recipe | " + " | ".join(f"{tool} s (GB)" for tool in tools)
    print(header + (" | mergekit / mergearena |" if len(tools) == 2 else " |"))
    print("|---|" + "---:|" * (len(tools) + (1 if len(tools) == 2 else 0)))
    for row in rows:
        cells = " | ".join(
            row[t][:70] + "…" if isinstance(row[t], str) else f"{row[t][0]:.2f} ({row[t][1]:.2f})"
            for t in tools
        )
        ratio = ""
        if len(tools) == 2:
            timed = not any(isinstance(row[t], str) for t in tools)
            ratio = f" | {row['mergekit'][0] / row['mergearena'][0]:.1f}x" if timed else " | -"
        print(f"| {row['recipe']} | {cells}{ratio} |")
    print(f"\n{os.cpu_count()} cores, {sys.platform}, threads {args.threads}")


if __name__ == "__main__":
    main()
