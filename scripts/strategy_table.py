"""Print a markdown table of accuracy per task (rows) and inference strategy (columns), read from
the scores.json of `mergearena eval` output directories: the tables of docs/evaluation.md
("Inference strategies").

    .venv/bin/python scripts/strategy_table.py loglik=/tmp/ev/loglik letter=/tmp/ev/letter \
        3-shot=/tmp/ev/fewshot-zoo,/tmp/ev/fewshot-cosmos cot=/tmp/ev/cot

A column may join the tasks of several directories (comma-separated). A task that a column lacks
shows as a dash (the run refused it, or was not made). Cells are accuracy in percent; a cell
over fewer rows than the table's usual count says how many; chain-of-thought cells add the share
of reasonings from which an answer letter was read. The last rows are the mean over the tasks a
column has and its total seconds.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path


def read_column(directories: str) -> dict[str, dict]:
    tasks: dict[str, dict] = {}
    for directory in directories.split(","):
        scores = Path(directory) / "scores.json"
        if scores.is_file():
            tasks.update(json.loads(scores.read_text())["tasks"])
    return tasks


def cell(entry: dict | None, usual_n: int) -> str:
    if entry is None or not entry.get("scored"):
        return "—"
    text = f"{100 * entry['main']:.1f}"
    if entry["n"] != usual_n:
        text += f" (n={entry['n']})"
    answered = entry.get("metrics", {}).get("answered")
    if answered is not None:
        text += f" (letter read {100 * answered:.0f}%)"
    return text


def table(columns: dict[str, dict[str, dict]]) -> str:
    names: list[str] = []
    for tasks in columns.values():
        names += [name for name in tasks if name not in names]
    usual_n = Counter(e["n"] for tasks in columns.values() for e in tasks.values()).most_common(1)
    n = usual_n[0][0] if usual_n else 0
    lines = [
        "| task | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name in names:
        row = [cell(tasks.get(name), n) for tasks in columns.values()]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    means, seconds = [], []
    for tasks in columns.values():
        values = [e["main"] for e in tasks.values() if e.get("scored")]
        means.append(f"{100 * statistics.fmean(values):.1f}" if values else "—")
        total = sum(e.get("seconds", 0.0) for e in tasks.values())
        seconds.append(f"{total:.0f}" if tasks else "—")
    lines.append("| mean of its tasks | " + " | ".join(means) + " |")
    lines.append("| seconds | " + " | ".join(seconds) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    columns = {label: read_column(dirs) for label, dirs in (a.split("=", 1) for a in argv)}
    print(table(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
