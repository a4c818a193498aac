"""The merge-method registry: a method is one decorated function, its signature is its contract.

Conventions a method function follows (the decorator reads them, the recipe validator enforces
them):

- The first positional argument ``tensors: list[Tensor]`` holds the inputs, one per model, in recipe
  order. For methods that take a base model, the base is *not* in that list.
- A keyword argument ``base: Tensor`` makes a base model required; ``base: Tensor | None = None``
  makes it optional.
- Arguments annotated ``list[...]`` are per-model parameters (one value per entry of ``tensors``);
  scalars (``float``, ``int``, ``bool``, ``str``/``Literal``) are global. A per-model parameter
  with a default is annotated ``list[X] | X``: its default is one value for every model (and a
  direct Python call may pass one too).
- ``Annotated[float, Range(...)]`` (or ``Annotated[list[float], Range(...)]``) declares the valid
  range.
- A trailing underscore maps a Python keyword to its recipe key: ``lambda_`` is ``lambda`` in YAML.
- An argument named ``generator`` (``torch.Generator | None``) marks the method as random; the
  engine passes a generator seeded from the recipe's ``seed`` and the tensor's name.

The docstring's first line is the method's summary, and its paragraph starting "Degenerate cases:"
says what the method returns where its geometry breaks down (zero task vectors, zero norms,
parallel or opposite vectors, one model): ``mergearena methods`` prints it, and a method without
one is listed without it (every built-in method has one; a test checks).

Adapter-space methods (``output="adapter"``) take ``factors: list[LoraFactors]`` instead and return
``LoraFactors``: they merge LoRA adapters into one adapter rather than into full weights.

A family declared as data (the task-arithmetic variants table) registers generated functions
whose ``__signature__`` (an ``inspect.Signature``) and ``__annotations__`` follow these same
conventions: ``inspect.signature`` and ``typing.get_type_hints`` read them as they read a ``def``.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mergearena.errors import shorten

REQUIRED: Any = inspect.Parameter.empty


@dataclass(frozen=True)
class Range:
    """Valid interval of a numeric parameter; ``None`` bounds are open-ended."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        low = "(-inf"
        if self.ge is not None:
            low = f"[{self.ge}"
        elif self.gt is not None:
            low = f"({self.gt}"
        high = "inf)"
        if self.le is not None:
            high = f"{self.le}]"
        elif self.lt is not None:
            high = f"{self.lt})"
        return f"{low}, {high}"


@dataclass(frozen=True)
class Parameter:
    """One parameter of a merge method as a recipe sees it."""

    name: str  # recipe key, e.g. "lambda"
    argument: str  # Python argument name, e.g. "lambda_"
    kind: type  # float, int, bool or str
    per_model: bool
    default: Any = REQUIRED
    range: Range | None = None
    choices: tuple[str, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any) -> str | None:
        """Return a problem description for ``value``, or None if it is valid."""
        if self.kind is bool:
            if not isinstance(value, bool):
                return f"must be true or false, got {value!r}"
            return None
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"must be a number, got {shorten(repr(value), 60)}"
            try:
                number = float(value)
            except OverflowError:  # an integer of hundreds of digits
                number = math.inf
            if not math.isfinite(number):  # NaN passes every bound's comparison: check it first
                return f"must be a finite number, got {shorten(repr(value), 60)}"
            if self.kind is int and not number.is_integer():
                return f"must be an integer, got {value!r}"
            if self.range is not None and not self.range.check(number):
                return f"must be in {self.range.describe()}, got {value!r}"
            return None
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        return None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.kind.__name__,
            "scope": "per-model" if self.per_model else "global",
            "required": self.required,
        }
        if not self.required:
            out["default"] = self.default
        if self.range is not None:
            out["range"] = self.range.describe()
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about a method: built from its function by ``@merge_method``."""

    name: str
    function: Callable[..., Any]
    summary: str
    reference: str
    base: Literal["required", "optional", "none"]
    min_models: int  # inputs in ``tensors`` (base excluded)
    max_models: int | None
    parameters: tuple[Parameter, ...]
    random: bool
    degenerate: str = ""  # the docstring's "Degenerate cases:" paragraph
    output: Literal["tensor", "adapter"] = "tensor"
    aliases: tuple[str, ...] = field(default=())

    def parameter(self, name: str) -> Parameter | None:
        return next((p for p in self.parameters if p.name == name), None)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "reference": self.reference,
            "base_model": self.base,
            "min_models": self.min_models,
            "max_models": self.max_models,
            "random": self.random,
            "degenerate_cases": self.degenerate,
            "output": self.output,
            "aliases": list(self.aliases),
            "parameters": [p.describe() for p in self.parameters],
        }


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def _unwrap(annotation: Any) -> tuple[Any, Range | None]:
    if typing.get_origin(annotation) is typing.Annotated:
        inner, *extras = typing.get_args(annotation)
        return inner, next((e for e in extras if isinstance(e, Range)), None)
    return annotation, None


def _scalar_kind(annotation: Any) -> tuple[type, tuple[str, ...] | None]:
    if typing.get_origin(annotation) is Literal:
        return str, tuple(typing.get_args(annotation))
    if annotation in (float, int, bool, str):
        return annotation, None
    raise TypeError(f"unsupported parameter annotation {annotation!r}")


DEGENERATE_HEADING = "Degenerate cases:"


def degenerate_cases(doc: str) -> str:
    """The docstring paragraph that starts with "Degenerate cases:", joined into one line."""
    for paragraph in doc.split("\n\n"):
        text = " ".join(line.strip() for line in paragraph.strip().splitlines())
        if text.startswith(DEGENERATE_HEADING):
            return text.removeprefix(DEGENERATE_HEADING).strip()
    return ""


def _per_model_item(annotation: Any) -> Any | None:
    """The item annotation of a per-model parameter (``list[X]`` or ``list[X] | X``), else None."""
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        lists = [m for m in members if typing.get_origin(m) is list]
        if len(members) == 2 and len(lists) == 1:
            (item,) = typing.get_args(lists[0])
            if item in members:
                return item
    return None


def _is_optional_tensor(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def merge_method(
    name: str,
    *,
    reference: str,
    min_models: int = 1,
    max_models: int | None = None,
    output: Literal["tensor", "adapter"] = "tensor",
    aliases: tuple[str, ...] = (),
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``function`` as merge method ``name``; see the module docstring for conventions."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(function, include_extras=True)
        signature = inspect.signature(function)
        base: Literal["required", "optional", "none"] = "none"
        random = False
        parameters: list[Parameter] = []
        for index, (arg, param) in enumerate(signature.parameters.items()):
            if index == 0:
                continue  # tensors / factors
            if arg == "base":
                base = "optional" if _is_optional_tensor(hints[arg]) else "required"
                continue
            if arg == "generator":
                random = True
                continue
            annotation, valid_range = _unwrap(hints[arg])
            per_model_item = _per_model_item(annotation)
            per_model = per_model_item is not None
            if per_model_item is not None:
                annotation, inner_range = _unwrap(per_model_item)
                valid_range = valid_range or inner_range
            kind, choices = _scalar_kind(annotation)
            parameters.append(
                Parameter(
                    name=arg.rstrip("_"),
                    argument=arg,
                    kind=kind,
                    per_model=per_model,
                    default=param.default,
                    range=valid_range,
                    choices=choices,
                )
            )
        doc = inspect.getdoc(function) or ""
        degenerate = degenerate_cases(doc)
        spec = MethodSpec(
            name=name,
            function=function,
            summary=doc.splitlines()[0] if doc else name,
            reference=reference,
            base=base,
            min_models=min_models,
            max_models=max_models,
            parameters=tuple(parameters),
            random=random,
            degenerate=degenerate,
            output=output,
            aliases=aliases,
        )
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"merge method {name!r} is registered twice")
        _REGISTRY[name] = spec
        for alias in aliases:
            _ALIASES[alias] = name
        function.spec = spec  # type: ignore[attr-defined]
        return function

    return register


def get_method(name: str) -> MethodSpec | None:
    """The method registered as ``name`` (or an alias of it), or None."""
    return _REGISTRY.get(_ALIASES.get(name, name))


def all_methods() -> list[MethodSpec]:
    return sorted(_REGISTRY.values(), key=lambda spec: spec.name)


def method_names() -> list[str]:
    return sorted([*_REGISTRY, *_ALIASES])


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA module's low-rank factors: ``delta = scale * up @ down``.

    ``down`` is PEFT's ``lora_A`` (rank × in_features), ``up`` is ``lora_B`` (out_features × rank).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()).mul_(self.scale)
