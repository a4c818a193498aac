"""Print a zoo leaderboard (``mergearena demo``'s ``leaderboard.json``) as the README's table.

python scripts/leaderboard_table.py /tmp/demo-full/leaderboard.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("leaderboard", type=Path, help="leaderboard.json written by demo")
    document = json.loads(parser.parse_args().leaderboard.read_text())
    rows = document["rows"]
    tasks = list(rows[0]["scores"])
    columns = " | ".join(f"`{task}`" for task in tasks)
    print(f"| rank | model | kind | {columns} | **average** |")
    print("|---:|---|---|" + "---:|" * (len(tasks) + 1))
    for rank, row in enumerate(rows, start=1):
        scores = " | ".join(f"{100 * row['scores'][task]:.1f}" for task in tasks)
        average = f"**{100 * row['average']:.1f}**"
        print(f"| {rank} | {row['name']} | {row['kind']} | {scores} | {average} |")
    sizes = ", ".join(f"{task} {n}" for task, n in document["tasks"].items())
    print(f"\n{document['split']} split ({sizes}), {document['device']}, {document['dtype']}")


if __name__ == "__main__":
    main()
