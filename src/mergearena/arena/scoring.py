"""Score a submission's predictions against a task's hidden targets, outside the sandbox.

The submission wrote ``predictions/<task>.csv`` (``id,prediction``: a choice index for multiple
choice, text for generation), exactly as ``mergearena eval`` does. Whatever it wrote is untrusted:
a missing, unknown or malformed row scores zero for its example and is reported, never trusted.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from mergearena.evaluation.metrics import generation_metrics
from mergearena.evaluation.tasks import MULTIPLE_CHOICE, Task

MAX_PREDICTION_CHARS = 20_000


@dataclass
class TaskScore:
    name: str
    value: float  # the mean of the task's main metric, in [0, 1]
    problems: list[str] = field(default_factory=list)


def read_predictions(path: Path) -> tuple[dict[str, str], list[str]]:
    """The rows of a predictions file by id, and what was wrong with it."""
    if not path.is_file():
        return {}, [f"{path.name}: missing"]
    problems: list[str] = []
    rows: dict[str, str] = {}
    csv.field_size_limit(MAX_PREDICTION_CHARS * 4)
    try:
        with path.open(newline="", encoding="utf-8", errors="replace") as handle:
            for row in csv.DictReader(handle):
                key, prediction = row.get("id"), row.get("prediction")
                if key is None or prediction is None:
                    return {}, [f"{path.name}: needs the columns id,prediction"]
                rows[key] = prediction[:MAX_PREDICTION_CHARS]
    except csv.Error as error:
        return {}, [f"{path.name}: malformed CSV ({error})"]
    return rows, problems


def score_task(task: Task, predictions: Path) -> TaskScore:
    rows, problems = read_predictions(predictions)
    metric = task.main_metric
    values: list[float] = []
    missing = invalid = 0
    for example in task.examples:
        prediction = rows.get(example.id)
        if prediction is None:
            missing += 1
            values.append(0.0)
        elif example.eval_type == MULTIPLE_CHOICE:
            try:
                choice = int(prediction)
            except ValueError:
                choice = -1
            if not 0 <= choice < len(example.choices):
                invalid += 1
            values.append(float(choice == example.target))
        else:
            values.append(generation_metrics(prediction, str(example.target))[metric])
    if missing:
        problems.append(f"{task.name}: {missing} example(s) without a prediction scored 0")
    if invalid:
        problems.append(f"{task.name}: {invalid} prediction(s) not a valid choice index scored 0")
    return TaskScore(task.name, statistics.fmean(values), problems)
