"""The zoo's leaderboard: the base, every expert and every recipe's merge, scored on every task.

This is the main job (``mergearena demo``): prepare the zoo, merge the experts with each recipe,
evaluate everything on one split of every zoo task, and rank by the average of the tasks' main
metrics — the competition's leaderboard, on a laptop.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergearena.checkpoints.writer import atomic_directory
from mergearena.dtypes import choose_dtype
from mergearena.engine import merge
from mergearena.errors import EvaluationError, MergeArenaError
from mergearena.evaluation import evaluate, load_task
from mergearena.models import LanguageModel
from mergearena.recipe import parse_recipe
from mergearena.zoo.base import BASE_NAME
from mergearena.zoo.catalog import adapter_dir, expert_names
from mergearena.zoo.prepare import prepare, task_files

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


MAX_WORKERS = 4


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def scoring_workers(device: str, candidates: int) -> int:
    """How many processes score ``candidates`` models side by side on ``device`` by default.

    On a CPU, one per core (one thread each), at most 4 since each holds its own model: a 135M
    model's forward passes are too small for two threads to keep two cores busy, and on 2 AVX2
    cores two processes of one thread scored two models in 33 s where one process of two threads
    took 48 s. On a GPU, one, which has the whole device.
    """
    return 1 if device != "cpu" else max(1, min(_cores(), MAX_WORKERS, candidates))


def _score(
    model: str,
    adapter: str | None,
    tasks: Sequence[Any],
    device: str,
    dtype: str,
    batch_size: int | str,
    progress: bool,
) -> tuple[dict[str, float], float]:
    """One candidate's main metric on every task, and the seconds that took (loading included)."""
    started = time.perf_counter()
    lm = LanguageModel.load(model, adapter=adapter, device=device, dtype=dtype)
    results = evaluate(lm, tasks, batch_size=batch_size, progress=progress)
    scores = {}
    for result in results:
        if result.main_value is None:
            raise EvaluationError(
                f"{model}: task {result.task.name} has no targets to score by; the leaderboard "
                f"needs tasks whose rows all have a target"
            )
        scores[result.task.name] = round(result.main_value, 4)
    return scores, time.perf_counter() - started


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


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
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Score base, experts and merges; write ``out/leaderboard.json`` (and ``out/merges/``).

    ``workers``: processes that score candidates side by side (None: ``scoring_workers``). With
    more than one, the base and the experts are scored while the merges are made, and a
    candidate's per-row progress is not shown.
    """
    prepare(experts=False)  # the recipes name LoRA experts; `zoo prepare` builds full weights
    loaded = []
    for path in task_files(split, list(tasks) if tasks else None):
        task = load_task(path, limit=limit)
        task.name = path.stem
        loaded.append(task)
    # All checked up front; zoo-ties.yaml is called "ties".
    parsed = [(Path(p).stem.removeprefix("zoo-"), parse_recipe(Path(p))) for p in recipes]
    dtype = choose_dtype(dtype, device).name  # decided once, here, not again in every worker
    if workers is not None and workers < 1:
        raise MergeArenaError(f"--workers must be at least 1, got {workers}")
    rows: list[Row] = []
    if include_base:
        rows.append(Row("base", "base", BASE_REF))
    if include_experts:
        rows += [Row(name, "expert", BASE_REF, str(adapter_dir(name))) for name in expert_names()]
    rows += [Row(name, "merge", str(out / "merges" / name)) for name, _ in parsed]
    processes = workers or scoring_workers(device, len(rows))
    with atomic_directory(out, overwrite=overwrite) as staging:
        where = {r.name: r.model for r in rows if r.kind != "merge"}
        where.update({name: str(staging / "merges" / name) for name, _ in parsed})

        def scored(row: Row, scores: dict[str, float], seconds: float) -> None:
            row.scores = scores
            row.average = round(sum(scores.values()) / len(scores), 4)
            row.seconds = round(row.seconds + seconds, 1)
            log(f"scored {row.name}: average {row.average:.4f} ({row.seconds:.0f} s)")

        merge_rows = {r.name: r for r in rows if r.kind == "merge"}

        def merged(name: str, recipe: Any) -> Row:
            started = time.perf_counter()
            merge(recipe, where[name])
            row = merge_rows[name]
            row.seconds = time.perf_counter() - started
            log(f"merged {name} ({recipe.method.name}) in {row.seconds:.1f} s")
            return row

        arguments = (loaded, device, dtype, batch_size)
        if processes == 1:
            for name, recipe in parsed:
                merged(name, recipe)
            for row in rows:
                scored(row, *_score(where[row.name], row.adapter, *arguments, progress))
        else:
            _score_in_processes(rows, parsed, where, arguments, processes, merged, scored)
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


def _score_in_processes(
    rows: list[Row],
    parsed: list[tuple[str, Any]],
    where: dict[str, str],
    arguments: tuple[Sequence[Any], str, str, int | str],  # _score's tasks, device, dtype, batch
    processes: int,
    merged: Callable[[str, Any], Row],
    scored: Callable[[Row, dict[str, float], float], None],
) -> None:
    """Score ``rows`` in ``processes`` new processes that share the cores: the base and the
    experts from the start, each merge as soon as this process has made it."""
    pool = ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),  # torch's threads do not survive a fork
        initializer=_start_worker,
        initargs=(max(1, _cores() // processes),),
    )
    pending = {}
    try:
        for row in rows:
            if row.kind != "merge":
                pending[pool.submit(_score, where[row.name], row.adapter, *arguments, False)] = row
        for name, recipe in parsed:
            pending[pool.submit(_score, where[name], None, *arguments, False)] = merged(
                name, recipe
            )
        for future in as_completed(pending):
            scored(pending[future], *future.result())
    except BrokenProcessPool as error:
        raise MergeArenaError(
            f"a scoring process died ({error}): if memory ran short for {processes} models at "
            f"once, pass --workers 1"
        ) from None
    finally:
        pool.shutdown(cancel_futures=True)


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
