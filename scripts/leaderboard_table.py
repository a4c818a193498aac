"""Print zoo leaderboards (``mergearena demo``'s ``leaderboard.json``) as docs/zoo.md's table.

python scripts/leaderboard_table.py /tmp/demo-full/leaderboard.json
python scripts/leaderboard_table.py /tmp/demo-full/leaderboard.json /tmp/searched/leaderboard.json

With several files (runs on the same split, tasks, device and dtype), a row of a later file
replaces the row of the same name in an earlier one, and the rows are ranked together; the note
under the table says which run each row came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SAME = ("split", "tasks", "device", "dtype")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("leaderboards", type=Path, nargs="+", help="leaderboard.json files")
    paths = parser.parse_args().leaderboards
    documents = [json.loads(path.read_text()) for path in paths]
    for path, document in zip(paths[1:], documents[1:], strict=True):
        differs = [key for key in SAME if document.get(key) != documents[0].get(key)]
        if differs:
            raise SystemExit(f"{path}: another {', '.join(differs)} than {paths[0]}")
    rows: dict[str, dict] = {}
    source: dict[str, Path] = {}
    for path, document in zip(paths, documents, strict=True):
        for row in document["rows"]:
            rows[row["name"]] = row
            source[row["name"]] = path
    ranked = sorted(rows.values(), key=lambda row: -row["average"])
    tasks = list(ranked[0]["scores"])
    columns = " | ".join(f"`{task}`" for task in tasks)
    print(f"| rank | model | kind | {columns} | **average** |")
    print("|---:|---|---|" + "---:|" * (len(tasks) + 1))
    for rank, row in enumerate(ranked, start=1):
        scores = " | ".join(f"{100 * row['scores'][task]:.1f}" for task in tasks)
        average = f"**{100 * row['average']:.1f}**"
        print(f"| {rank} | {row['name']} | {row['kind']} | {scores} | {average} |")
    first = documents[0]
    sizes = ", ".join(f"{task} {n}" for task, n in first["tasks"].items())
    print(f"\n{first['split']} split ({sizes}), {first['device']}, {first['dtype']}")
    if len(paths) > 1:
        for path in paths:
            names = [name for name in rows if source[name] == path]
            print(f"- from {path}: {', '.join(names) if names else 'no row kept'}")


if __name__ == "__main__":
    main()
