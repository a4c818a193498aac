"""The YAML merge recipe: schema, mergekit compatibility, and validation before any tensor is read.

A recipe is mergekit's format (``models``, ``base_model``, ``merge_method``, ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source``) plus ``seed`` for random methods. A parameter value
is a scalar, a gradient (a list of numbers interpolated over the layers), or a list of
``{filter: SUBSTRING, value: ...}`` conditions matched against the tensor name, first match wins::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math-expert
        parameters: {weight: 0.5, density: [0.2, 0.8]}
      - model: ./code-expert
        parameters:
          weight: 0.5
          density:
            - {filter: mlp, value: 0.3}
            - {value: 0.6}
    parameters: {normalize: true}
    dtype: float32
    seed: 0
"""

from __future__ import annotations

import codecs
import difflib
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from mergearena.errors import RecipeError, shorten
from mergearena.methods import MethodSpec, Parameter, get_method, method_names

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# mergekit recipe keys we recognise but do not implement, with what to do instead.
UNSUPPORTED_MERGEKIT_KEYS = {
    "chat_template": "the tokenizer's own chat template is copied",
    "tokenizer": "tokenizer_source: base, or a model reference, is supported",
    "modules": "merge each module with its own recipe",
}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource]
    parameters: dict[str, Any] = Field(default_factory=dict)


class Recipe(BaseModel):
    """A merge recipe as written (mergekit-compatible keys)."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[Slice] | None = None
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    seed: int = 0
    name: str | None = None
    # Set when a mergekit ``slices`` recipe was accepted: the one layer range all sources share.
    _layer_range: tuple[int, int] | None = PrivateAttr(default=None)
    # The file the recipe was read from, if any: an output must not replace it either.
    _source_file: Path | None = PrivateAttr(default=None)

    @property
    def layer_range(self) -> tuple[int, int] | None:
        return self._layer_range

    @property
    def source_file(self) -> Path | None:
        return self._source_file

    @property
    def method(self) -> MethodSpec:
        spec = get_method(self.merge_method)
        assert spec is not None, "validate_recipe checks the method first"
        return spec

    def compute_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype else None

    def output_dtype(self) -> torch.dtype | None:
        if self.out_dtype:
            return DTYPES[self.out_dtype]
        return self.compute_dtype()

    def inputs(self) -> list[ModelEntry]:
        """The models merged as ``tensors`` (the base is left out when the method takes one)."""
        if self.method.base == "none" or self.base_model is None:
            return list(self.models)
        return [entry for entry in self.models if entry.model != self.base_model]

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_none=True, exclude_defaults=False)
        if not data.get("slices"):
            data.pop("slices", None)
        return yaml.safe_dump(data, sort_keys=False)


def _closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


# What a recipe may take. Real recipes are a few kB with a few hundred nodes; the limits stop a
# hostile document (a "billion laughs" of nested aliases, a megabyte of nesting) before it is built.
MAX_RECIPE_BYTES = 256_000  # a recipe is a few kB; parsing 1 MB of YAML takes seconds
MAX_YAML_NODES = 100_000  # counted as expanded: an alias counts every node of what it names
MAX_YAML_ALIASES = 1_000
MAX_YAML_DEPTH = 64


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and documents over the limits above.

    Nodes are counted as they are composed, an alias adding the size of the node it names, so a
    few anchors that would expand to a billion values are refused after reading a few hundred
    bytes, before anything is constructed (aliases alone share their nodes; what consumes the
    recipe afterwards, validation and merging, walks every expanded value).
    """

    def __init__(self, text: str, label: str) -> None:
        super().__init__(text)
        self.label = label
        self.expanded_nodes = 0
        self.aliases = 0
        self.depth = 0
        self.anchor_sizes: dict[str, int] = {}

    def _refuse(self, problem: str, mark: yaml.Mark | None) -> RecipeError:
        where = f", line {mark.line + 1}" if mark is not None else ""
        return RecipeError(f"{self.label}{where}: {problem}")

    def _count(self, nodes: int, mark: yaml.Mark) -> None:
        self.expanded_nodes += nodes
        if self.expanded_nodes > MAX_YAML_NODES:
            raise self._refuse(
                f"the YAML expands to more than {MAX_YAML_NODES:,} values (aliases count every "
                f"value they repeat); a recipe needs a few hundred, so this is refused",
                mark,
            )

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise self._refuse(
                    f"more than {MAX_YAML_ALIASES:,} YAML aliases (*name); a recipe needs a few",
                    event.start_mark,
                )
            self._count(self.anchor_sizes.get(event.anchor, 1), event.start_mark)
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise self._refuse(
                f"the YAML nests deeper than {MAX_YAML_DEPTH} levels; a recipe needs about 6",
                event.start_mark,
            )
        before = self.expanded_nodes
        self._count(1, event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if event.anchor is not None:
            self.anchor_sizes[event.anchor] = self.expanded_nodes - before
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[object, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue  # "<<: *defaults" merges keys that explicit ones may override
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise RecipeError(
                    f"{self.label}: duplicate key {key!r} on line {line} (first on line "
                    f"{first_line[key]}); YAML would silently keep the last one. Write each key "
                    "once."
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _decode(data: bytes, label: str) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is allowed), or an error that says how to fix it."""
    if data.startswith((codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise RecipeError(f"{label}: is UTF-16 or UTF-32 text; save the recipe as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise RecipeError(
            f"{label}: is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}); save the recipe as UTF-8"
        ) from None


def load_yaml(text: str | bytes, label: str = "recipe") -> Any:
    """Read a YAML document within a recipe's limits: the one way recipe text becomes data.

    Refuses (with :class:`RecipeError` naming ``label``, the problem and its line) text over
    ``MAX_RECIPE_BYTES``, bytes that are not UTF-8, duplicate keys in any mapping, and documents
    whose aliases, nesting or size exceed the ``MAX_YAML_*`` limits, before building anything.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    _check_size(len(data), label)
    if isinstance(text, bytes):
        text = _decode(text, label)
    loader = _BoundedLoader(text, label)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        raise RecipeError(f"{label}: not valid YAML: {error}") from None
    except RecursionError:
        raise RecipeError(f"{label}: the YAML nests too deeply for a recipe") from None
    finally:
        loader.dispose()


def _check_size(size: int, label: str) -> None:
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{label}: is {size:,} bytes; a recipe is a few kB (the limit is "
            f"{MAX_RECIPE_BYTES:,} bytes)"
        )


def _read_recipe_file(path: Path) -> str:
    """A recipe file's text, with errors that name the file (never an ``OSError`` traceback)."""
    label = shorten(str(path))
    try:
        if path.is_dir():
            raise RecipeError(f"recipe file {label} is a directory; pass the recipe's YAML file")
        if not path.is_file():
            raise RecipeError(f"recipe file {label} does not exist")
        _check_size(path.stat().st_size, label)  # before reading a huge file into memory
        data = path.read_bytes()
    except OSError as error:
        raise RecipeError(f"recipe file {label}: cannot read it ({error.strerror})") from None
    return _decode(data, label)


def _describe_pydantic_error(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            key = str(item["loc"][-1])
            parent = item["loc"][0] if len(item["loc"]) > 1 else None  # None: the recipe's own key
            known: dict[int | str | None, list[str]] = {
                None: list(Recipe.model_fields),
                "models": list(ModelEntry.model_fields),
                "slices": list(Slice.model_fields),
            }
            candidates = known.get(parent, list(SliceSource.model_fields))
            if parent is None and key in UNSUPPORTED_MERGEKIT_KEYS:
                lines.append(
                    f"mergekit's {key!r} option is not supported by mergearena yet; remove it "
                    f"({UNSUPPORTED_MERGEKIT_KEYS[key]})"
                )
            else:
                lines.append(f"unknown key {location!r}.{_closest(key, candidates)}")
        elif item["type"] == "missing":
            lines.append(f"missing required key {location!r}")
        else:
            lines.append(f"{location}: {item['msg']}")
    return f"{source}: invalid recipe:\n  " + "\n  ".join(lines)


def parse_recipe(source: str | Path | dict[str, Any]) -> Recipe:
    """Parse a recipe from a YAML file path, a YAML string, or a dict, and check its structure.

    Checks everything that can be checked without opening models: the method exists, every
    parameter is known to it and in range, required parameters and the base model are present,
    and the number of models fits the method.
    """
    label = "recipe"
    source_file = None
    if isinstance(source, dict):
        data: Any = source
    else:
        text = str(source)
        path = Path(text)
        if isinstance(source, Path) or (
            len(text) < 4096
            and "\n" not in text
            and path.suffix
            in (
                ".yaml",
                ".yml",
            )
        ):
            label = shorten(text)
            text = _read_recipe_file(path)
            source_file = path
        data = load_yaml(text, label)
    if not isinstance(data, dict):
        raise RecipeError(f"{label}: a recipe is a YAML mapping with at least 'merge_method'")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_describe_pydantic_error(error, label)) from None
    validate_structure(recipe, label)
    recipe._source_file = source_file
    return recipe


def _check_setting(parameter: Parameter, setting: Any, where: str, label: str, method: str) -> None:
    """Check a parameter setting: a scalar, a gradient list, or a list of filter conditions."""
    if isinstance(setting, list):
        if not setting:
            raise RecipeError(f"{label}: {where}: an empty list is not a value")
        if all(isinstance(item, dict) for item in setting):
            for condition in setting:
                unknown = set(condition) - {"filter", "value"}
                pattern = condition.get("filter")
                if unknown or "value" not in condition or not isinstance(pattern, str | None):
                    raise RecipeError(
                        f"{label}: {where}: a condition is {{filter: SUBSTRING, value: V}}, "
                        f"got {condition!r}"
                    )
                _check_setting(parameter, condition["value"], where, label, method)
            return
        if parameter.kind not in (int, float) and not all(isinstance(v, str) for v in setting):
            raise RecipeError(
                f"{label}: {where}: a gradient (list of numbers) only applies to numeric "
                f"parameters; {parameter.name!r} of {method} is {parameter.kind.__name__}"
            )
        for value in setting:
            _check_value(parameter, value, where, label, method)
        return
    if isinstance(setting, dict):
        raise RecipeError(
            f"{label}: {where}: expected a value, a list of values (a gradient over layers) or a "
            f"list of {{filter, value}} conditions, got a mapping"
        )
    _check_value(parameter, setting, where, label, method)


def _check_value(parameter: Parameter, value: Any, where: str, label: str, method: str) -> None:
    if parameter.kind in (int, float):
        value = _number_or_text(value)
    problem = parameter.check(value)
    if problem:
        raise RecipeError(f"{label}: {where}: {parameter.name!r} of {method} {problem}")


def validate_structure(recipe: Recipe, label: str = "recipe") -> None:
    spec = get_method(recipe.merge_method)
    if spec is None:
        raise RecipeError(
            f"{label}: unknown merge_method {recipe.merge_method!r}."
            f"{_closest(recipe.merge_method, method_names())} "
            f"Run `mergearena methods` to list them."
        )
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None and value not in DTYPES:
            raise RecipeError(
                f"{label}: {key} {value!r} is not supported; use one of "
                f"{', '.join(sorted(set(DTYPES)))}.{_closest(value, list(DTYPES))}"
            )
    if recipe.slices:
        _flatten_full_range_slices(recipe, label)
    if not recipe.models:
        raise RecipeError(f"{label}: 'models' is empty; list the models to merge")

    names = [p.name for p in spec.parameters]
    for key, setting in recipe.parameters.items():
        parameter = spec.parameter(key)
        if parameter is None:
            raise RecipeError(
                f"{label}: parameters.{key}: {spec.name} has no parameter {key!r}."
                f"{_closest(key, names)} Its parameters: {', '.join(names) or 'none'}."
            )
        _check_setting(parameter, setting, f"parameters.{key}", label, spec.name)

    if spec.base == "required" and not recipe.base_model:
        raise RecipeError(
            f"{label}: {spec.name} needs a base model (it merges differences from it); "
            f"add 'base_model: PATH_OR_REF'"
        )
    inputs = recipe.inputs()
    for index, entry in enumerate(recipe.models):
        is_base = spec.base != "none" and entry.model == recipe.base_model
        for key, setting in entry.parameters.items():
            parameter = spec.parameter(key)
            where = f"models[{index}] ({entry.model}).parameters.{key}"
            if parameter is None:
                raise RecipeError(
                    f"{label}: {where}: {spec.name} has no parameter {key!r}."
                    f"{_closest(key, names)} Its parameters: {', '.join(names) or 'none'}."
                )
            if not parameter.per_model:
                raise RecipeError(
                    f"{label}: {where}: {key!r} is a global parameter of {spec.name}; "
                    f"set it under the top-level 'parameters'"
                )
            _check_setting(parameter, setting, where, label, spec.name)
        if is_base:
            continue
        for parameter in spec.parameters:
            if (
                parameter.per_model
                and parameter.required
                and parameter.name not in entry.parameters
                and parameter.name not in recipe.parameters
            ):
                raise RecipeError(
                    f"{label}: models[{index}] ({entry.model}): {spec.name} needs per-model "
                    f"parameter {parameter.name!r}; add it under that model's 'parameters' "
                    f"(or a default under the top-level 'parameters')"
                )
    for parameter in spec.parameters:
        if (
            not parameter.per_model
            and parameter.required
            and parameter.name not in recipe.parameters
        ):
            raise RecipeError(
                f"{label}: {spec.name} needs parameter {parameter.name!r}; "
                f"add it under 'parameters'"
            )

    count = len(inputs)
    base_note = " besides the base model" if spec.base != "none" and recipe.base_model else ""
    if count < spec.min_models:
        raise RecipeError(
            f"{label}: {spec.name} needs at least {spec.min_models} model(s){base_note}, "
            f"the recipe gives {count}"
        )
    if spec.max_models is not None and count > spec.max_models:
        raise RecipeError(
            f"{label}: {spec.name} takes at most {spec.max_models} model(s){base_note}, "
            f"the recipe gives {count}"
        )
    if recipe.tokenizer_source == "union":
        raise RecipeError(
            f"{label}: tokenizer_source 'union' is not supported yet; use 'base' or the "
            f"reference of the model whose tokenizer to copy"
        )


def _flatten_full_range_slices(recipe: Recipe, label: str) -> None:
    """Accept mergekit's ``slices`` form when it is one slice over the same full layer range.

    That is how most published SLERP recipes are written; it means the same as ``models``.
    Layer stacking (several slices, different ranges) is not supported yet.
    """
    if recipe.models:
        raise RecipeError(f"{label}: give either 'models' or 'slices', not both")
    slices = recipe.slices or []
    ranges = {source.layer_range for s in slices for source in s.sources}
    if len(slices) != 1 or len(ranges) != 1:
        raise RecipeError(
            f"{label}: only a single slice whose sources share one layer_range is supported "
            f"(equivalent to 'models'); layer stacking with several slices is not supported yet"
        )
    only = slices[0]
    recipe.models = [
        ModelEntry(model=source.model, parameters=source.parameters) for source in only.sources
    ]
    recipe.parameters = {**only.parameters, **recipe.parameters}
    recipe.slices = None
    recipe._layer_range = next(iter(ranges))


def evaluate_setting(setting: Any, tensor_name: str, layer_fraction: float) -> Any:
    """Resolve a parameter setting for one tensor, as mergekit does.

    Conditions pick the first whose ``filter`` is a substring of the tensor name (or absent / "*");
    a numeric list is a gradient: ``layer_fraction`` (layer / (layers - 1); 0 for tensors outside
    the layers) is mapped onto it and interpolated linearly between neighbouring entries.
    """
    if isinstance(setting, list):
        if all(isinstance(item, dict) for item in setting):
            for condition in setting:
                pattern = condition.get("filter")
                if pattern is None or pattern == "*" or pattern in tensor_name:
                    return evaluate_setting(condition["value"], tensor_name, layer_fraction)
            return None
        values = [_number_or_text(v) for v in setting]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return values[int(layer_fraction * (len(values) - 1))]
        scaled = layer_fraction * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * values[low] + fraction * values[high]
    return setting


def _number_or_text(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            return value
    return value
