"""The zoo's leaderboard: the base, every expert and every recipe's merge, scored on every task.

This is the main job (``mergearena demo``): prepare the zoo, merge the experts with each recipe,
evaluate everything on one split of every zoo task, and rank by the average of the tasks' main
metrics — the competition's leaderboard, on a laptop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mergearena.checkpoints.writer import atomic_directory
from mergearena.errors import MergeArenaError
from mergearena.zoo.base import BASE_NAME

BASE_REF = f"zoo:{BASE_NAME}"


@dataclass
class Row:
    """One leaderboard row: what was scored, its per-task main metric and their average."""

    name: str
    kind: str  # base | expert | merge
    model: str
    adapter: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    average: float = 0.0
    seconds: float = 0.0  # evaluation time (plus merge time for merges)


def default_recipes(root: Path | None = None) -> list[Path]:
    """``recipes/zoo-*.yaml`` in the working directory or beside the source checkout."""
    candidates = [root] if root else [Path.cwd() / "recipes", Path(__file__).parents[3] / "recipes"]
    for directory in candidates:
        found = sorted(directory.glob("zoo-*.yaml")) if directory and directory.is_dir() else []
        if found:
            return found
    raise MergeArenaError(
        "found no zoo recipes (recipes/zoo-*.yaml in the working directory or the source "
        "checkout); pass them with --recipes."
    )


def run_leaderboard(
    recipes: Sequence[Path],
    out: Path,
    *,
    split: str = "test",
    limit: int | None = None,
    tasks: Sequence[str] | None = None,
    include_base: bool = True,
    include_experts: bool = True,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int | str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Score base, experts and merges; write ``out/leaderboard.json`` (and ``out/merges/``)."""
    from mergearena.engine import merge
    from mergearena.evaluation import LanguageModel, evaluate, load_task
    from mergearena.recipe import parse_recipe
    from mergearena.zoo.catalog import adapter_dir, expert_names
    from mergearena.zoo.prepare import prepare, task_files

    prepare(experts=False)  # the recipes name LoRA experts; `zoo prepare` builds full weights
    loaded = []
    for path in task_files(split, list(tasks) if tasks else None):
        task = load_task(path, limit=limit)
        task.name = path.stem
        loaded.append(task)
    # All checked up front; zoo-ties.yaml is called "ties".
    parsed = [(Path(p).stem.removeprefix("zoo-"), parse_recipe(Path(p))) for p in recipes]
    candidates: list[Row] = []
    if include_base:
        candidates.append(Row("base", "base", BASE_REF))
    if include_experts:
        for name in expert_names():
            candidates.append(Row(name, "expert", BASE_REF, str(adapter_dir(name))))
    rows: list[Row] = []
    with atomic_directory(out, overwrite=overwrite) as staging:
        for name, recipe in parsed:
            started = time.perf_counter()
            merge(recipe, staging / "merges" / name)
            log(f"merged {name} ({recipe.method.name}) in {time.perf_counter() - started:.1f} s")
            row = Row(name, "merge", str(out / "merges" / name))
            row.seconds = time.perf_counter() - started
            candidates.append(row)
        for row in candidates:
            started = time.perf_counter()
            where = row.model if row.kind != "merge" else str(staging / "merges" / row.name)
            lm = LanguageModel.load(where, adapter=row.adapter, device=device, dtype=dtype)
            results = evaluate(lm, loaded, batch_size=batch_size, progress=progress)
            row.scores = {r.task.name: round(r.main_value, 4) for r in results}
            row.average = round(sum(row.scores.values()) / len(row.scores), 4)
            row.seconds = round(row.seconds + time.perf_counter() - started, 1)
            log(f"scored {row.name}: average {row.average:.4f} ({row.seconds:.0f} s)")
            rows.append(row)
            del lm
        document = {
            "split": split,
            "limit": limit,
            "tasks": {t.name: len(t.examples) for t in loaded},
            "device": device,
            "dtype": dtype,
            "rows": [asdict(r) for r in ranked(rows)],
        }
        (staging / "leaderboard.json").write_text(json.dumps(document, indent=2) + "\n")
    return ranked(rows)


def ranked(rows: Sequence[Row]) -> list[Row]:
    """Best average first; ties keep the given order."""
    return sorted(rows, key=lambda r: -r.average)


def verdict(rows: Sequence[Row]) -> str | None:
    """Whether the best merge beats every single expert on the average, in one sentence."""
    merges = [r for r in rows if r.kind == "merge"]
    experts = [r for r in rows if r.kind == "expert"]
    if not merges or not experts:
        return None
    best_merge = max(merges, key=lambda r: r.average)
    best_expert = max(experts, key=lambda r: r.average)
    margin = best_merge.average - best_expert.average
    relation = "beats every expert" if margin > 0 else "does not beat the best expert"
    return (
        f"best merge {best_merge.name} ({best_merge.average:.4f}) {relation} on the average "
        f"(best expert: the {best_expert.name} expert, {best_expert.average:.4f}; {margin:+.4f})"
    )
