"""Task files in the competition's CSV format, with an optional sidecar of settings.

A task file has the columns ``id,input,target,answer_choices,eval_type`` (``target`` may be
absent: then predictions are written but nothing is scored). ``eval_type`` is
``multiple_choice`` (``answer_choices`` is a Python-literal list such as ``"['A', 'B']"`` and
``target`` the index of the right choice) or ``generation`` (``target`` is the reference text).

A sidecar ``<stem>.yaml``, ``.yml`` or ``.json`` beside the CSV may set the task's metric, its
generation length, prompt template, chat template use, few-shot examples, multiple-choice rule and
chain-of-thought settings (``cot:``, used under ``mc_rule: cot``).
"""

from __future__ import annotations

import ast
import csv
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergearena.errors import TaskError

MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"
EVAL_TYPES = (MULTIPLE_CHOICE, GENERATION)
GenerationMetric = Literal[
    "rougeL", "rouge1", "rouge2", "rougeLsum", "exact_match", "numeric_match"
]
GENERATION_METRICS: tuple[GenerationMetric, ...] = get_args(GenerationMetric)
# How a multiple-choice row is answered: loglik and starter-kit score each choice's tokens; letter
# and cot show the options lettered A, B, C... (see evaluation/strategies.py).
McRule = Literal["loglik", "starter-kit", "letter", "cot"]
MC_RULES: tuple[McRule, ...] = get_args(McRule)
CotFallback = Literal["answer-colon", "last-letter"]
COT_FALLBACKS: tuple[CotFallback, ...] = get_args(CotFallback)
DEFAULT_MAX_NEW_TOKENS = 64  # the starter kit's max_gen_len
REQUIRED_COLUMNS = ("id", "input", "eval_type")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents are normal in summaries


class FewShot(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(min_length=1)
    output: str


class CotSettings(BaseModel):
    r"""Chain-of-thought multiple choice: generate, then read the answer letter from the text.

    The defaults are the competition's 2nd place (issue 13): greedy up to 512 tokens, the letter
    taken by ``answer is \(?([A-J])\)?``, then ``Answer: X``, then the last standalone letter.
    Generation also stops at a ``stop`` string (a blank line: where a plain prompt's next
    question would start), which the winners' chat prompts did not need.
    """

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(default=512, ge=1, le=8192)
    pattern: str = Field(
        default=r"answer is \(?([A-J])\)?",
        description="regular expression whose first group is the answer letter (first match)",
    )
    fallbacks: list[CotFallback] = Field(
        default_factory=lambda: list(COT_FALLBACKS),
        description="tried in order when the pattern finds no valid letter",
    )
    cue: str = Field(default=" Let's think step by step.", description="text after the answer cue")
    stop: list[str] = Field(
        default_factory=lambda: ["\n\n"],
        description="generation ends at the first of these strings (after the reasoning)",
    )

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a regular expression ({error})") from None
        if compiled.groups < 1:
            raise ValueError("needs a group around the answer letter, as in 'answer is ([A-J])'")
        return pattern

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(not text for text in stop):
            raise ValueError("a stop string is empty")
        return stop


def check_cot_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Chain-of-thought overrides (some keys of ``CotSettings``, as a competition or a job sets
    them over each task's) validated: returns the keys given, their values normalized. An unknown
    key or a bad value raises ``ValueError`` naming the key (``pattern: needs a group ...``)."""
    try:
        settings = CotSettings.model_validate(overrides)
    except ValidationError as error:
        raise ValueError(
            "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: "
                f"{e['msg'].removeprefix('Value error, ')}"
                for e in error.errors()
            )
        ) from None
    return settings.model_dump(include=set(overrides))


class TaskSettings(BaseModel):
    """What a sidecar may set. Every key is optional; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    metric: Literal["accuracy", GenerationMetric] | None = Field(
        default=None, description="main metric for generation rows (multiple choice: accuracy)"
    )
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, le=8192)
    template: str = Field(default="{input}", description="prompt template with an {input} field")
    chat_template: bool = Field(default=False, description="wrap prompts in the model's template")
    fewshot: list[FewShot] = Field(default_factory=list)
    mc_rule: McRule | None = None
    cot: CotSettings = Field(default_factory=CotSettings)


@dataclass(frozen=True)
class Example:
    id: str
    input: str
    eval_type: str
    choices: tuple[str, ...] = ()
    target: int | str | None = None  # choice index, reference text, or None (no target)


@dataclass
class Task:
    name: str
    examples: list[Example]
    settings: TaskSettings = field(default_factory=TaskSettings)
    path: Path | None = None

    @property
    def has_targets(self) -> bool:
        return all(example.target is not None for example in self.examples)

    @property
    def main_metric(self) -> str:
        """accuracy for multiple choice, the sidecar's metric or ROUGE-L F1 for generation."""
        if all(example.eval_type == MULTIPLE_CHOICE for example in self.examples):
            return "accuracy"
        if self.settings.metric not in (None, "accuracy"):
            return self.settings.metric
        return "rougeL"

    def render(self, example: Example) -> str:
        """The prompt text of an example without chat formatting (the template applied)."""
        return self.settings.template.replace("{input}", example.input)


def _fail(path: Path, where: str, problem: str) -> TaskError:
    return TaskError(f"{path}: {where}: {problem}")


def _parse_choices(path: Path, where: str, text: str) -> tuple[str, ...]:
    text = text.strip()
    if not text:
        raise _fail(path, where, "multiple_choice row has no answer_choices")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise _fail(
            path,
            where,
            f"answer_choices {text[:80]!r} is not a Python list literal "
            f"({error.__class__.__name__}); write it like \"['yes', 'no']\"",
        ) from None
    if not isinstance(value, list | tuple) or len(value) < 2:
        raise _fail(
            path, where, f"answer_choices must be a list of at least 2 choices, got {text[:80]!r}"
        )
    choices = []
    for choice in value:
        if not isinstance(choice, str | int | float) or isinstance(choice, bool):
            raise _fail(path, where, f"answer choice {choice!r} is not text")
        choice = str(choice)
        if not choice.strip():
            raise _fail(path, where, "an answer choice is empty")
        choices.append(choice)
    return tuple(choices)


def _parse_example(path: Path, line: int, row: dict[str, str], has_target: bool) -> Example:
    example_id = (row.get("id") or "").strip()
    where = f"row id {example_id!r} (line {line})" if example_id else f"line {line}"
    if not example_id:
        raise _fail(path, where, "empty id")
    text = row.get("input") or ""
    if not text.strip():
        raise _fail(path, where, "empty input")
    eval_type = (row.get("eval_type") or "").strip()
    if eval_type not in EVAL_TYPES:
        raise _fail(path, where, f"eval_type {eval_type!r} is not one of {', '.join(EVAL_TYPES)}")
    raw_target = (row.get("target") or "").strip() if has_target else ""
    if has_target and not raw_target:
        raise _fail(path, where, "empty target (leave out the target column for unscored inputs)")
    if eval_type == GENERATION:
        return Example(example_id, text, eval_type, (), row["target"] if has_target else None)
    choices = _parse_choices(path, where, row.get("answer_choices") or "")
    target: int | None = None
    if has_target:
        try:
            target = int(float(raw_target)) if float(raw_target).is_integer() else None
        except ValueError:
            target = None
        if target is None:
            raise _fail(path, where, f"target {raw_target!r} is not a choice index")
        if not 0 <= target < len(choices):
            raise _fail(
                path, where, f"target index {target} is out of range for {len(choices)} choices"
            )
    return Example(example_id, text, eval_type, choices, target)


def _find_sidecar(path: Path) -> Path | None:
    found = [
        path.with_suffix(s) for s in (".yaml", ".yml", ".json") if path.with_suffix(s).is_file()
    ]
    if len(found) > 1:
        raise TaskError(f"{path}: several sidecars ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def load_settings(sidecar: Path) -> TaskSettings:
    try:
        text = sidecar.read_text(encoding="utf-8")
        data = json.loads(text) if sidecar.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise TaskError(f"{sidecar}: cannot read the task sidecar: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TaskError(f"{sidecar}: a task sidecar must be a mapping of settings")
    try:
        settings = TaskSettings.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors()
        )
        raise TaskError(f"{sidecar}: {problems}") from None
    if "{input}" not in settings.template:
        raise TaskError(f"{sidecar}: template must contain the field {{input}}")
    return settings


def load_task(path: str | Path, *, limit: int | None = None) -> Task:
    """Read and validate a task file (and its sidecar); ``limit`` keeps the first N rows."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    settings = TaskSettings()
    sidecar = _find_sidecar(path)
    if sidecar is not None:
        settings = load_settings(sidecar)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise TaskError(
                    f"{path}: missing column(s) {', '.join(missing)}; a task file has the columns "
                    "id,input,target,answer_choices,eval_type (target optional)"
                )
            has_target = "target" in columns
            examples: list[Example] = []
            seen: dict[str, int] = {}
            for row in reader:
                line = reader.line_num
                if None in row:  # more fields than columns
                    raise _fail(path, f"line {line}", "more fields than the header has columns")
                example = _parse_example(path, line, row, has_target)
                if example.id in seen:
                    raise _fail(
                        path,
                        f"row id {example.id!r} (line {line})",
                        f"duplicate id (first seen on line {seen[example.id]})",
                    )
                seen[example.id] = line
                examples.append(example)
    except UnicodeDecodeError as error:
        raise TaskError(f"{path}: not UTF-8 text ({error})") from None
    except csv.Error as error:
        raise TaskError(f"{path}: malformed CSV: {error}") from None
    if not examples:
        raise TaskError(f"{path}: no rows")
    if limit is not None:
        examples = examples[:limit]
    return Task(path.stem, examples, settings, path)
