"""Run one arena submission inside the sandbox: merge it, predict the tasks, write predictions.

    python -m mergearena.arena.runner JOB.json

The worker writes a job file (``JobSpec``) and runs this module in the sandbox. The job names
task *input* files (``id,input,answer_choices,eval_type``, no targets: scoring against the hidden
targets happens outside the sandbox) and the directory to write:

- ``OUT/predictions/<task>.csv``: ``id,prediction`` as ``mergearena eval`` writes them (the chosen
  choice's index for multiple choice, the generated text otherwise);
- ``OUT/result.json``: ``{"status": "ok", "seconds", "merge_seconds", "models", "parameters",
  "method", "tasks"}``, or ``{"status": "error", "error"}``;
- ``OUT/model``: the merged model, kept only with ``keep_model`` (it can be large).

A submission is a recipe (YAML); a Python file with ``@merge_method`` functions and a module-level
``RECIPE`` that uses them; or a starter-kit checkout (see ``llm_merging.submission``). Every model
it names goes through the job's ``ModelPolicy`` (allowlist, parameter limit) before anything is
merged. The policy is a guard for honest code; the sandbox must still expose only allowed models.

Exit status: 0 done; 2 the job or the submission is wrong (stderr says what to fix, no
traceback); 1 anything else (a traceback on stderr).
"""

from __future__ import annotations

import fnmatch
import gc
import importlib.util
import json
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergearena.checkpoints import (
    Checkpoint,
    LoraAdapter,
    atomic_directory,
    copy_support_files,
    is_adapter_dir,
    resolve_model_ref,
)
from mergearena.checkpoints.lora import ADAPTER_BIN, ADAPTER_SAFETENSORS
from mergearena.errors import CheckpointError, MergeArenaError, SubmissionError
from mergearena.recipe import Recipe

RESULT_FILE = "result.json"


class JobSpec(BaseModel):
    """One job, as the worker writes it to JOB.json. Relative paths are relative to the cwd."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["recipe", "code"]
    submission: str  # recipe YAML | a .py file (method API) | a starter-kit directory
    tasks: list[str] = Field(min_length=1)  # task input CSVs (a sidecar may sit beside each)
    out: str
    allowed_models: list[str] = Field(default_factory=list)  # model references; empty: any
    max_parameters: int | None = Field(default=None, ge=1)
    device: str = "cpu"
    dtype: str = "bfloat16"  # evaluation dtype
    batch_size: int | Literal["auto"] = "auto"
    mc_rule: Literal["loglik", "starter-kit"] | None = None  # None: each task's sidecar, or loglik
    method: str | None = None  # starter kit: which registered method to run
    keep_model: bool = False


def load_job(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeArenaError(f"{path}: cannot read the job file ({error})") from None
    return parse_job(data, str(path))


def parse_job(data: Any, label: str = "job") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or '(top)'}: {item['msg']}"
            for item in error.errors()
        )
        raise MergeArenaError(f"{label}: invalid job: {problems}") from None


# ------------------------------------------------------------------------------------ model policy


def count_parameters(path: Path) -> int:
    """Parameters stored in a model or adapter directory, from its weight files' headers only."""
    if is_adapter_dir(path):
        files = [path / n for n in (ADAPTER_SAFETENSORS, ADAPTER_BIN) if (path / n).is_file()]
        checkpoint = Checkpoint.from_weight_files(path, files[:1])
    else:
        checkpoint = Checkpoint.open(path)
    with checkpoint:
        return sum(info.numel for info in checkpoint.tensors.values())


def is_listed(ref: str, allowed_models: Sequence[str]) -> bool:
    """Whether an allowlist admits ``ref``: empty admits all; an entry is a reference or a glob
    pattern (``zoo:*``), and a listed hub id admits itself at any revision (``org/name@rev``)."""
    name = ref.partition("@")[0]
    return not allowed_models or any(
        fnmatch.fnmatchcase(ref, allowed) or fnmatch.fnmatchcase(name, allowed)
        for allowed in allowed_models
    )


@dataclass
class ModelPolicy:
    """Which models a job may use: ``allowed_models`` (empty: any local model) and
    ``max_parameters`` (None: no limit). Every model a submission opens goes through ``resolve``,
    which records it in ``used``.

    A reference is allowed when it is listed, when it is a listed hub id at some revision
    (``org/name@rev`` for a listed ``org/name``), or when it resolves to the directory a listed
    reference resolves to (``./models/base`` and its absolute path are one model).
    """

    allowed_models: Sequence[str] = ()
    max_parameters: int | None = None
    used: list[str] = field(default_factory=list)
    _allowed_paths: set[Path] | None = field(default=None, init=False, repr=False)

    def _listed(self, ref: str) -> bool:
        return is_listed(ref, self.allowed_models)

    def _resolves_to_allowed(self, path: Path) -> bool:
        if self._allowed_paths is None:
            self._allowed_paths = set()
            for allowed in self.allowed_models:
                try:
                    self._allowed_paths.add(resolve_model_ref(allowed).resolve())
                except CheckpointError:
                    continue  # an allowed model missing here cannot be what ``path`` is
        return path in self._allowed_paths

    def _refusal(self, ref: str) -> SubmissionError:
        return SubmissionError(
            f"model {ref!r} is not allowed in this competition; the allowed models are: "
            f"{', '.join(self.allowed_models)}"
        )

    def resolve(self, ref: str) -> Path:
        """The local directory of ``ref``, or a ``SubmissionError`` if the job refuses it."""
        listed = self._listed(ref)
        try:
            path = resolve_model_ref(ref).resolve()
        except CheckpointError:
            if not listed:
                raise self._refusal(ref) from None
            raise
        if not listed and not self._resolves_to_allowed(path):
            raise self._refusal(ref)
        if self.max_parameters is not None:
            count = count_parameters(path)
            if count > self.max_parameters:
                raise SubmissionError(
                    f"model {ref!r} has {count:,} parameters, more than this competition's limit "
                    f"of {self.max_parameters:,}; pick a smaller model"
                )
        if ref not in self.used:
            self.used.append(ref)
        return path


def check_recipe_models(recipe: Recipe, policy: ModelPolicy) -> None:
    """Pass every model the recipe's merge would open through ``policy`` (the engine's rules:
    ``model+adapter``; an adapter without ``base_model`` loads the base its config names)."""
    if recipe.base_model:
        policy.resolve(recipe.base_model)
    for entry in recipe.models:
        model, plus, adapter = entry.model.partition("+")
        if plus and not Path(entry.model).exists():
            policy.resolve(model)
            policy.resolve(adapter)
            continue
        path = policy.resolve(entry.model)
        if recipe.base_model is None and is_adapter_dir(path):
            with LoraAdapter.open(path) as lora:
                declared = lora.base_model_name_or_path
            if declared:
                policy.resolve(declared)
    if recipe.tokenizer_source not in (None, "base"):
        policy.resolve(recipe.tokenizer_source)


# ------------------------------------------------------------------------------------ submissions


def _merge_recipe(recipe: Recipe, model_dir: Path, spec: JobSpec, policy: ModelPolicy) -> str:
    from mergearena.engine import merge

    check_recipe_models(recipe, policy)
    merge(recipe, model_dir, device=spec.device, overwrite=True)
    return recipe.method.name


def load_method_file(path: Path) -> Recipe:
    """Import a method-API submission (a unique module name each time) and parse its RECIPE."""
    from mergearena.recipe import parse_recipe

    name = f"mergearena_submission_{uuid.uuid4().hex[:12]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and typing.get_type_hints look modules up here
    try:
        module_spec.loader.exec_module(module)
    except ValueError as error:
        if "registered twice" not in str(error):
            raise
        raise SubmissionError(
            f"{path}: {error}: a built-in method has that name; rename yours "
            "(`mergearena methods` lists the built-in names)"
        ) from None
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, dict | str):
        raise SubmissionError(
            f"{path}: needs a module-level RECIPE, a recipe as a dict or as YAML text (e.g. "
            "{'merge_method': 'my_method', 'models': [...]}); found "
            f"{type(recipe).__name__ if recipe is not None else 'none'}"
        )
    return parse_recipe(recipe)


def _merge_starter_kit(directory: Path, model_dir: Path, spec: JobSpec, policy: ModelPolicy) -> str:
    """Run a starter-kit method's ``merge()`` and save the model it leaves, in the job's dtype."""
    import torch

    from llm_merging import submission
    from mergearena.evaluation.model import parse_dtype

    package = submission.find_package(directory)
    with submission.installed(package, policy):
        name, method_class = submission.load_method(package, spec.method)
        method = method_class(name)
        method.device = torch.device(spec.device)  # the job's, not the one __init__ guessed
        models = list(method.list_models or [])
        if not all(isinstance(item, tuple | list) and len(item) == 2 for item in models):
            raise SubmissionError(
                f"{method_class.__name__}.list_models must be a list of (model_name, revision) "
                f"tuples, got {models!r}"
            )
        # Refuse a disallowed or oversized model before merge() spends time on the others.
        base_dir = submission.resolve(method.base_model_name, method.base_model_revision_id)
        for model_name, revision in models:
            submission.resolve(model_name, revision)
        returned = method.merge()
        model = returned if isinstance(returned, torch.nn.Module) else method.base_model
        if model is None:
            raise SubmissionError(
                f"{method_class.__name__}.merge() left no model: load the base model "
                "(self._load_base_model()), load the merged weights into it, and return it"
            )
        if hasattr(model, "merge_and_unload"):  # a PeftModel: fold the merged LoRA into weights
            model = model.merge_and_unload()
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model.to(parse_dtype(spec.dtype)).save_pretrained(model_dir)
        copy_support_files(base_dir, model_dir, config=False, tokenizer=True)
        del method, model, returned
    gc.collect()  # the merge's copies of the models go before the evaluation loads the result
    return name


def _merge(spec: JobSpec, model_dir: Path, policy: ModelPolicy) -> str:
    """Merge the submission into ``model_dir``; returns the merge method's name."""
    from mergearena.recipe import parse_recipe

    path = Path(spec.submission)
    if spec.kind == "recipe":
        if not path.is_file():
            raise SubmissionError(f"{path}: no such recipe file (a recipe is one YAML file)")
        return _merge_recipe(parse_recipe(path), model_dir, spec, policy)
    if path.is_file() and path.suffix == ".py":
        return _merge_recipe(load_method_file(path), model_dir, spec, policy)
    if path.is_dir():
        return _merge_starter_kit(path, model_dir, spec, policy)
    raise SubmissionError(
        f"{path}: a code submission is a .py file using mergearena's method API or a directory "
        "holding the starter kit's llm_merging package"
    )


# ------------------------------------------------------------------------------------ predictions


def write_predictions(results: Sequence[Any], directory: Path) -> None:
    """``<task>.csv`` files of ``id,prediction`` exactly as ``write_outputs`` writes them.

    Not ``write_outputs`` itself: it also writes one submission.csv for all target-less tasks,
    and refuses tasks whose ids overlap, which hidden tasks may well do.
    """
    from mergearena.evaluation.runner import write_csv

    with atomic_directory(directory, overwrite=True) as temporary:
        for result in results:
            rows = [(r.example.id, r.prediction_text) for r in result.examples]
            write_csv(temporary / f"{result.task.name}.csv", ("id", "prediction"), rows)


def _run(spec: JobSpec, out: Path, started: float) -> dict[str, Any]:
    from mergearena.errors import TaskError
    from mergearena.evaluation import LanguageModel, evaluate, load_task
    from mergearena.evaluation.model import parse_device, parse_dtype

    parse_device(spec.device)  # bad settings fail before the merge, not after it
    parse_dtype(spec.dtype)
    tasks = [load_task(path) for path in spec.tasks]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise TaskError(f"task files share a name ({', '.join(names)}); task names must differ")
    policy = ModelPolicy(spec.allowed_models, spec.max_parameters)
    model_dir = out / "model"

    merge_started = time.perf_counter()
    method = _merge(spec, model_dir, policy)
    merge_seconds = time.perf_counter() - merge_started
    print(f"merged with {method} in {merge_seconds:.1f} s: {', '.join(policy.used)}", flush=True)

    lm = LanguageModel.load(model_dir, device=spec.device, dtype=spec.dtype)
    parameters = sum(parameter.numel() for parameter in lm.model.parameters())
    results = evaluate(lm, tasks, mc_rule=spec.mc_rule, batch_size=spec.batch_size)
    del lm
    write_predictions(results, out / "predictions")
    for result in results:
        print(f"predicted {result.task.name}: {len(result.examples)} rows", flush=True)
    if not spec.keep_model:
        shutil.rmtree(model_dir)
    return {
        "status": "ok",
        "seconds": round(time.perf_counter() - started, 3),
        "merge_seconds": round(merge_seconds, 3),
        "method": method,
        "models": policy.used,
        "parameters": parameters,
        "tasks": {result.task.name: result.summary() for result in results},
    }


def _write_result(out: Path, document: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(document, indent=2) + "\n")


def run_job(spec: JobSpec | dict[str, Any]) -> dict[str, Any]:
    """Run a job; write OUT/predictions and OUT/result.json (also on failure) and return the
    result. Problems with the job or the submission raise ``MergeArenaError``."""
    started = time.perf_counter()
    job = spec if isinstance(spec, JobSpec) else parse_job(spec)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = _run(job, out, started)
    except Exception as error:
        _write_result(out, {"status": "error", "error": str(error) or type(error).__name__})
        raise
    _write_result(out, result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m mergearena.arena.runner JOB.json", file=sys.stderr)
        return 2
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a worker's log, not a terminal
    try:
        run_job(load_job(args[0]))
    except MergeArenaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
