"""Score a submission's predictions against a task's hidden targets, outside the sandbox.

The run wrote ``predictions/<task>.csv`` (``id,prediction``: a choice index for multiple choice,
text for generation), exactly as ``mergearena eval`` does, with mergearena's scorer or the
submission's own code (``arena.inference``, which checked it already). Whatever the sandbox wrote
is untrusted, so it is checked again here: the file must be a regular file inside the job's
directory (a link could name a host file, whose text would then show in the error), with the
header ``id,prediction`` and every row id of the task exactly once, a choice index in range for
multiple choice (or ``-1``, no answer: what chain of thought predicts when it reads no answer
letter, counted wrong as ``mergearena eval`` counts it). A file that breaks a rule is refused
(``RejectedOutput``: the job fails with a message naming the task, the row ids and what was
wrong), never partly scored.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import statistics
from dataclasses import dataclass
from pathlib import Path

from mergearena.errors import SubmissionError
from mergearena.evaluation.metrics import generation_metrics
from mergearena.evaluation.tasks import MULTIPLE_CHOICE, Task

MAX_PREDICTION_CHARS = 20_000  # a longer generation is scored on its start
MAX_FILE_BYTES = 256 * 2**20
MAX_PROBLEMS = 10  # listed in the message; the rest are counted
NO_ANSWER = "-1"  # a multiple-choice row answered by no choice (a chain of thought's miss)


class RejectedOutput(SubmissionError):
    """What a sandboxed run wrote breaks a rule of its format."""


@dataclass
class TaskScore:
    name: str
    value: float  # the mean of the task's main metric, in [0, 1]


def read_untrusted(path: Path, root: Path, *, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The text of a file the sandbox wrote under ``root``: a regular file, not a link, in no
    linked directory, at most ``max_bytes``; else ``RejectedOutput``."""
    label = path.relative_to(root) if path.is_relative_to(root) else path.name
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise RejectedOutput(f"{label}: a link, not a file")
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RejectedOutput(f"{label}: missing") from None
    except OSError as error:
        raise RejectedOutput(f"{label}: cannot be read ({error.strerror})") from None
    with os.fdopen(descriptor, "rb") as handle:
        status = os.fstat(handle.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise RejectedOutput(f"{label}: not a regular file")
        # the size first, so a huge file is refused unread; the read is capped too (it may grow)
        data = b"" if status.st_size > max_bytes else handle.read(max_bytes + 1)
    if status.st_size > max_bytes or len(data) > max_bytes:
        raise RejectedOutput(f"{label}: larger than {max_bytes:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise RejectedOutput(
            f"{label}: not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); write "
            "predictions as UTF-8"
        ) from None


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else f"{text[:40]!r}..."


def _is_choice(prediction: str, count: int) -> bool:
    if prediction == NO_ANSWER:
        return True
    return prediction.isascii() and prediction.isdigit() and int(prediction) < count


def check_predictions(task: Task, text: str) -> dict[str, str]:
    """The prediction of each of ``task``'s rows from a predictions file's text; every row id
    exactly once, and no other. Anything else raises ``RejectedOutput`` listing the problems."""
    examples = {example.id: example for example in task.examples}
    rows: dict[str, str] = {}
    seen: dict[str, int] = {}
    problems: list[str] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header != ["id", "prediction"]:
            raise RejectedOutput(
                f"{task.name}: predictions file starts with {_short(','.join(header or []))}, "
                "not the header id,prediction"
            )
        for fields in reader:
            line = reader.line_num
            if len(fields) != 2:
                problems.append(f"line {line}: {len(fields)} field(s), not 2 (id,prediction)")
                continue
            key, prediction = fields
            where = f"row id {_short(key)} (line {line})"
            example = examples.get(key)
            if example is None:
                problems.append(f"{where}: not an id of this task")
            elif key in seen:
                problems.append(f"{where}: predicted twice (first on line {seen[key]})")
            elif example.eval_type == MULTIPLE_CHOICE and not _is_choice(
                prediction, len(example.choices)
            ):
                problems.append(
                    f"{where}: {_short(prediction)} is not a choice index (0 to "
                    f"{len(example.choices) - 1}, or {NO_ANSWER} for no answer)"
                )
            else:
                rows[key] = prediction[:MAX_PREDICTION_CHARS]
            seen.setdefault(key, line)
    except csv.Error as error:
        problems.append(f"line {reader.line_num}: malformed CSV ({error})")
    missing = [example.id for example in task.examples if example.id not in seen]
    if missing:
        listed = ", ".join(_short(key) for key in missing[:5])
        problems.append(
            f"{len(missing)} row id(s) without a prediction: {listed}"
            + (", ..." if len(missing) > 5 else "")
        )
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise RejectedOutput(
            f"{task.name}: predictions refused: {'; '.join(problems[:MAX_PROBLEMS])}"
            + (f"; and {more} more problem(s)" if more > 0 else "")
        )
    return rows


def score_task(task: Task, predictions: Path, *, root: Path) -> TaskScore:
    """Score the predictions file the sandbox wrote under ``root`` against ``task``'s targets;
    ``RejectedOutput`` if the file breaks a rule (see the module's docstring)."""
    rows = check_predictions(task, read_untrusted(predictions, root))
    metric = task.main_metric
    values: list[float] = []
    for example in task.examples:
        prediction = rows[example.id]
        if example.eval_type == MULTIPLE_CHOICE:
            values.append(float(int(prediction) == example.target))
        else:
            values.append(generation_metrics(prediction, str(example.target))[metric])
    return TaskScore(task.name, statistics.fmean(values))
