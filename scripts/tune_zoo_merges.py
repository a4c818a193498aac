"""Tune the zoo's merge recipes on the validation split (never the test split).

Every candidate merges all the zoo's LoRA experts into the base with one method and one setting;
each is scored on every zoo task's validation split and the candidates are ranked by the average.
The best setting of each method became ``recipes/zoo-<method>.yaml``.

    python scripts/tune_zoo_merges.py --device cuda                 # a few minutes on a GPU
    python scripts/tune_zoo_merges.py --limit 50 --only ta-1.0 ties-d0.5-l1.0   # a subset, on CPU
    python scripts/tune_zoo_merges.py --only geometric-median multislerp --markdown  # docs/zoo.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from mergearena.zoo.catalog import expert_names
from mergearena.zoo.leaderboard import BASE_REF, run_leaderboard


def recipe(
    method: str, parameters: dict, per_model: dict, base: bool = True, boost: dict | None = None
) -> dict:
    """All experts with ``per_model`` parameters; ``boost`` scales chosen experts' weights."""
    models = []
    for name in expert_names():
        settings = dict(per_model)
        if boost and name in boost:
            settings["weight"] = settings["weight"] * boost[name]
        models.append({"model": f"zoo:{name}-lora", "parameters": settings})
    document = {
        "merge_method": method,
        "models": models,
        "parameters": parameters,
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    if base:
        document["base_model"] = BASE_REF
    return document


def candidates() -> dict[str, dict]:
    found = {"linear": recipe("linear", {}, {"weight": 1.0}, base=False)}
    for lam in (0.5, 0.75, 1.0, 1.25):
        found[f"ta-{lam}"] = recipe("task_arithmetic", {"lambda": lam}, {"weight": 1.0})
    for density in (0.3, 0.6):
        for lam in (1.0, 1.5):
            found[f"ties-d{density}-l{lam}"] = recipe(
                "ties", {"lambda": lam, "normalize": False}, {"weight": 1.0, "density": density}
            )
    for density in (0.3, 0.6):
        found[f"dare-ties-d{density}"] = recipe(
            "dare_ties", {"lambda": 1.0}, {"weight": 1.0, "density": density}
        )
    found["ties-d0.8-l1.0"] = recipe(
        "ties", {"lambda": 1.0, "normalize": False}, {"weight": 1.0, "density": 0.8}
    )
    # Generation (arithmetic) suffers most from the other experts' deltas: give it more weight.
    for boost in (1.5, 2.0):
        found[f"ta-1.0-arithmetic{boost}"] = recipe(
            "task_arithmetic", {"lambda": 1.0}, {"weight": 1.0}, boost={"arithmetic": boost}
        )
        found[f"ties-d0.6-l1.0-arithmetic{boost}"] = recipe(
            "ties",
            {"lambda": 1.0, "normalize": False},
            {"weight": 1.0, "density": 0.6},
            boost={"arithmetic": boost},
        )
    # spam has the smallest task vector (Frobenius norm 12.7 against 13.5-20.5 for the others).
    for boost in (1.5, 2.0):
        found[f"ta-0.5-spam{boost}"] = recipe(
            "task_arithmetic", {"lambda": 0.5}, {"weight": 1.0}, boost={"spam": boost}
        )
    found["geometric-median"] = recipe("geometric_median", {"lambda": 1.0}, {"weight": 1.0})
    found["multislerp"] = recipe("multislerp", {}, {"weight": 1.0})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--limit", type=int, default=None, help="rows per task")
    parser.add_argument("--only", nargs="+", default=None, help="candidate names")
    parser.add_argument("--out", type=Path, default=None, help="keep the merges and scores here")
    parser.add_argument("--json", type=Path, default=None, help="write the ranking here")
    parser.add_argument(
        "--markdown", action="store_true", help="also print the rows as docs/zoo.md's table (in %)"
    )
    args = parser.parse_args()
    chosen = {k: v for k, v in candidates().items() if not args.only or k in args.only}
    with tempfile.TemporaryDirectory(prefix="mergearena-tune-") as scratch:
        paths = []
        for name, document in chosen.items():
            path = Path(scratch) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(document, sort_keys=False))
            paths.append(path)
        out = args.out or Path(scratch) / "out"
        rows = run_leaderboard(
            paths,
            out,
            split="validation",
            limit=args.limit,
            include_base=True,
            include_experts=False,
            device=args.device,
            dtype=args.dtype,
            overwrite=True,
        )
    table = Table(title="merge candidates on the validation split")
    tasks = list(rows[0].scores)
    for column in ("candidate", *tasks, "average"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for row in rows:
        table.add_row(row.name, *[f"{row.scores[t]:.3f}" for t in tasks], f"{row.average:.4f}")
    Console(width=160).print(table)
    if args.markdown:
        print(f"| candidate | {' | '.join(tasks)} | average |")
        print("|---|" + "---:|" * (len(tasks) + 1))
        for row in rows:
            cells = " | ".join(f"{100 * row.scores[t]:.1f}" for t in tasks)
            print(f"| {row.name} | {cells} | {100 * row.average:.1f} |")
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
