"""``mergearena zoo prepare``: the base checkpoint, the task files and the full-weight experts,
built once into the cache. Nothing else builds them: resolving ``zoo:NAME`` only looks."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mergearena.errors import TaskError
from mergearena.zoo import tasks as zoo_tasks
from mergearena.zoo.base import prepare_base
from mergearena.zoo.catalog import build_experts


def _tasks_problem(directory: Path) -> str | None:
    """Why the task files in ``directory`` cannot be used as they are, or None."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no readable manifest.json"
    for name in zoo_tasks.TASK_NAMES:
        for split in zoo_tasks.SPLITS:
            if not zoo_tasks.task_csv(directory, name, split).is_file():
                return f"{split}/{name}.csv is missing"
    if manifest.get("tasks", manifest).keys() < set(zoo_tasks.TASK_NAMES):
        return "the manifest lists other tasks (built by another mergearena version)"
    return None


def prepare_tasks(*, allow_download: bool = True, force: bool = False) -> Path:
    directory = zoo_tasks.tasks_dir()
    problem = "rebuild asked for" if force else _tasks_problem(directory)
    if problem is None:
        return directory
    if directory.exists():
        print(f"zoo tasks at {directory}: {problem}; rebuilding them", file=sys.stderr)
    print("building the zoo's task files (once) ...", file=sys.stderr)
    zoo_tasks.write_tasks(directory, allow_download=allow_download)
    return directory


@dataclass(frozen=True)
class Prepared:
    base: Path
    tasks: Path
    experts: list[Path]  # the full-weight experts zoo:<task>, when asked for


def prepare(
    *,
    allow_download: bool = True,
    force: bool = False,
    verify: bool = False,
    experts: bool = True,
) -> Prepared:
    """Everything the zoo needs; a second run only checks the caches (well under a second).

    ``experts`` also builds the full-weight experts ``zoo:<task>`` (270 MB and a few seconds
    each, once), which only recipes that name them need: the LoRA experts ``zoo:<task>-lora``
    are committed.
    """
    base = prepare_base(allow_download=allow_download, force=force, verify=verify)
    tasks = prepare_tasks(allow_download=allow_download, force=force)
    return Prepared(base, tasks, build_experts(force=force) if experts else [])


def task_files(split: str, names: list[str] | None = None) -> list[Path]:
    """The prepared CSV files of ``split`` for ``names`` (all zoo tasks by default)."""
    if split not in zoo_tasks.SPLITS:
        raise TaskError(f"unknown split {split!r}; the zoo has {', '.join(zoo_tasks.SPLITS)}.")
    chosen = names or list(zoo_tasks.TASK_NAMES)
    unknown = [n for n in chosen if n not in zoo_tasks.TASK_NAMES]
    if unknown:
        raise TaskError(
            f"unknown zoo task {unknown[0]!r}; the zoo has {', '.join(zoo_tasks.TASK_NAMES)}."
        )
    directory = zoo_tasks.tasks_dir()
    problem = _tasks_problem(directory)
    if problem is not None:
        raise TaskError(f"the zoo's tasks are not ready ({problem}); run `mergearena zoo prepare`.")
    return [zoo_tasks.task_csv(directory, name, split) for name in chosen]
