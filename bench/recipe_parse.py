"""How long the bounded YAML loader takes on the largest recipes it reads or refuses.

The arena parses every uploaded recipe in its web server's thread pool (``recipe.load_yaml``:
``MAX_RECIPE_BYTES``, a value limit counted through aliases, an alias and a depth limit). This
times the slowest documents of that size: a flow list refused at the value limit, a block list,
a long string and a flat mapping, and a billion-leaf alias bomb.

    .venv/bin/python bench/recipe_parse.py
"""

from __future__ import annotations

import time

from mergearena.errors import MergeArenaError
from mergearena.recipe import MAX_RECIPE_BYTES, load_yaml


def documents(size: int) -> dict[str, str]:
    bomb = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
    )
    return {
        "flow list of 1s": ("x: [" + ",".join(["1"] * (size // 2)) + "]")[:size],
        "block list": ("x:\n" + "- 1\n" * (size // 4))[:size],
        "long string": "x: '" + "a" * (size - 10) + "'",
        "flat mapping": "".join(f"k{i}: 1\n" for i in range(size // 12)),
        "alias bomb (10^9 leaves)": bomb,
    }


def main() -> None:
    for name, text in documents(MAX_RECIPE_BYTES).items():
        started = time.perf_counter()
        try:
            load_yaml(text)
            outcome = "read"
        except MergeArenaError as error:
            outcome = f"refused: {str(error)[:60]}"
        seconds = time.perf_counter() - started
        print(f"{name:26s} {len(text):8,d} bytes {seconds:7.3f} s  {outcome}")


if __name__ == "__main__":
    main()
