"""Every merge method on the zoo: merge the LoRA experts with each method's typical settings,
check the output, and score it on the validation split (never the test split).

For each method in the registry (a method added later shows up as "no setting" until it gets
one below): merge, then report whether every tensor is finite, how many of the tensors that no
expert touches (embeddings, norms, lm_head, untargeted projections) equal the base bit for bit,
the merge time and, unless ``--no-eval``, the validation average of the zoo's tasks.

    python scripts/zoo_method_survey.py --limit 50 --out /tmp/survey      # ~15 min on 2 cores
    python scripts/zoo_method_survey.py --no-eval                          # merges only, ~3 min
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mergearena.engine import iter_output_tensors, merge
from mergearena.errors import MergeArenaError
from mergearena.methods import all_methods
from mergearena.zoo.catalog import adapter_dir, expert_names
from mergearena.zoo.leaderboard import BASE_REF

EXPERTS = [f"zoo:{name}-lora" for name in expert_names()]

# Each method's typical settings: the tuned zoo recipes where one exists (recipes/zoo-*.yaml),
# the papers' defaults otherwise. (global parameters, per-model parameters, how many experts)
SETTINGS: dict[str, list[tuple[dict[str, Any], dict[str, Any], int]]] = {
    "linear": [({}, {"weight": 1.0}, 5)],
    "passthrough": [({}, {}, 1)],
    "task_arithmetic": [
        ({"lambda": 0.5}, {"weight": 1.0}, 5),
        ({"lambda": 1.0}, {"weight": 1.0}, 5),
    ],
    "ties": [({"lambda": 1.0, "normalize": False}, {"weight": 1.0, "density": 0.3}, 5)],
    "dare_linear": [({"lambda": 1.0}, {"weight": 1.0, "density": 0.3}, 5)],
    "dare_ties": [({"lambda": 1.0}, {"weight": 1.0, "density": 0.3}, 5)],
    "breadcrumbs": [({"lambda": 1.0}, {"weight": 1.0, "density": 0.3, "gamma": 0.01}, 5)],
    "breadcrumbs_ties": [({"lambda": 1.0}, {"weight": 1.0, "density": 0.3, "gamma": 0.01}, 5)],
    "della": [({"lambda": 1.0}, {"weight": 1.0, "density": 0.3, "epsilon": 0.15}, 5)],
    "della_linear": [({"lambda": 1.0}, {"weight": 1.0, "density": 0.3, "epsilon": 0.15}, 5)],
    "slerp": [({"t": 0.5}, {}, 1)],
    "nearswap": [({"t": 0.001}, {}, 1)],
    "multislerp": [({}, {"weight": 1.0}, 5)],
    "karcher": [({}, {"weight": 1.0}, 5)],
    "model_stock": [({}, {}, 5)],
    "geometric_median": [({"lambda": 1.0}, {"weight": 1.0}, 5)],
    "lora_concat": [({}, {"weight": 1.0}, 5)],
    "lora_svd": [({"rank": 8}, {"weight": 1.0}, 5)],
}


def recipe_for(method: str, parameters: dict, per_model: dict, count: int) -> dict[str, Any]:
    spec = next(spec for spec in all_methods() if spec.name == method)
    document: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": ref, "parameters": dict(per_model)} for ref in EXPERTS[:count]],
        "parameters": parameters,
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    if spec.base != "none" and spec.output == "tensor":
        document["base_model"] = BASE_REF
    return document


def label(method: str, parameters: dict, per_model: dict, count: int) -> str:
    settings = {**parameters, **{k: v for k, v in per_model.items() if k != "weight"}}
    text = ", ".join(f"{key} {value}" for key, value in settings.items())
    experts = "5 experts" if count == len(EXPERTS) else f"{count} expert ({expert_names()[0]})"
    return f"{method} ({experts}{'; ' + text if text else ''})"


def check(directory: Path, base: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(non-finite tensors, untouched tensors equal to the base, untouched tensors)."""
    targeted = set()
    for name in expert_names():
        config = json.loads((adapter_dir(name) / "adapter_config.json").read_text())
        targeted.update(config["target_modules"])
    nonfinite = equal = untouched = 0
    for name, tensor in iter_output_tensors(directory):
        if tensor.is_floating_point() and not torch.isfinite(tensor.float()).all():
            nonfinite += 1
        if not any(f".{module}." in name for module in targeted):
            untouched += 1
            equal += int(torch.equal(tensor, base[name]))
    return nonfinite, equal, untouched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=50, help="validation rows per task")
    parser.add_argument("--no-eval", action="store_true", help="merge and check only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="evaluation dtype")
    parser.add_argument("--only", nargs="+", default=None, help="method names")
    parser.add_argument("--out", type=Path, default=None, help="write survey.json here")
    args = parser.parse_args()

    from mergearena.checkpoints import resolve_model_ref
    from mergearena.evaluation import evaluate, load_task
    from mergearena.models import LanguageModel
    from mergearena.zoo.prepare import task_files

    base = dict(iter_output_tensors(resolve_model_ref(BASE_REF)))
    tasks = []
    if not args.no_eval:
        for path in task_files("validation", None):
            task = load_task(path, limit=args.limit)
            task.name = path.stem
            tasks.append(task)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mergearena-survey-") as scratch:
        for spec in all_methods():
            if args.only and spec.name not in args.only:
                continue
            for parameters, per_model, count in SETTINGS.get(spec.name, []):
                name = label(spec.name, parameters, per_model, count)
                row: dict[str, Any] = {"setting": name, "method": spec.name}
                out = Path(scratch) / f"{spec.name}-{len(rows)}"
                started = time.perf_counter()
                try:
                    merge(recipe_for(spec.name, parameters, per_model, count), out)
                except MergeArenaError as error:
                    row.update(status=f"refused: {error}")
                    rows.append(row)
                    print(f"{name}: refused: {error}", flush=True)
                    continue
                row["merge_seconds"] = round(time.perf_counter() - started, 1)
                if spec.output == "adapter":
                    row.update(status="adapter written", nonfinite=0)
                    model, adapter = BASE_REF, str(out)
                else:
                    nonfinite, equal, untouched = check(out, base)
                    row.update(status="finite" if nonfinite == 0 else "NON-FINITE")
                    row.update(nonfinite=nonfinite, untouched_equal=f"{equal}/{untouched}")
                    model, adapter = str(out), None
                if tasks:
                    lm = LanguageModel.load(
                        model, adapter=adapter, device=args.device, dtype=args.dtype
                    )
                    results = evaluate(lm, tasks)
                    row["scores"] = {r.task.name: round(100 * r.main_value, 1) for r in results}
                    row["average"] = round(sum(row["scores"].values()) / len(results), 1)
                    del lm
                print(json.dumps(row), flush=True)
                rows.append(row)
    print()
    print(
        "| method and setting | output | untouched tensors = base | merge s | validation average |"
    )
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['setting']} | {row['status']} | {row.get('untouched_equal', '-')} | "
            f"{row.get('merge_seconds', '-')} | {row.get('average', '-')} |"
        )
    missing = [spec.name for spec in all_methods() if spec.name not in SETTINGS]
    if missing:
        print(f"\nno setting for: {', '.join(missing)} (add them to SETTINGS)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        document = {"limit": args.limit, "dtype": args.dtype, "device": args.device, "rows": rows}
        (args.out / "survey.json").write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
