"""Score the competition winners' approaches on the zoo's test split: docs/zoo.md's winners table.

Each approach (``recipes/winners/``, the routed LoRA experts, the searched recipe) is merged (or
built), timed, counted, and scored with the inference its winner used; task arithmetic (the
hand-tuned recipe), the best single expert and the base are scored in the same run as the
references. The test split is read here, once, for this table; everything was tuned on
validation. Writes ``OUT/winners.json`` and prints the markdown table.

    python scripts/winners_table.py --out /tmp/winners --limit 50
    python scripts/winners_table.py --out /tmp/winners --limit 50 --only dare-ties-fewshot-cot base
    python scripts/winners_table.py --out /tmp/winners --table /tmp/winners/winners.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WINNERS = REPO / "recipes" / "winners"
EXPERTS = ["arithmetic", "question_type", "sentiment", "spam", "subject"]


@dataclass
class Approach:
    name: str
    origin: str  # who, and how it is run here
    recipe: Path | None = None  # merged with mergearena merge
    routed: bool = False  # built with mergearena route (prompt router)
    model: str | None = None  # scored as is (a zoo reference), with ``adapter``
    adapter: str | None = None
    evaluation: dict = field(default_factory=dict)  # mc_rule, fewshot, fewshot_from ("train")


APPROACHES = [
    Approach(
        "geometric-median-qv",
        "creative track: geometric median, q/v only",
        WINNERS / "geometric-median-qv.yaml",
    ),
    Approach(
        "geometric-median-all",
        "geometric median, every projection",
        WINNERS / "geometric-median-all.yaml",
    ),
    Approach("slerp", "2nd place: SLERP gradients, kit's rule", WINNERS / "slerp-2nd-place.yaml"),
    Approach(
        "slerp-cot",
        "2nd place: SLERP + CoT, 3 worked examples",
        WINNERS / "slerp-2nd-place.yaml",
        evaluation={"mc_rule": "cot"},
    ),
    Approach(
        "dare-ties", "efficiency: DARE-TIES, kit's rule", WINNERS / "dare-ties-efficiency.yaml"
    ),
    Approach(
        "dare-ties-fewshot",
        "efficiency: DARE-TIES + 3-shot",
        WINNERS / "dare-ties-efficiency.yaml",
        evaluation={"fewshot": 3, "fewshot_from": "train"},
    ),
    Approach(
        "dare-ties-fewshot-cot",
        "efficiency: DARE-TIES + 3-shot + CoT",
        WINNERS / "dare-ties-efficiency.yaml",
        evaluation={"fewshot": 3, "fewshot_from": "train", "mc_rule": "cot"},
    ),
    Approach("routed", "1st place family: routed LoRA experts, prompt router", routed=True),
    Approach(
        "searched",
        "3rd place family: mergearena search (validation only)",
        REPO / "recipes" / "zoo-searched.yaml",
    ),
    Approach(
        "task-arithmetic",
        "reference: hand-tuned task arithmetic",
        REPO / "recipes" / "zoo-task-arithmetic.yaml",
    ),
    Approach(
        "question_type-expert",
        "reference: the best single expert",
        model="zoo:smollm2-135m",
        adapter="zoo:question_type-lora",
    ),
    Approach("base", "reference: the base model", model="zoo:smollm2-135m"),
]


def build(approach: Approach, directory: Path) -> tuple[str, str | None, float]:
    """(model to load, adapter, seconds to merge or build)."""
    from mergearena.engine import merge
    from mergearena.routed.build import build_routed

    started = time.perf_counter()
    if approach.recipe is not None:
        merge(approach.recipe, directory)
        return str(directory), None, time.perf_counter() - started
    if approach.routed:
        experts = [f"zoo:{name}-lora" for name in EXPERTS]
        build_routed("zoo:smollm2-135m", experts, directory)
        return str(directory), None, time.perf_counter() - started
    assert approach.model is not None
    return approach.model, approach.adapter, 0.0


def parameters(lm) -> int:  # noqa: ANN001
    return sum(p.numel() for p in lm.model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("winners"))
    parser.add_argument("--limit", type=int, default=50, help="test rows per task (0: all)")
    parser.add_argument("--only", nargs="*", help="approach names (default: all)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--table", type=Path, help="only print the table of a winners.json")
    args = parser.parse_args()
    if args.table:
        print_table(args.table)
        return

    from mergearena.checkpoints.routed import count_parameters
    from mergearena.checkpoints.writer import write_atomic
    from mergearena.evaluation import evaluate_task, load_task
    from mergearena.models import LanguageModel
    from mergearena.zoo.prepare import prepare, task_files
    from mergearena.zoo.tasks import TASK_NAMES, tasks_dir

    prepare(experts=True)
    tasks = []
    for path in task_files("test", list(TASK_NAMES)):
        task = load_task(path, limit=args.limit or None)
        task.name = path.stem
        tasks.append(task)
    chosen = [a for a in APPROACHES if not args.only or a.name in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for approach in chosen:
            model, adapter, seconds = build(approach, Path(scratch) / approach.name)
            lm = LanguageModel.load(model, adapter=adapter, dtype=args.dtype)
            size = count_parameters(Path(model)) if approach.routed else parameters(lm)
            settings = dict(approach.evaluation)
            if settings.get("fewshot_from") == "train":
                settings["fewshot_from"] = tasks_dir() / "train"
            started = time.perf_counter()
            scores = {t.name: evaluate_task(lm, t, **settings).main_value for t in tasks}
            row = {
                **asdict(approach),
                "recipe": str(approach.recipe.relative_to(REPO)) if approach.recipe else None,
                "scores": scores,
                "average": sum(scores.values()) / len(scores),
                "merge_seconds": round(seconds, 1),
                "eval_seconds": round(time.perf_counter() - started, 1),
                "parameters": size,
            }
            rows.append(row)
            document = {
                "split": "test",
                "limit": args.limit,
                "dtype": args.dtype,
                "tasks": {t.name: len(t.examples) for t in tasks},
                "rows": rows,
            }  # written after every row: an interrupted run keeps what it scored
            text = json.dumps(document, indent=2, default=str) + "\n"
            write_atomic(args.out / "winners.json", text.encode())
            print(
                f"{approach.name}: average {row['average']:.4f} "
                f"(merge {seconds:.1f} s, scoring {row['eval_seconds']:.0f} s)",
                flush=True,
            )
            del lm
    print_table(args.out / "winners.json")


def print_table(path: Path) -> None:
    """The markdown table of a ``winners.json``, best average first."""
    document = json.loads(path.read_text())
    rows = document["rows"]
    names = list(rows[0]["scores"])
    print(
        "\n| approach | what | "
        + " | ".join(f"`{n}`" for n in names)
        + " | **average** | merge s | parameters |"
    )
    print("|---|---|" + "---:|" * (len(names) + 3))
    for row in sorted(rows, key=lambda r: -r["average"]):
        cells = " | ".join(f"{100 * row['scores'][n]:.1f}" for n in names)
        print(
            f"| {row['name']} | {row['origin']} | {cells} | **{100 * row['average']:.1f}** | "
            f"{row['merge_seconds']} | {row['parameters'] / 1e6:.1f} M |"
        )
    sizes = ", ".join(f"{n} {c}" for n, c in document["tasks"].items())
    print(f"\ntest split ({sizes}), dtype {document['dtype']}")


if __name__ == "__main__":
    main()
