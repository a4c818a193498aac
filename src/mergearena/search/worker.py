"""One search worker: merges candidates in memory and scores them a task at a time.

A worker keeps, from one trial to the next, the loaded model (each candidate's weights are copied
into it), the tasks, and the inputs every merge reads (``engine.TensorCache``: the base and each
expert's weights with its delta applied). The study asks it to ``merge`` a recipe and then to
``score`` one task after another, so a bad candidate can be pruned after its first tasks. The
same class runs in the searching process (``--workers 1``) or as a Ray actor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from mergearena.engine import TensorCache, iter_output_tensors, merge_to_state_dict
from mergearena.errors import MergeArenaError
from mergearena.evaluation import evaluate_task, load_task
from mergearena.models import LanguageModel


@dataclass(frozen=True)
class TaskSpec:
    """A task a worker loads: a CSV path, its name, and which of its rows to score."""

    path: str
    name: str
    limit: int | None = None  # rows from the start (after the holdout is taken out)
    holdout: float = 0.0  # the fraction of rows kept out of the objective, taken from the end
    part: str = "search"  # "search": rows before the holdout; "holdout": the rows kept out


def load_rows(spec: TaskSpec) -> Any:
    """The task with only the rows ``spec`` names; the split is the same in every process."""
    task = load_task(spec.path)
    task.name = spec.name
    rows = task.examples
    kept = len(rows) - round(len(rows) * spec.holdout)
    rows = rows[:kept] if spec.part == "search" else rows[kept:]
    if spec.limit:
        rows = rows[: spec.limit]
    if not rows:
        raise MergeArenaError(
            f"task {spec.name} ({spec.path}) has no {spec.part} rows left "
            f"(holdout {spec.holdout}, limit {spec.limit}); use fewer holdout rows or more data"
        )
    task.examples = rows
    return task


class TrialWorker:
    """Merges and scores candidates for one study; see the module docstring."""

    def __init__(
        self,
        base: str,
        tasks: list[TaskSpec],
        *,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int | str = "auto",
        threads: int | None = None,
        cache_bytes: int = 0,
        delta_from: str | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.base, self.device, self.dtype, self.batch_size = base, device, dtype, batch_size
        self.tasks = [load_rows(spec) for spec in tasks]
        self.cache = TensorCache(cache_bytes)
        self.lm: Any = None
        self.delta_from = delta_from
        self._origin: dict[str, torch.Tensor] | None = None

    def pid(self) -> int:
        return os.getpid()

    def merge(self, document: dict[str, Any]) -> float | None:
        """Merge ``document`` into the worker's model; returns the L1 norm of its difference from
        ``delta_from`` (the 3rd place's "size of the merged delta"), or None without one."""
        weights = merge_to_state_dict(document, device=self.device, cache=self.cache)
        if self.lm is None:
            self.lm = LanguageModel.from_state_dict(
                self.base, weights, device=self.device, dtype=self.dtype, name="candidate"
            )
        else:
            self.lm.load_weights(weights, source=self.base)
        return self._delta_l1(weights, self.delta_from) if self.delta_from else None

    def _delta_l1(self, weights: dict[str, torch.Tensor], delta_from: str) -> float:
        if self._origin is None:
            self._origin = {
                name: tensor.to(self.device)
                for name, tensor in iter_output_tensors(delta_from)
                if tensor.is_floating_point()
            }
        total = 0.0
        for name, origin in self._origin.items():
            total += float((weights[name].float() - origin.float()).abs().sum())
        return total

    def score(self, index: int) -> float:
        """Task ``index``'s main metric for the model last merged."""
        result = evaluate_task(self.lm, self.tasks[index], batch_size=self.batch_size)
        return float(result.main_value or 0.0)
