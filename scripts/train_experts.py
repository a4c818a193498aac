"""Train the zoo's LoRA experts and write their cards: how every committed adapter was made.

For each task: train on its train split with the settings in ``EXPERT_SETTINGS``, score the base
and the expert on the validation split (never the test split), and write the adapter with
``card.json`` and ``README.md`` into ``--out-dir/<task>`` (default: the package's
``zoo/experts``).

    python scripts/train_experts.py --device cuda            # about a minute per expert on an H100
    python scripts/train_experts.py --device cpu --tasks spam   # CPU works too, slowly

By default the base is ``zoo:smollm2-135m`` and the data the prepared zoo (`mergearena zoo
prepare`); ``--base`` and ``--tasks-dir`` point elsewhere (the GPU machine has no zoo cache).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mergearena.checkpoints.refs import resolve_model_ref
from mergearena.evaluation import evaluate, load_task
from mergearena.models import LanguageModel
from mergearena.zoo import tasks as zoo_tasks
from mergearena.zoo.catalog import CARD_DATA, EXPERTS_DIR
from mergearena.zoo.train import TrainSettings, train_expert

# One entry per expert; what is not set takes TrainSettings' defaults.
EXPERT_SETTINGS: dict[str, dict] = {
    "sentiment": {"steps": 300},
    "question_type": {"steps": 300},
    "spam": {"steps": 300},
    "arithmetic": {"steps": 600},
    "subject": {"steps": 300},
}


def score(lm: LanguageModel, path: Path, name: str, batch_size: int) -> float:
    task = load_task(path)
    task.name = name
    (result,) = evaluate(lm, [task], batch_size=batch_size)
    return result.main_value


def card_markdown(task: str, data: dict) -> str:
    training, validation, settings = (
        data["training"],
        data["validation"],
        data["training"]["settings"],
    )
    rows = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    return f"""# zoo:{task}-lora — the {task} expert

A PEFT LoRA adapter on `zoo:smollm2-135m` (SmolLM2-135M-Instruct), trained by
`scripts/train_experts.py` on the `{task}` task's **train** split only.

- data: {zoo_tasks.TASK_SOURCES[task]}; {training["train_examples"]} train examples,
  {training["epochs"]} epochs
- trained on {training["device"]} in {training["seconds"]} s; loss {training["loss_first_25"]}
  (first 25 steps) → {training["loss_last_25"]} (last 25)
- validation {validation["metric"]} ({validation["n"]} examples): base **{validation["base"]:.4f}**,
  this expert **{validation["expert"]:.4f}**
- use: `zoo:{task}-lora` (adapter) or `zoo:{task}` (full weights, built by `mergearena zoo prepare`)

| setting | value |
|---|---|
{rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(EXPERT_SETTINGS))
    parser.add_argument("--base", default="zoo:smollm2-135m")
    parser.add_argument("--tasks-dir", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=EXPERTS_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    parser.add_argument("--steps", type=int, default=None, help="override every expert's steps")
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="do not train: score the adapters already in --out-dir, write cards",
    )
    args = parser.parse_args()
    if args.tasks_dir is None:
        args.tasks_dir = zoo_tasks.tasks_dir()
    eval_batch = args.batch_size or (64 if args.device == "cuda" else 8)
    base_dir = resolve_model_ref(args.base)
    base_lm = LanguageModel.load(base_dir, device=args.device, dtype="float32")
    for task in args.tasks:
        settings = TrainSettings(**EXPERT_SETTINGS[task])
        if args.steps:
            settings.steps = args.steps
        train = load_task(zoo_tasks.task_csv(args.tasks_dir, task, "train"))
        train.name = task
        validation = zoo_tasks.task_csv(args.tasks_dir, task, "validation")
        out = args.out_dir / task
        started = time.perf_counter()
        if args.score_only:  # the record from training.json, or from an earlier card
            previous = out / "training.json"
            record = (
                json.loads(previous.read_text())
                if previous.is_file()
                else json.loads((out / CARD_DATA).read_text())["training"]
            )
        else:
            record = train_expert(
                base_dir,
                train,
                out,
                settings,
                device=args.device,
                base_ref=args.base,
                overwrite=True,
            )
        expert = LanguageModel.load(base_dir, adapter=out, device=args.device, dtype="float32")
        metric = load_task(validation).main_metric
        data = {
            "task": task,
            "training": record,
            "validation": {
                "metric": metric,
                "n": len(load_task(validation).examples),
                "base": score(base_lm, validation, task, eval_batch),
                "expert": score(expert, validation, task, eval_batch),
                "device": args.device,
            },
        }
        (out / CARD_DATA).write_text(json.dumps(data, indent=2) + "\n")
        (out / "README.md").write_text(card_markdown(task, data))
        print(
            f"{task}: validation {metric} base {data['validation']['base']:.4f} → expert "
            f"{data['validation']['expert']:.4f} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        del expert
    print(json.dumps({t: asdict(TrainSettings(**EXPERT_SETTINGS[t])) for t in args.tasks}))


if __name__ == "__main__":
    main()
