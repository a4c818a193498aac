"""A search space: a merge recipe in which values are searched, checked before any trial.

Any parameter value (global, per model, or one point of a per-layer gradient) may be a range or a
choice; ``merge_method`` may be a choice of methods; a model's ``include`` may be a choice::

    merge_method: {choice: [ties, dare_ties, task_arithmetic]}
    base_model: zoo:smollm2-135m
    models:
      - model: zoo:arithmetic-lora
        include: {choice: [true, false]}        # the 3rd place's "strategic model selection"
        parameters:
          weight: {search: [0.0, 2.0]}
          density: [{search: [0.1, 1.0]}, {search: [0.1, 1.0]}]   # a searched gradient
    parameters: {lambda: {search: [0.25, 2.0], log: true}}
    dtype: float32

A range is ``{search: [LOW, HIGH]}`` with optional ``log: true`` and ``step: S``; an integer
parameter is searched over integers. A choice is ``{choice: [A, B, ...]}``. Where the methods of a
choice take different parameters, a trial sets only those its method takes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from mergearena.errors import RecipeError
from mergearena.methods import MethodSpec, get_method, method_names
from mergearena.recipe import parse_recipe

RANGE_KEYS = {"search", "log", "step"}
SEARCHABLE = "merge_method, parameters, and each model's parameters and include"


class Suggester(Protocol):
    """What a trial offers (an ``optuna.Trial`` is one)."""

    def suggest_float(
        self, name: str, low: float, high: float, *, log: bool, step: Any
    ) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, log: bool, step: int) -> int: ...

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any: ...


@dataclass(frozen=True)
class Dimension:
    """One searched value: its name (stable, shown in trials.csv and plots) and its domain."""

    name: str
    choices: tuple[Any, ...] | None = None  # a choice, or else a range
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    integer: bool = False
    parameter: str | None = None  # the method parameter it sets (None: merge_method, include)

    def suggest(self, trial: Suggester) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def end(self, index: int) -> Any:
        """A value at one end (``index`` 0: low or first choice; -1: high or last)."""
        if self.choices is not None:
            return self.choices[min(index, len(self.choices) - 1) if index >= 0 else -1]
        value = self.low if index == 0 else self.high
        return int(value) if self.integer else value


class _Slot:
    """A placeholder for a searched value inside the recipe document."""

    def __init__(self, dimension: Dimension) -> None:
        self.dimension = dimension


@dataclass
class SearchSpace:
    """A parsed space: the recipe document with slots, and the dimensions in document order."""

    document: dict[str, Any]
    dimensions: list[Dimension]
    methods: tuple[str, ...]
    label: str
    text: str  # the space as written; a resumed study must have the same

    def recipe(self, trial: Suggester) -> dict[str, Any]:
        """The recipe document for one trial: the method first, then what it takes."""
        method_slot = self.document["merge_method"]
        method = (
            method_slot.dimension.suggest(trial) if isinstance(method_slot, _Slot) else method_slot
        )
        return self._fill(method, lambda dimension: dimension.suggest(trial))

    def probe(self, method: str, index: int) -> dict[str, Any]:
        """A recipe with every searched value at one end (see ``Dimension.end``)."""
        return self._fill(method, lambda dimension: dimension.end(index), include_all=True)

    def _fill(self, method: str, value, include_all: bool = False) -> dict[str, Any]:
        spec = get_method(method)
        taken = {p.name for p in spec.parameters} if spec is not None else set()

        def fill(node: Any) -> Any:
            if isinstance(node, _Slot):
                return value(node.dimension)
            if isinstance(node, dict):
                return {key: fill(item) for key, item in node.items()}
            if isinstance(node, list):
                return [fill(item) for item in node]
            return node

        def parameters(settings: dict[str, Any]) -> dict[str, Any]:
            keep = (
                settings
                if len(self.methods) == 1
                else {k: settings[k] for k in settings if k in taken}
            )
            return fill(keep)

        document = {k: v for k, v in self.document.items() if k not in ("models", "merge_method")}
        document["merge_method"] = method
        document["parameters"] = parameters(self.document.get("parameters", {}))
        models = []
        for entry in self.document["models"]:
            include = entry.get("include", True)
            if not include_all and not (
                value(include.dimension) if isinstance(include, _Slot) else include
            ):
                continue
            models.append(
                {"model": entry["model"], "parameters": parameters(entry.get("parameters", {}))}
            )
        document["models"] = models
        return document


def _is_spec(node: Any) -> bool:
    return isinstance(node, dict) and ("search" in node or "choice" in node)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _dimension(
    node: dict[str, Any], name: str, label: str, integer: bool, parameter: str | None
) -> Dimension:
    where = f"{label}: {name}"
    if "choice" in node:
        if set(node) != {"choice"}:
            raise RecipeError(
                f"{where}: a choice is {{choice: [A, B, ...]}} alone, got keys {sorted(node)}"
            )
        options = node["choice"]
        if not isinstance(options, list) or not options or not all(_scalar(o) for o in options):
            raise RecipeError(
                f"{where}: choice: a non-empty list of plain values is needed, got {options!r}"
            )
        if len(set(map(repr, options))) != len(options):
            raise RecipeError(f"{where}: choice: {options!r} lists a value twice")
        return Dimension(name, choices=tuple(options), parameter=parameter)
    unknown = set(node) - RANGE_KEYS
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {sorted(unknown)} in a range; a range is "
            f"{{search: [LOW, HIGH]}} with optional 'log: true' and 'step: S'"
        )
    bounds = node["search"]
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
    ):
        raise RecipeError(f"{where}: search: two numbers [LOW, HIGH] are needed, got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    if low > high:
        raise RecipeError(
            f"{where}: search: low {bounds[0]} is above high {bounds[1]}; "
            f"write [{bounds[1]}, {bounds[0]}]"
        )
    log = node.get("log", False)
    if not isinstance(log, bool):
        raise RecipeError(f"{where}: log: true or false, got {log!r}")
    if log and low <= 0:
        raise RecipeError(f"{where}: a log range needs LOW > 0, got {bounds[0]}")
    step = node.get("step")
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, int | float) or step <= 0
    ):
        raise RecipeError(f"{where}: step: a positive number, got {step!r}")
    if step is not None and log:
        raise RecipeError(f"{where}: a range takes 'log' or 'step', not both")
    if integer and not (low.is_integer() and high.is_integer()):
        raise RecipeError(f"{where}: {parameter!r} is an integer parameter; give integer bounds")
    return Dimension(
        name, low=low, high=high, log=log, step=step, integer=integer, parameter=parameter
    )


def _no_spec(node: Any, where: str, label: str) -> None:
    """Refuse a searched value where nothing can be searched."""
    if _is_spec(node):
        raise RecipeError(f"{label}: {where} cannot be searched; searchable: {SEARCHABLE}")
    if isinstance(node, dict):
        for key, item in node.items():
            _no_spec(item, f"{where}.{key}", label)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            _no_spec(item, f"{where}[{index}]", label)


def _short(ref: str) -> str:
    return ref.removeprefix("zoo:").rstrip("/").rsplit("/", 1)[-1]


def parse_space(source: str | Path, label: str | None = None) -> SearchSpace:
    """Parse and check a search space (a YAML file path or text) before any trial runs.

    Beyond its syntax, every method a trial can pick is checked with every searched value at its
    low end and at its high end (and each position of each choice) exactly as ``mergearena merge``
    checks a recipe, so a value out of a parameter's range, a parameter no method takes, or a
    method that needs what the space does not give, is an error naming the key now.
    """
    path = (
        Path(source)
        if isinstance(source, Path) or str(source).endswith((".yaml", ".yml"))
        else None
    )
    if path is not None:
        if not path.is_file():
            raise RecipeError(f"search space {path} does not exist")
        text, label = path.read_text(), label or str(path)
    else:
        text, label = str(source), label or "space"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{label}: not valid YAML: {error}") from None
    if not isinstance(data, dict) or "merge_method" not in data:
        raise RecipeError(
            f"{label}: a search space is a recipe (a YAML mapping with 'merge_method')"
        )
    if data.get("slices"):
        raise RecipeError(f"{label}: slices cannot be searched; list the models under 'models'")
    dimensions: list[Dimension] = []

    def add(dimension: Dimension) -> _Slot:
        if any(d.name == dimension.name for d in dimensions):
            raise RecipeError(f"{label}: {dimension.name} is searched twice")
        dimensions.append(dimension)
        return _Slot(dimension)

    document = copy.deepcopy(data)
    method = data["merge_method"]
    if _is_spec(method):
        slot = add(_dimension(method, "merge_method", label, False, None))
        if slot.dimension.choices is None:
            raise RecipeError(
                f"{label}: merge_method: a method is chosen, {{choice: [...]}}, not a range"
            )
        document["merge_method"] = slot
        methods = tuple(slot.dimension.choices)
    else:
        methods = (method,)
    specs: list[MethodSpec] = []
    for name in methods:
        spec = get_method(str(name))
        if spec is None:
            parse_recipe(
                {"merge_method": str(name), "models": [{"model": "x"}]}
            )  # names the problem
            raise RecipeError(f"{label}: unknown merge_method {name!r}; see {method_names()}")
        if spec.output == "adapter":
            raise RecipeError(
                f"{label}: {name} writes a LoRA adapter; a search merges full weights in memory. "
                f"Search a full-weight method (task_arithmetic, ties, ...) instead"
            )
        specs.append(spec)
    integers = {p.name for s in specs for p in s.parameters if p.kind is int}
    known = {p.name for s in specs for p in s.parameters}

    def walk(node: Any, name: str, parameter: str) -> Any:
        if _is_spec(node):
            return add(_dimension(node, name, label, parameter in integers, parameter))
        if isinstance(node, list):
            out = []
            for index, item in enumerate(node):
                if isinstance(item, dict) and "value" in item and not _is_spec(item):
                    where = f"{name}[{item.get('filter', '*')}]"
                    out.append({**item, "value": walk(item["value"], where, parameter)})
                else:
                    out.append(walk(item, f"{name}[{index}]", parameter))
            return out
        return node

    def settings(node: Any, prefix: str, where: str) -> dict[str, Any]:
        if node is None:
            return {}
        if not isinstance(node, dict):
            raise RecipeError(f"{label}: {where}: a mapping of parameters is needed")
        out = {}
        for key, item in node.items():
            if len(methods) > 1 and key not in known:
                raise RecipeError(
                    f"{label}: {where}.{key}: none of {', '.join(methods)} takes {key!r}"
                )
            out[key] = walk(item, f"{prefix}{key}", key)
        return out

    document["parameters"] = settings(data.get("parameters"), "", "parameters")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise RecipeError(f"{label}: 'models' is empty; list the models to merge")
    shorts = [_short(str(e.get("model", ""))) if isinstance(e, dict) else "" for e in models]
    entries = []
    for index, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(
                f"{label}: models[{index}]: an entry is {{model: REF, parameters: ...}}"
            )
        unknown = set(entry) - {"model", "parameters", "include"}
        if unknown:
            raise RecipeError(f"{label}: models[{index}]: unknown key(s) {sorted(unknown)}")
        prefix = shorts[index] if shorts.count(shorts[index]) == 1 else f"models[{index}]"
        out = {"model": entry["model"]}
        include = entry.get("include", True)
        if _is_spec(include):
            slot = add(_dimension(include, f"{prefix}.include", label, False, None))
            if slot.dimension.choices is None or set(slot.dimension.choices) - {True, False}:
                raise RecipeError(
                    f"{label}: {prefix}.include: a choice of true and false is needed"
                )
            out["include"] = slot
        elif not isinstance(include, bool):
            raise RecipeError(
                f"{label}: {prefix}.include: true, false or {{choice: [true, false]}}"
            )
        else:
            out["include"] = include
        out["parameters"] = settings(
            entry.get("parameters"), f"{prefix}.", f"models[{index}].parameters"
        )
        entries.append(out)
    document["models"] = entries
    for key, item in data.items():
        if key not in ("merge_method", "parameters", "models"):
            _no_spec(item, key, label)
    if not dimensions:
        raise RecipeError(
            f"{label}: nothing to search: give at least one value as {{search: [LOW, HIGH]}} or "
            f"{{choice: [A, B, ...]}}"
        )
    space = SearchSpace(document, dimensions, tuple(str(m) for m in methods), label, text)
    positions = max([2] + [len(d.choices) for d in dimensions if d.choices is not None])
    for name in space.methods:
        for index in range(positions):
            end = {0: "low end", positions - 1: "high end"}.get(index, f"choice {index + 1}")
            try:
                parse_recipe(space.probe(name, index if index < positions - 1 else -1))
            except RecipeError as error:
                message = str(error).removeprefix("recipe: ")
                context = f"merge_method {name}, " if len(space.methods) > 1 else ""
                raise RecipeError(
                    f"{label}: with {context}every searched value at its {end}: {message}"
                ) from None
    return space
