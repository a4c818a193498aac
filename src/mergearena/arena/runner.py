"""Run one arena submission inside the sandbox: merge it, predict the tasks, write predictions.

    python -m mergearena.arena.runner JOB.json

The worker writes a job file (``JobSpec``) and runs this module in the sandbox. The job names
task *input* files (``id,input,answer_choices,eval_type``, no targets: scoring against the hidden
targets happens outside the sandbox) and the directory to write:

- ``OUT/predictions/<task>.csv``: ``id,prediction`` as ``mergearena eval`` writes them (the chosen
  choice's index for multiple choice, the generated text otherwise);
- ``OUT/result.json``: ``{"status": "ok", "seconds", "merge_seconds", "models", "parameters",
  "peak_gpu_bytes", "method", "own_inference", "tasks"}``, or ``{"status": "error", "error"}``;
- ``OUT/model``: the merged model, kept only with ``keep_model`` (it can be large).

A submission is a recipe (YAML); a Python file with ``@merge_method`` functions and a module-level
``RECIPE`` that uses them; a starter-kit checkout (see ``llm_merging.submission``); or a routed
model, the directory ``mergearena route`` writes (no code: the base plus LoRA experts and a router,
kept as they are rather than merged, and scored like any model). Every model it names goes
through the job's ``ModelPolicy`` (allowlist, parameter limit) before anything is merged. The
policy is a guard for honest code; the sandbox mounts only the allowed models
(``policy.model_mounts``), so code that skips it finds no other.

The submission's own inference. A starter-kit method class that overrides
``predict_multiple_choice`` or ``generate`` (a method that is not ``Merges``'s own), or a
single-file submission that defines a module-level function of that name, predicts the rows of
that eval type itself; rows of a type it does not override keep mergearena's batched scorer
(whose predictions equal the kit's). The runner calls it after the merge, in the sandbox, within
the job's time limit (which covers the whole run: merge and inference), the way the starter kit's
evaluation loop did: under ``torch.no_grad()``, one example per batch, a batch being a dict of
lists, one value per example::

    {"id": ["q1"], "input": ["..."], "answer_choices": ["['yes', 'no']"],
     "eval_type": ["multiple_choice"]}
    {"id": ["g1"], "input": ["..."], "eval_type": ["generation"]}

``id`` is the row id (text); ``input`` the raw input, with no template or few-shot examples (the
code does its own prompting); ``answer_choices`` the choices as a Python list literal, as the CSV
holds it (``ast.literal_eval`` it); there is no ``target``. The functions and what they return::

    # starter kit: methods of the Merges subclass, after merge() (self.base_model, tokenizers...)
    def predict_multiple_choice(self, batch) -> (predicted_choice, answer_choice_scores)
    def generate(self, batch) -> (generated_ids, generated_texts)
    # single file: module-level functions on the merged model (the job's device and dtype, in
    # eval mode) and its tokenizer (a pad token set; padding side as the checkpoint has it)
    def predict_multiple_choice(model, tokenizer, batch) -> (predicted_choice, answer_choice_scores)
    def generate(model, tokenizer, batch) -> (generated_ids, generated_texts)

``predicted_choice`` holds one integer choice index per example (a 1-D tensor, an array or a
list), ``generated_texts`` one ``str`` per example; ``answer_choice_scores`` and
``generated_ids`` are not read (None will do). Anything else, or an exception, fails the job
with a message naming the task and row id (and the traceback).

Exit status: 0 done; 2 the job or the submission is wrong (stderr says what to fix; a traceback
only above the submission's own inference failing); 1 anything else (a traceback on stderr).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergearena.arena.policy import ModelPolicy, count_parameters
from mergearena.checkpoints import atomic_directory, copy_support_files
from mergearena.checkpoints.lora import ADAPTER_SAFETENSORS
from mergearena.errors import CheckpointError, MergeArenaError, SubmissionError
from mergearena.recipe import Recipe

if TYPE_CHECKING:
    from mergearena.arena.inference import Hooks
    from mergearena.checkpoints.routed import Manifest
    from mergearena.evaluation import Task

RESULT_FILE = "result.json"


class JobSpec(BaseModel):
    """One job, as the worker writes it to JOB.json. Relative paths are relative to the cwd."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["recipe", "code", "routed"]
    # recipe YAML | a .py file (method API) | a starter-kit directory | a routed model's directory
    submission: str
    tasks: list[str] = Field(min_length=1)  # task input CSVs (a sidecar may sit beside each)
    out: str
    allowed_models: list[str] = Field(default_factory=list)  # model references; empty: any
    max_parameters: int | None = Field(default=None, ge=1)
    device: str = "cpu"
    dtype: str = "auto"  # evaluation dtype; auto: bf16 on CUDA and bf16-capable CPUs, else fp32
    batch_size: int | Literal["auto"] = "auto"
    mc_rule: str | None = None  # one of MC_RULES; None: each task's sidecar, or loglik
    fewshot: int | None = Field(None, ge=0)  # solved examples per question; None: as the task's
    cot: dict[str, Any] | None = None  # CotSettings keys over each task's, under mc_rule cot
    method: str | None = None  # starter kit: which registered method to run
    calibration: str | None = None  # the competition's calibration files (<name>.csv), read-only
    keep_model: bool = False

    @field_validator("mc_rule")
    @classmethod
    def _known_rule(cls, rule: str | None) -> str | None:
        from mergearena.evaluation.tasks import MC_RULES  # the rules a competition may set

        if rule is not None and rule not in MC_RULES:
            raise ValueError(f"{rule!r} is not one of {', '.join(MC_RULES)}")
        return rule

    @field_validator("cot")
    @classmethod
    def _valid_cot(cls, cot: dict[str, Any] | None) -> dict[str, Any] | None:
        from mergearena.evaluation.tasks import check_cot_overrides

        return None if cot is None else check_cot_overrides(cot)


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


# ------------------------------------------------------------------------------------ submissions


def _merge_recipe(recipe: Recipe, model_dir: Path, spec: JobSpec, policy: ModelPolicy) -> str:
    from mergearena.engine import merge

    # The engine's planner passes every model the merge uses (in any position) through the
    # policy, before anything is merged.
    merge(recipe, model_dir, device=spec.device, overwrite=True, resolve=policy.resolve)
    return recipe.method.name


def load_method_file(path: Path) -> tuple[Recipe, ModuleType]:
    """Import a method-API submission (a unique module name each time) and parse its RECIPE;
    returns the recipe and the module (which may define prediction hooks)."""
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
    return parse_recipe(recipe), module


@dataclass
class Merged:
    """A merged submission: its method's name and its own prediction code (``hooks``, usable
    only inside the ``with`` block that yields it: they hold the merged model)."""

    method: str
    hooks: Hooks


@contextlib.contextmanager
def _method_file(
    path: Path, model_dir: Path, spec: JobSpec, policy: ModelPolicy
) -> Iterator[Merged]:
    """Merge a single-file submission's RECIPE; its hooks, if any, run on the merged model."""
    from mergearena.arena.inference import Hooks, bind_module_hooks, module_hook_functions
    from mergearena.models import LanguageModel

    recipe, module = load_method_file(path)
    functions = module_hook_functions(module, path.name)  # a bad signature fails before merging
    name = _merge_recipe(recipe, model_dir, spec, policy)
    if not functions:
        yield Merged(name, Hooks(path.stem))
        return
    lm = LanguageModel.load(model_dir, device=spec.device, dtype=spec.dtype)
    merged = Merged(name, bind_module_hooks(functions, lm.model, lm.tokenizer, path.stem))
    try:
        yield merged
    finally:
        merged.hooks = Hooks(path.stem)
        del lm


@contextlib.contextmanager
def _starter_kit(
    directory: Path, model_dir: Path, spec: JobSpec, policy: ModelPolicy
) -> Iterator[Merged]:
    """Run a starter-kit method's ``merge()``, yield its overridden prediction methods, then save
    the model it left, in the job's dtype."""
    import torch

    from llm_merging import resolution, submission
    from mergearena.arena.inference import Hooks, starter_kit_hooks
    from mergearena.models import parse_dtype

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
        base_dir = resolution.resolve(method.base_model_name, method.base_model_revision_id)
        for model_name, revision in models:
            resolution.resolve(model_name, revision)
        returned = method.merge()
        # A transformers or PEFT model of the submission's making, used by duck typing as the
        # starter kit does (merge_and_unload, save_pretrained): no one class declares them all.
        model: Any = returned if isinstance(returned, torch.nn.Module) else method.base_model
        if model is None:
            raise SubmissionError(
                f"{method_class.__name__}.merge() left no model: load the base model "
                "(self._load_base_model()), load the merged weights into it, and return it"
            )
        # Its own inference sees the method as merge() left it, as in the starter kit; saving
        # comes after, since it folds LoRA layers and casts the model in place.
        merged = Merged(name, starter_kit_hooks(method))
        try:
            yield merged
        finally:
            merged.hooks = Hooks(method_class.__name__)
        if hasattr(model, "merge_and_unload"):  # a PeftModel: fold the merged LoRA into weights
            model = model.merge_and_unload()
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model.to(parse_dtype(spec.dtype, spec.device)).save_pretrained(model_dir)
        copy_support_files(base_dir, model_dir, config=False, tokenizer=True)
        del method, model, returned
    gc.collect()  # the merge's copies of the models go before the evaluation loads the result


def open_routed(directory: Path) -> tuple[Path, Manifest]:
    """The routed-experts model unpacked from an upload (``mergearena route``'s directory, at the
    top or one folder down) and its manifest, or a ``SubmissionError`` saying what is wrong."""
    from mergearena.checkpoints.routed import ArrowRouter, find_routed_dir, read_manifest

    routed = find_routed_dir(directory) if directory.is_dir() else None
    if routed is None:
        raise SubmissionError(
            f"{directory}: no routed.json at the top of the archive or one folder down; a routed "
            "submission is the directory `mergearena route --out DIR` writes, archived"
        )
    try:
        manifest = read_manifest(routed)
    except CheckpointError as error:
        raise SubmissionError(str(error)) from None
    adapters = [expert.adapter for expert in manifest.experts]
    if isinstance(manifest.router, ArrowRouter):
        adapters += manifest.router.general
    unsafe = [a for a in adapters if not (routed / a / ADAPTER_SAFETENSORS).is_file()]
    if unsafe:
        raise SubmissionError(
            f"{', '.join(unsafe)}: no {ADAPTER_SAFETENSORS}; the arena loads adapters from "
            "safetensors only (a .bin adapter is a pickle): save them with safe_serialization"
        )
    return routed, manifest


def _routed(directory: Path, model_dir: Path, spec: JobSpec, policy: ModelPolicy) -> str:
    """Take a routed submission into ``model_dir``: nothing to merge; its base goes through the
    policy like any model, and the limit on parameters counts the base and every adapter, as
    the model runs."""
    routed, manifest = open_routed(directory)
    policy.resolve(manifest.base)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(routed, model_dir)
    total = count_parameters(model_dir)
    if spec.max_parameters is not None and total > spec.max_parameters:
        raise SubmissionError(
            f"the routed model runs {total:,} parameters (its base and its adapters), more than "
            f"this competition's limit of {spec.max_parameters:,}"
        )
    return f"routed ({manifest.router.kind} router, {len(manifest.experts)} experts)"


@contextlib.contextmanager
def _merged(spec: JobSpec, model_dir: Path, policy: ModelPolicy) -> Iterator[Merged]:
    """Merge the submission into ``model_dir`` (complete when the block ends) and yield it."""
    from mergearena.arena.inference import Hooks
    from mergearena.recipe import parse_recipe

    path = Path(spec.submission)
    if spec.kind == "recipe":
        if not path.is_file():
            raise SubmissionError(f"{path}: no such recipe file (a recipe is one YAML file)")
        yield Merged(_merge_recipe(parse_recipe(path), model_dir, spec, policy), Hooks())
        return
    if spec.kind == "routed":
        yield Merged(_routed(path, model_dir, spec, policy), Hooks())
        return
    if path.is_file() and path.suffix == ".py":
        merging = _method_file(path, model_dir, spec, policy)
    elif path.is_dir():
        merging = _starter_kit(path, model_dir, spec, policy)
    else:
        raise SubmissionError(
            f"{path}: a code submission is a .py file using mergearena's method API or a "
            "directory holding the starter kit's llm_merging package"
        )
    with merging as merged:
        yield merged


# ------------------------------------------------------------------------------------ predictions


def write_predictions(
    tasks: Sequence[Task], predictions: Mapping[str, Mapping[str, str]], directory: Path
) -> None:
    """``<task>.csv`` files of ``id,prediction`` (``predictions[task][id]``, in the task's row
    order) exactly as ``write_outputs`` writes them.

    Not ``write_outputs`` itself: it also writes one submission.csv for all target-less tasks,
    and refuses tasks whose ids overlap, which hidden tasks may well do.
    """
    from mergearena.evaluation.runner import write_csv

    with atomic_directory(directory, overwrite=True) as temporary:
        for task in tasks:
            rows = [(e.id, predictions[task.name][e.id]) for e in task.examples]
            write_csv(temporary / f"{task.name}.csv", ("id", "prediction"), rows)


def _run(spec: JobSpec, out: Path, started: float) -> dict[str, Any]:
    from mergearena.arena.inference import predict
    from mergearena.dtypes import choose_dtype
    from mergearena.errors import TaskError
    from mergearena.evaluation import evaluate, load_task
    from mergearena.evaluation.runner import choose_strategy
    from mergearena.models import LanguageModel, parse_device

    parse_device(spec.device)  # bad settings fail before the merge, not after it
    print(choose_dtype(spec.dtype, spec.device).describe(spec.dtype), flush=True)
    tasks = [load_task(path) for path in spec.tasks]
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise TaskError(f"task files share a name ({', '.join(names)}); task names must differ")
    for task in tasks:  # too many few-shot examples asked for, say, fails before the merge too
        choose_strategy(task, mc_rule=spec.mc_rule, fewshot=spec.fewshot, cot=spec.cot)
    policy = ModelPolicy(spec.allowed_models, spec.max_parameters)
    model_dir = out / "model"

    merge_started = time.perf_counter()
    predictions: dict[str, dict[str, str]] = {}  # task → row id → prediction
    summaries: dict[str, dict[str, Any]] = {name: {"scored": False} for name in names}
    with _merged(spec, model_dir, policy) as merged:
        merge_seconds = time.perf_counter() - merge_started
        used = ", ".join(policy.used)
        print(f"merged with {merged.method} in {merge_seconds:.1f} s: {used}", flush=True)
        own_inference = [merged.hooks.label(t) for t in merged.hooks.by_type]
        for task in tasks:  # the submission's own code, while its merged model is loaded
            task_started = time.perf_counter()
            predictions[task.name] = predict(task, merged.hooks)
            if predictions[task.name]:
                seconds = time.perf_counter() - task_started
                summaries[task.name].update(
                    own_predictions=len(predictions[task.name]), own_seconds=round(seconds, 3)
                )
                kinds = {example.eval_type for example in task.examples}
                by = [merged.hooks.label(t) for t in merged.hooks.by_type if t in kinds]
                print(
                    f"predicted {task.name}: {len(predictions[task.name])} rows by "
                    f"{', '.join(by)} (the submission's own code) in {seconds:.1f} s",
                    flush=True,
                )

    # The rows no hook predicted: mergearena's batched scorer, on the saved model.
    rest = [
        replace(t, examples=[e for e in t.examples if e.id not in predictions[t.name]])
        for t in tasks
    ]
    rest = [task for task in rest if task.examples]
    if rest:
        lm = LanguageModel.load(model_dir, device=spec.device, dtype=spec.dtype)
        results = evaluate(
            lm,
            rest,
            mc_rule=spec.mc_rule,
            batch_size=spec.batch_size,
            fewshot=spec.fewshot,
            cot=spec.cot,
        )
        del lm
        for result in results:
            predictions[result.task.name].update(
                (r.example.id, r.prediction_text) for r in result.examples
            )
            summaries[result.task.name].update(result.summary())
            print(f"predicted {result.task.name}: {len(result.examples)} rows", flush=True)
    write_predictions(tasks, predictions, out / "predictions")
    parameters = count_parameters(model_dir)
    if not spec.keep_model:
        shutil.rmtree(model_dir)
    for task in tasks:
        summaries[task.name]["n"] = len(task.examples)
    return {
        "status": "ok",
        "seconds": round(time.perf_counter() - started, 3),
        "merge_seconds": round(merge_seconds, 3),
        "method": merged.method,
        "models": policy.used,
        "parameters": parameters,
        "peak_gpu_bytes": _peak_gpu_bytes(spec.device),
        "own_inference": own_inference,
        "tasks": summaries,
    }


def _peak_gpu_bytes(device: str) -> int | None:
    """The most GPU memory this process's allocator held at once (None on a CPU)."""
    import torch

    if not device.startswith("cuda"):
        return None
    return max(torch.cuda.max_memory_reserved(d) for d in range(torch.cuda.device_count()))


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
